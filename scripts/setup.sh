#!/usr/bin/env bash
# Creates .venv (if needed) and installs peft-core with its test extras, on a machine that has only Python.
# torch is pinned to 2.13.0 here (a CPU wheel of it is on this project's machines) so a fresh machine does
# not pull a multi-GB CUDA build; the library itself only asks for a range.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.peft-core-installed
want="$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
  .venv/bin/python -m pip install -q "torch==2.13.0" -e ".[test]" 2>&1 | grep -v '^WARNING: Location' || true
  .venv/bin/python -c "import torch, transformers, peft_core, peft" # fail loudly if the install did not work
  echo "$want" > "$stamp"
fi
