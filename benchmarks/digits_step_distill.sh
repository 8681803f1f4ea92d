#!/usr/bin/env bash
# The step-distillation ablation of docs/RESULTS.md on one GPU: the digits teacher's 8-, 4- and 2-step DDIM
# rows, then one benchmarks/digits_results.py runner per (student_prediction, teacher_clip) variant, side by
# side, each training METHODS (default PD 8->4 then 4->2 from that student) through scripts/step_distill.py.
#   [DEVICE=cpu] [NUM_SAMPLES=1000] [BASELINE_SAMPLES=N] [BUDGET_S=SEC] [VARIANTS="eps:false x0:true ..."] \
#     bash benchmarks/digits_step_distill.sh OUT_DIR [STEPS] [SEED] [METHODS]
# VARIANTS defaults to all six of eps/x0/v x clip off/on. OUT_DIR/table holds the merged results.md and
# results.json (rows named pd@<prediction>_clip<on|off>) and every sample grid. The small models leave the
# GPU mostly idle, so the runners share it (their wall times are not speed figures); torch.compile is off
# in every runner so that start-up is not compile-bound. With BUDGET_S the runners stop training in time.
set -euo pipefail
out=${1:?usage: digits_step_distill.sh OUT_DIR [STEPS] [SEED] [METHODS]}
steps=${2:-2000}
seed=${3:-0}
methods=${4:-pd,pd_4to2}
variants=${VARIANTS:-"eps:false eps:true x0:false x0:true v:false v:true"}
mkdir -p "$out"
start=$(date +%s)
common=(--device "${DEVICE:-cuda}" --steps "$steps" --seed "$seed" --num_samples "${NUM_SAMPLES:-1000}"
        --eval_reserve_s 30 --set student.compile=false ${BASELINE_SAMPLES:+--baseline_samples "$BASELINE_SAMPLES"})
budget() {  # the runners' --budget_s: what is left of BUDGET_S minus the merge's share
  if [ -n "${BUDGET_S:-}" ]; then echo --budget_s $((BUDGET_S - ($(date +%s) - start) - 15)); fi
}
python datasets/digits.py --image_size 16 --output_dir experiments/data/digits > /dev/null

pids=()
dirs=("$out/teacher")
python benchmarks/digits_results.py --out "$out/teacher" "${common[@]}" $(budget) --methods teacher \
  > "$out/teacher.log" 2>&1 &
pids+=($!)
for variant in $variants; do
  prediction=${variant%%:*}
  clip=${variant##*:}
  tag="${prediction}_clip$([ "$clip" = true ] && echo on || echo off)"
  dirs+=("$out/$tag")
  python benchmarks/digits_results.py --out "$out/$tag" "${common[@]}" $(budget) --methods "$methods" --tag "$tag" \
    --set "step_distill.student_prediction=$prediction" --set "step_distill.teacher_clip=$clip" \
    --set step_distill.loss_weighting=auto \
    > "$out/$tag.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
python benchmarks/digits_results.py --out "$out/table" "${common[@]}" --methods "" \
  --merge "$(IFS=,; echo "${dirs[*]}")"
sed -n '/^## RDD/,/^## digits-FID/p' "$out/table/results.md"
exit "$status"
