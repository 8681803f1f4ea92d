#!/usr/bin/env bash
# Trains a digits teacher (default yaml/digits_16/teacher_train.yaml, the shipped UNet; the DiT teacher is
# yaml/digits_16/dit_teacher_train.yaml with SAMPLE_CONFIG yaml/digits_16/dit_teacher.yaml) on one GPU and
# scores it with SAMPLE_CONFIG (default yaml/digits_16/teacher.yaml): 1000 samples at 100 ancestral steps,
# digits-FID / precision / recall against the reference split with the shipped digits feature net, and how
# grey the samples are (mean |R-G|, |G-B|, |R-B| in 1/255 units).
#   bash benchmarks/digits_teacher.sh OUT_DIR [TRAIN_SECONDS] [TRAIN_CONFIG SAMPLE_CONFIG]
# Training stops at max_steps or after TRAIN_SECONDS (default 420; the last saved EMA is scored). OUT_DIR
# receives teacher.pt (that EMA), teacher_eval.json and samples_grid.png; the log goes to stdout.
set -euo pipefail
out=${1:?usage: digits_teacher.sh OUT_DIR [TRAIN_SECONDS]}
seconds=${2:-420}
config=${3:-yaml/digits_16/teacher_train.yaml}
sample_config=${4:-yaml/digits_16/teacher.yaml}
name=$(basename "$config" .yaml)
mkdir -p "$out"
run=experiments/train/digits16_$name-$(date +%Y%m%d-%H%M%S)  # a fresh run dir every time
python datasets/digits.py --image_size 16 --output_dir experiments/data/digits
start=$(date +%s)
rc=0
timeout "$seconds" python scripts/image_train.py --config "$config" --exp_dir "$run" || rc=$?
echo "image_train exit code $rc (124: stopped at $seconds s)"
echo "train wall $(( $(date +%s) - start )) s"
ema=$(ls "$run"/ema_0.999_*.pt | sort | tail -1)
echo "scoring $ema"
cp "$ema" "$out/teacher.pt"
python scripts/image_sample.py --config "$sample_config" --model_path "$ema" --num_samples 1000 \
  --batch_size 1000 --timestep_respacing 100 --output_dir "experiments/sample/digits16_$name"
samples=experiments/sample/digits16_$name/samples_1000x16x16x3.npz
cp "experiments/sample/digits16_$name/samples_grid.png" "$out/samples_grid.png"
python evaluations/evaluator.py experiments/data/digits/digits16_ref.npz "$samples" --features digits \
  --json "$out/teacher_eval.json"
python - "$samples" "$out/teacher_eval.json" <<'EOF'
import json, sys
import numpy as np
x = np.load(sys.argv[1])["arr_0"].astype(np.float64)
grey = {f"mad_{a}{b}": float(np.abs(x[..., i] - x[..., j]).mean()) for a, b, i, j in
        (("r", "g", 0, 1), ("g", "b", 1, 2), ("r", "b", 0, 2))}
result = json.load(open(sys.argv[2]))
result.update(grey, num_samples=len(x), steps=100)
json.dump(result, open(sys.argv[2], "w"), indent=2)
print(json.dumps(result))
EOF
