#!/usr/bin/env bash
# The test command: sets up .venv if needed, then runs the whole pytest suite (CPU only).
# Extra arguments go to pytest, e.g. `bash runs/test.sh tests/test_gpt.py -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
source runs/setup_env.sh
# the browser test needs Debian's chromium + chromedriver; installed when absent (skipped without root/apt)
bash runs/install_chromium.sh
set +e
python -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests (exit 5): treating as success"
    exit 0
fi
exit "$status"
