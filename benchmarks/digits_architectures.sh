#!/usr/bin/env bash
# The architecture table of docs/RESULTS.md on one GPU: DKDM between CNN (ADM UNet) and DiT teachers and
# students of the digits benchmark at equal steps, each row through the real scripts (benchmarks/digits_results.py).
#   [DEVICE=cpu] [NUM_SAMPLES=1000] [BUDGET_S=SEC] bash benchmarks/digits_architectures.sh OUT_DIR [STEPS] [SEED] [TEACHER_SECONDS]
# Without model/digits16_dit_teacher.pt the DiT teacher is trained first (benchmarks/digits_teacher.sh with
# yaml/digits_16/dit_teacher_train.yaml, at most TEACHER_SECONDS, default 240) while the rows that need only
# the UNet teacher run; the DiT-teacher rows follow. The small models leave the GPU mostly idle, so the
# runners share it side by side (their wall times are not speed figures). OUT_DIR/table holds the merged
# results.md / results.json and the sample grids of every row. With BUDGET_S set, the runners stop training
# in time for the whole script to end within that many seconds (a cut row is marked partial).
set -euo pipefail
out=${1:?usage: digits_architectures.sh OUT_DIR [STEPS] [SEED] [TEACHER_SECONDS]}
steps=${2:-2000}
seed=${3:-0}
teacher_seconds=${4:-240}
mkdir -p "$out"
start=$(date +%s)
common=(--device "${DEVICE:-cuda}" --steps "$steps" --seed "$seed" --eval_every $((steps / 2)) --num_samples "${NUM_SAMPLES:-1000}"
        --eval_reserve_s 30)
budget() {  # the runners' --budget_s: what is left of BUDGET_S minus the merge's share
  if [ -n "${BUDGET_S:-}" ]; then echo --budget_s $((BUDGET_S - ($(date +%s) - start) - 15)); fi
}
python datasets/digits.py --image_size 16 --output_dir experiments/data/digits > /dev/null

teacher_pid=""
if [ ! -f model/digits16_dit_teacher.pt ]; then
  bash benchmarks/digits_teacher.sh "$out/dit_teacher" "$teacher_seconds" yaml/digits_16/dit_teacher_train.yaml \
    yaml/digits_16/dit_teacher.yaml > "$out/dit_teacher.log" 2>&1 &
  teacher_pid=$!
fi
python benchmarks/digits_results.py --out "$out/cnn_cnn" "${common[@]}" $(budget) --methods reference,teacher,dkdm \
  > "$out/cnn_cnn.log" 2>&1 &
first=$!
python benchmarks/digits_results.py --out "$out/cnn_dit" "${common[@]}" $(budget) --methods dkdm_cnn_dit \
  > "$out/cnn_dit.log" 2>&1 &
second=$!
if [ -n "$teacher_pid" ]; then
  wait "$teacher_pid"
  cp "$out/dit_teacher/teacher.pt" model/digits16_dit_teacher.pt
  echo "DiT teacher: $(tr -d '\n' < "$out/dit_teacher/teacher_eval.json")"
fi
python benchmarks/digits_results.py --out "$out/dit_cnn" "${common[@]}" $(budget) --methods dit_teacher,dkdm_dit_cnn \
  > "$out/dit_cnn.log" 2>&1 &
third=$!
python benchmarks/digits_results.py --out "$out/dit_dit" "${common[@]}" $(budget) --methods dkdm_dit_dit \
  > "$out/dit_dit.log" 2>&1 &
fourth=$!
status=0
for pid in "$first" "$second" "$third" "$fourth"; do wait "$pid" || status=$?; done
python benchmarks/digits_results.py --out "$out/table" "${common[@]}" --methods "" \
  --merge "$out/cnn_cnn,$out/cnn_dit,$out/dit_cnn,$out/dit_dit"
sed -n '/^## Any architecture/,/^## RDD/p' "$out/table/results.md"
exit "$status"
