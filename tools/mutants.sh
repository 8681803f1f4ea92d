#!/usr/bin/env bash
# Mutation testing of the core with mutmut (pinned in requirements-dev.txt; config under [tool.mutmut] in
# pyproject.toml), run in a scratch copy of the checkout so that mutants/ never lands in the tree.
#   bash tools/mutants.sh                      # every core module (slow: outside CI)
#   bash tools/mutants.sh 'evaluations.metrics*'  # mutants whose names match, as `mutmut run` takes them
# Writes experiments/mutants/report.md (per module: killed / equivalent / survived, every survivor named with
# its changed lines) and exits with mutmut's status.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-$ROOT/.venv/bin/python}
WORK=${MUTANTS_DIR:-$ROOT/experiments/mutants}
SHARED=$(cd "$ROOT/.." && pwd)/shared
[ -d "$SHARED/reference" ] || { echo "tools/mutants.sh: $SHARED/reference is missing (reference data beside the checkout)" >&2; exit 2; }
mkdir -p "$WORK/repo"
git ls-files -z | xargs -0 cp -a --parents -t "$WORK/repo/"  # the tracked tree, as a fresh clone has it
ln -sfn "$SHARED" "$WORK/repo/shared"  # the tests find ../shared from mutants/, one level down
cd "$WORK/repo"
mkdir -p "$WORK/hits"
MUTMUT_ROOT="$WORK/repo" MUTMUT_HITS_DIR="$WORK/hits" PYTHONPATH="$ROOT/tools/mutmut_site${PYTHONPATH:+:$PYTHONPATH}" \
  OMP_NUM_THREADS=1 "$PY" -m mutmut run --max-children "${JOBS:-2}" "$@" && status=0 || status=$?
# the report of whatever ran (also after a failed or interrupted run), equivalents as docs/TESTING.md lists them
"$PY" "$ROOT/tools/mutation_report.py" mutants --diffs --equivalent "$ROOT/docs/results/mutants/equivalent.tsv" \
  --out "$WORK/report.md"
exit "$status"
