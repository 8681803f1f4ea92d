#!/usr/bin/env bash
# The GPU runs behind docs/PERFORMANCE.md: throughput table, kd14 profile, fp32-vs-bf16 loss curves.
#
#   OUT=/path/to/results bash benchmarks/gpu_suite.sh        (PYTHONPATH set by the caller; python on PATH)
#
# Stages, each under its own `timeout`; every stage writes its results as it goes (bench.json after each case,
# the profile after each mode, the loss curves' run dirs while training), so a stage cut off still leaves what
# it finished:
#   bench    bench_throughput.py --mode both (scripts' defaults, compile on): 5 warm-up + 20 timed iterations
#            for kd/train, 3 + 5 for the batch-2500 sample and batch-3072 prepare cases  -> bench.json, bench.md
#   profile  profile_step.py: kd14 optimized and baseline, top-25 kernels by device time -> profile_kd14.txt
#   curves   loss_curve_check.py: 2000 steps, plain fp32 vs optimized bf16              -> curves/
# On the H100 the stages took about 345 s, 60 s and 205 s, more than one 10-minute device call: pick stages
# with STAGES (default "bench,profile,curves"). Budgets: BENCH_S, PROFILE_S, CURVE_S (seconds); steps:
# CURVE_STEPS. The stages share one inductor cache (TORCHINDUCTOR_CACHE_DIR), deleted at the end.
set -u
OUT="${OUT:?set OUT to the results directory}"
PY="${PYTHON:-python}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STAGES="${STAGES:-bench,profile,curves}"
BENCH_S="${BENCH_S:-420}"
PROFILE_S="${PROFILE_S:-120}"
CURVE_S="${CURVE_S:-260}"
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

if [[ ",$STAGES," == *",bench,"* ]]; then
  stage bench "$BENCH_S" "$PY" "$HERE/bench_throughput.py" --device cuda --mode both --warmup 5 --iters 20 \
    --infer-warmup 3 --infer-iters 5 --json "$OUT/bench.json"
  grep '^|' "$OUT/bench.log" >"$OUT/bench.md" 2>/dev/null
fi
if [[ ",$STAGES," == *",profile,"* ]]; then
  stage profile "$PROFILE_S" "$PY" "$HERE/profile_step.py" --case kd14 --modes optimized,baseline \
    --device cuda --warmup 5 --iters 3 --top 25 --out "$OUT/profile_kd14.txt"
fi
if [[ ",$STAGES," == *",curves,"* ]]; then
  stage curves "$CURVE_S" "$PY" "$HERE/loss_curve_check.py" --steps "$CURVE_STEPS" --precision fp32,bf16 \
    --device cuda --optimized --out "$OUT/curves"
fi

rm -rf "$OUT/.inductor-cache" "$OUT/curves/pool.cache" "$OUT"/curves/*/*.pt "$OUT"/curves/*/*.cache
echo "=== done; results in $OUT" | tee -a "$OUT/suite.log"
