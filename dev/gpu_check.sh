#!/usr/bin/env bash
# GPU check for the first GPU (the work is in dev/gpu_check.py): base_train at the depth-20 shape, chat_sft, chat_rl
# and chat_eval for a few steps each under torchrun/NCCL; each stage's memory plan vs torch.cuda.max_memory_allocated,
# FA3 taken inside the model's forward, tok/s and MFU; FA3-vs-SDPA parity. Under 8 minutes on one 8xH100 node.
#   bash dev/gpu_check.sh                 # NPROC=2 ranks by default
#   NPROC=1 bash dev/gpu_check.sh         # a single GPU
#   bash dev/gpu_check.sh --dry-run       # micro sizes on CPU (gloo ranks): checks the script itself
# Extra arguments go to dev/gpu_check.py (--engine adds dev/bench_engine.py --device cuda, --keep DIR keeps the run).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
export NPROC="${NPROC:-2}"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
exec "$PYTHON" -m dev.gpu_check "$@"
