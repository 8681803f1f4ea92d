#!/usr/bin/env bash
# One GPU call that fills docs/PERFORMANCE.md: throughput table, kd14 profile, fp32-vs-bf16 loss curves.
#
#   OUT=/path/to/results bash benchmarks/gpu_suite.sh        (PYTHONPATH set by the caller; python on PATH)
#
# Stages, each under its own `timeout` so the whole run ends in < 9 minutes on an H100 even if compiling is
# slow; every stage writes its results as it goes (bench.json after each case, the profile after each mode,
# the loss curves' run dirs while training), so a stage cut off still leaves what it finished:
#   1. bench_throughput.py --mode both: 10 warm-up + 20 timed iterations for kd/train, 3 + 5 for the batch-2500
#      sample and batch-3072 prepare cases                                -> bench.json, bench.md
#   2. profile_step.py: kd14 optimized and baseline, top-20 ops by device time  -> profile_kd14.txt
#   3. loss_curve_check.py: 2000 steps, plain fp32 vs optimized bf16            -> curves/
# Override the budgets with BENCH_S, PROFILE_S, CURVE_S (seconds) and the steps with CURVE_STEPS.
set -u
OUT="${OUT:?set OUT to the results directory}"
PY="${PYTHON:-python}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BENCH_S="${BENCH_S:-270}"
PROFILE_S="${PROFILE_S:-90}"
CURVE_S="${CURVE_S:-150}"
CURVE_STEPS="${CURVE_STEPS:-2000}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$OUT/.inductor-cache}"  # stages reuse kernels

stage() {  # stage NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.log, record the exit status
  local name="$1" limit="$2"
  shift 2
  echo "=== $name (limit ${limit}s): $*" | tee -a "$OUT/suite.log"
  local begin=$SECONDS
  timeout --signal=TERM --kill-after=10 "$limit" "$@" > >(tee "$OUT/$name.log") 2>"$OUT/$name.err"
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - begin))s" | tee -a "$OUT/suite.log"
}

{ "$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"; nvidia-smi -L; } \
  >"$OUT/env.txt" 2>&1

stage bench "$BENCH_S" "$PY" "$HERE/bench_throughput.py" --device cuda --mode both --warmup 10 --iters 20 \
  --infer-warmup 3 --infer-iters 5 --json "$OUT/bench.json"
grep '^|' "$OUT/bench.log" >"$OUT/bench.md" 2>/dev/null

stage profile "$PROFILE_S" "$PY" "$HERE/profile_step.py" --case kd14 --modes optimized,baseline --device cuda \
  --warmup 10 --iters 3 --top 20 --out "$OUT/profile_kd14.txt"

stage curves "$CURVE_S" "$PY" "$HERE/loss_curve_check.py" --steps "$CURVE_STEPS" --precision fp32,bf16 \
  --device cuda --optimized --out "$OUT/curves"

rm -rf "$OUT/.inductor-cache" "$OUT/curves/pool.cache" "$OUT"/curves/*/*.pt "$OUT"/curves/*/*.cache
echo "=== done; results in $OUT" | tee -a "$OUT/suite.log"
