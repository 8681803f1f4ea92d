#!/usr/bin/env bash
# image_kd on one GPU and on NGPU GPUs of one host (torchrun), each GPU at the same batch (weak scaling):
# steady rate, time to first step, scaling efficiency, and whether all ranks end with the same weights.
#
#   OUT=/path/to/results NGPU=2 bash benchmarks/multi_gpu.sh        (PYTHONPATH set by the caller)
#
# The config (CONFIG; default the CIFAR-10 57M teacher -> STUDENT 14M of the papers) runs with a small pool
# (BATCH 0.001, so the preparation takes seconds) and compile off (so start-up is seconds); a pool's size does
# not change the speed of a training step. STUDENT= keeps the config's student. With SAMPLE_CONFIG (a flat
# sampling YAML of the teacher's arch) image_sample is timed too, SAMPLE_NUM images per GPU in batches of
# SAMPLE_BATCH at SAMPLE_STEPS steps, compiled as the script's default. Results: $OUT/g1/end_to_end.json,
# $OUT/g$NGPU/end_to_end.json, $OUT/agree/rank*.sha256, $OUT/summary.txt.
set -u
OUT="${OUT:?set OUT to the results directory}"
N="${NGPU:-2}"
PY="${PYTHON:-python3}"
STEPS="${STEPS:-300}"
PER_GPU="${PER_GPU:-128}"
CONFIG="${CONFIG:-yaml/cifar10_32/exp/ablation/dynamic-iterative-distillation/CIFAR10-57M-Dynamic-0.01.yaml}"
STUDENT="${STUDENT-yaml/arch/14M-CNN.yaml}"
SETS=(--set teacher.BATCH=0.001 --set student.compile=false)
[[ -n "$STUDENT" ]] && SETS+=(--set student.model="$STUDENT")
SAMPLE_CONFIG="${SAMPLE_CONFIG:-}"
SAMPLE_NUM="${SAMPLE_NUM:-1000}"
SAMPLE_BATCH="${SAMPLE_BATCH:-500}"
SAMPLE_STEPS="${SAMPLE_STEPS:-100}"
TORCHRUN=(torchrun --standalone --nproc_per_node "$N")
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

"$PY" benchmarks/end_to_end.py --config "$CONFIG" "${SETS[@]}" --set student.batch_size="$PER_GPU" \
  --kd-steps "$STEPS" --out "$OUT/g1" >"$OUT/g1.txt" 2>&1
"$PY" benchmarks/end_to_end.py --config "$CONFIG" "${SETS[@]}" --set student.batch_size=$((PER_GPU * N)) \
  --launcher "${TORCHRUN[*]} --no-python" --kd-steps "$STEPS" --out "$OUT/g$N" >"$OUT/g$N.txt" 2>&1
"${TORCHRUN[@]}" benchmarks/ranks_agree.py "$OUT/agree" scripts/image_kd.py --config "$OUT/g$N/config.yaml" \
  --exp_dir "$OUT/agree/run" --max_steps 50 --save_interval 1000 >"$OUT/agree.txt" 2>&1

if [[ -n "$SAMPLE_CONFIG" ]]; then
  for g in 1 "$N"; do
    launcher=()
    [[ "$g" != 1 ]] && launcher=(--launcher "${TORCHRUN[*]} --no-python")
    "$PY" benchmarks/end_to_end.py --config "$CONFIG" "${SETS[@]}" --kd-steps 0 --prepare-limit 1 "${launcher[@]}" \
      --sample-config "$SAMPLE_CONFIG" --sample-num $((SAMPLE_NUM * g)) --sample-batch "$SAMPLE_BATCH" \
      --sample-respacing "$SAMPLE_STEPS" --out "$OUT/s$g" >"$OUT/s$g.txt" 2>&1
  done
fi

"$PY" - "$OUT" "$N" <<'PY' | tee "$OUT/summary.txt"
import json, sys
from pathlib import Path
out, n = Path(sys.argv[1]), int(sys.argv[2])
def kd(d):
    return next(s for s in json.loads((out / d / "end_to_end.json").read_text())["stages"] if s["stage"] == "image_kd")
one, many = kd("g1"), kd(f"g{n}")
print(f"1 GPU: {one['steady_per_s']:.2f} it/s, first step {one['first_update_s']:.1f} s")
print(f"{n} GPUs: {many['steady_per_s']:.2f} it/s at {n}x the batch, first step {many['first_update_s']:.1f} s")
print(f"scaling efficiency (per-GPU images/s against 1 GPU): {many['steady_per_s'] / one['steady_per_s']:.3f}")
digests = {p.name: p.read_text().strip() for p in sorted((out / "agree").glob("rank*.sha256"))}
samples = [out / f"s{g}" / "end_to_end.json" for g in (1, n)]
if all(p.exists() for p in samples):
    one, many = (next(s for s in json.loads(p.read_text())["stages"] if s["stage"] == "image_sample") for p in samples)
    print(f"image_sample: 1 GPU {one['steady_per_s']:.2f} steps/s, {n} GPUs {many['steady_per_s']:.2f} steps/s "
          f"(each a batch per GPU), first step {one['first_update_s']:.1f} / {many['first_update_s']:.1f} s, "
          f"wall {one['wall_s']:.1f} / {many['wall_s']:.1f} s for {n}x the images")
print(f"weights after 50 steps: {len(digests)} ranks, identical: {len(set(digests.values())) == 1 and len(digests) == n}")
PY
