#!/usr/bin/env bash
# Create .venv (if missing) and install the package with its dev extra. Sourced by runs/*.sh.
# Re-installs only when pyproject.toml changed (a stamp file keeps its hash), so reruns are fast.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${REASONING_VENV:-$REPO_ROOT/.venv}"
PYTHON_BIN="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating virtual environment at $VENV"
    "$PYTHON_BIN" -m venv "$VENV"
fi
STAMP="$VENV/.reasoning-installed"
WANT="$( (cat "$REPO_ROOT/pyproject.toml"; echo "${REASONING_EXTRAS:-dev}") | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    echo "[setup] installing reasoning[${REASONING_EXTRAS:-dev}] into $VENV (first run takes a few minutes)"
    # torch is pinned to the CPU build first so the resolver never pulls multi-GB CUDA wheels by accident
    "$VENV/bin/pip" install --quiet --disable-pip-version-check torch==2.13.0
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -e "$REPO_ROOT[${REASONING_EXTRAS:-dev}]"
    echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
