#!/usr/bin/env bash
# RDD as its authors ran it, on digits (issue 15): the RCFD base model (yaml/digits_16/rcfd/DIGITS_BASE.yaml)
# read as an 8-step DDIM teacher, its 4-step PD and RDD students at equal steps on the authors' grid, and
# digits-FID / precision / recall of all three (1000 samples each) against the reference split.
#   bash benchmarks/rcfd_digits.sh OUT_DIR [BASE_SECONDS [BASE_CKPT]]
# OUT_DIR receives results.json, results.md, the three sample grids, the base ckpt.pt and stages.log (each
# stage's wall time and last log lines, appended as it ends). Base training stops at total_steps or after
# BASE_SECONDS (default 240; the last saved ckpt.pt is used); BASE_CKPT reuses a base model instead. The PD
# and RDD stages run side by side on the one GPU. Environment: STEPS (PD and RDD total_steps, default the
# YAMLs'), CLASSIFIER (densenet121/161/169/201, default densenet201) and CLASSIFIER_EPOCHS (default 30).
set -euo pipefail
out=${1:?usage: rcfd_digits.sh OUT_DIR [BASE_SECONDS]}
seconds=${2:-240}
base_ckpt=${3:-}
mkdir -p "$out"
log="$out/stages.log"
root=experiments/rcfd/digits-$(date +%Y%m%d-%H%M%S)  # a fresh root every time
data=experiments/data/digits
python datasets/digits.py --image_size 16 --output_dir "$data"
train="$data/digits16_train.npz"
ref="$data/digits16_ref.npz"
steps=()
if [ -n "${STEPS:-}" ]; then steps=(--total_steps "$STEPS"); fi
classifier=${CLASSIFIER:-densenet201}
stamp() { date +%s; }
note() { echo "$*" | tee -a "$log"; }
# tail of a run's log.txt (or a file) into stages.log
keep() { tail -n "${2:-4}" "$1" >> "$log" 2>/dev/null || true; }

t0=$(stamp)
if [ -n "$base_ckpt" ]; then
  mkdir -p "$root/1024" && cp "$base_ckpt" "$root/1024/ckpt.pt"
  note "base: reused $base_ckpt"
else
  rc=0
  timeout "$seconds" python scripts/rcfd_train.py --config yaml/digits_16/rcfd/DIGITS_BASE.yaml \
    --data_dir "$train" --logdir "$root/1024" > "$root/base.out" 2>&1 || rc=$?
  note "base: exit $rc (124: stopped at $seconds s), $(( $(stamp) - t0 )) s"
  keep "$root/1024/log.txt" 6
  cp "$root/1024/ckpt.pt" "$out/base_ckpt.pt"
fi

evaluate() {  # NAME DIR STRIDE: 1000 samples, digits-FID / precision / recall
  local name=$1 dir=$2 stride=$3
  python scripts/rcfd_eval.py --config yaml/digits_16/rcfd/DIGITS_EVAL.yaml --logdir "$root/$dir" \
    --stride "$stride" --output_dir "$root/eval_$name" > "$root/sample_$name.out" 2>&1
  python evaluations/evaluator.py "$ref" "$root/eval_$name/samples_1000x16x16x3.npz" --features digits \
    --json "$root/eval_$name/metrics.json" > "$root/eval_$name.out" 2>&1
  note "eval $name: $(cat "$root/eval_$name/metrics.json")"
  cp "$root/eval_$name/samples_seed0.png" "$out/${name}_grid.png"
}
evaluate teacher8 1024 128

t0=$(stamp)
python scripts/classifier_train.py --layout rdd --model "$classifier" --image_size 16 \
  --epochs "${CLASSIFIER_EPOCHS:-30}" --data_dir "$train" --output "$root/classifier/ckpt.pt" > "$root/classifier.log" 2>&1
note "classifier $classifier: $(( $(stamp) - t0 )) s"
keep "$root/classifier.log" 2
t0=$(stamp)
python scripts/rcfd_train.py --config yaml/digits_16/rcfd/DIGITS_PD.yaml --data_dir "$train" \
  --base_ckpt "$root/1024" --logdir "$root/pd4" "${steps[@]}" > "$root/pd.out" 2>&1 &
pd=$!
python scripts/rcfd_train.py --config yaml/digits_16/rcfd/DIGITS_RDD.yaml --data_dir "$train" \
  --base_ckpt "$root/1024" --classifier_path "$root/classifier" --classifier "$classifier" \
  --logdir "$root/rdd4" "${steps[@]}" > "$root/rdd.out" 2>&1
note "rdd: $(( $(stamp) - t0 )) s"
wait $pd
note "pd: $(( $(stamp) - t0 )) s (side by side with rdd)"
keep "$root/pd4/log.txt" 12
keep "$root/rdd4/log.txt" 12
evaluate pd4 pd4 1
evaluate rdd4 rdd4 1

python - "$root" "$out" <<'PY'
import json, sys
root, out = sys.argv[1:3]
rows = {}
for name, steps in (("teacher8", 8), ("pd4", 4), ("rdd4", 4)):
    m = json.load(open(f"{root}/eval_{name}/metrics.json"))
    rows[name] = {"steps": steps, **{k: m[k] for k in ("fid", "precision", "recall")}}
teacher = rows["teacher8"]["fid"]
for r in rows.values():
    r["fid_vs_teacher"] = r["fid"] / teacher
json.dump(rows, open(f"{out}/results.json", "w"), indent=2)
lines = ["| model | DDIM steps | digits-FID | x teacher | precision | recall |", "| --- | --- | --- | --- | --- | --- |"]
for name, r in rows.items():
    lines.append(f"| {name} | {r['steps']} | {r['fid']:.2f} | {r['fid_vs_teacher']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} |")
open(f"{out}/results.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
