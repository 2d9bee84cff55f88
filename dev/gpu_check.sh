#!/usr/bin/env bash
# GPU check of the training/inference fast path: FA3-vs-SDPA parity, fp8-vs-bf16 loss parity, tok/s and MFU of
# depth 12 and 20, and the engine benchmark (dev/bench_engine.py --device cuda, bf16), as one table (the work is in
# dev/gpu_check.py).
#   bash dev/gpu_check.sh                 # on a CUDA machine, from anywhere
#   bash dev/gpu_check.sh --dry-run       # micro sizes on CPU: checks the script itself
# Extra arguments go to dev/gpu_check.py (e.g. --device-batch-size 8 on smaller GPUs, --skip-engine).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
exec "$PYTHON" -m dev.gpu_check "$@"
