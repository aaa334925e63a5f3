#!/usr/bin/env bash
# The demo command: set-up, then the quicktour (offline: a small model built from config).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" TOKENIZERS_PARALLELISM=false
if [ -f examples/quicktour.py ]; then
  exec .venv/bin/python examples/quicktour.py "$@"
fi
exec .venv/bin/peft-core list-methods
