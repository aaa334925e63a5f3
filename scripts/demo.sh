#!/usr/bin/env bash
# The demo command: set-up, then the demo — the quicktour's steps on the real pretrained all-MiniLM-L6-v2,
# offline (examples/demo_minilm.py; the tiny-T5 seq2seq walk-through is examples/quicktour.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" TOKENIZERS_PARALLELISM=false
if [ -f examples/demo_minilm.py ]; then
  exec .venv/bin/python examples/demo_minilm.py "$@"
fi
exec .venv/bin/peft-core list-methods
