#!/usr/bin/env bash
# Creates .venv with everything the project needs (CPU or GPU) at the versions in constraints.txt: the runtime
# requirements, the development tools, then the package itself in editable mode.
# Idempotent: a second run only re-installs when a requirements file, constraints.txt or setup.py changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
stamp="$VENV/.installed"
inputs=(requirements.txt requirements-dev.txt constraints.txt setup.py)
fresh=1
for f in "${inputs[@]}"; do
  if [ ! -f "$stamp" ] || [ "$f" -nt "$stamp" ]; then fresh=0; fi
done
if [ "$fresh" = 1 ]; then
  exit 0
fi
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -c constraints.txt -r requirements.txt -r requirements-dev.txt
"$VENV/bin/python" -m pip install --quiet --no-deps -e .
touch "$stamp"
echo "environment ready in $VENV"
