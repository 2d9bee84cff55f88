#!/usr/bin/env bash
# Create .venv (if missing) and install the package with its dev extra. Sourced by runs/*.sh.
# Re-installs only when pyproject.toml changed (a stamp file keeps its hash), so reruns are fast.
# REASONING_SKIP_SETUP=1 leaves the environment alone and uses the `python` already on PATH (tests that drive the
# run scripts from inside an existing interpreter; containers with the package preinstalled).
set -euo pipefail
if [ "${REASONING_SKIP_SETUP:-0}" = "1" ]; then
    if ! command -v python >/dev/null; then
        echo "error: REASONING_SKIP_SETUP=1 but no 'python' on PATH; expected an environment with reasoning installed" >&2
        exit 2
    fi
else
    REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    VENV="${REASONING_VENV:-$REPO_ROOT/.venv}"
    PYTHON_BIN="${PYTHON:-python3}"
    if [ ! -x "$VENV/bin/python" ]; then
        echo "[setup] creating virtual environment at $VENV"
        "$PYTHON_BIN" -m venv "$VENV"
    fi
    STAMP="$VENV/.reasoning-installed"
    EXTRAS="${REASONING_EXTRAS:-dev}"
    WANT="$( (cat "$REPO_ROOT/pyproject.toml"; echo "$EXTRAS") | sha256sum | cut -d' ' -f1)"
    if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
        echo "[setup] installing reasoning[$EXTRAS] into $VENV (first run takes a few minutes)"
        # torch first, on its own: pinned to 2.13.0 so the resolver cannot pick another version. Which build pip
        # picks is the index's choice: on Linux, plain PyPI serves the CUDA build (several GB). A CPU-only machine
        # can ask for the CPU build with TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu (a GPU node wants the
        # default). Left unset, pip's own configuration decides (here a local wheel folder serves the CPU build).
        TORCH_INDEX_ARGS=()
        if [ -n "${TORCH_INDEX_URL:-}" ]; then TORCH_INDEX_ARGS=(--index-url "$TORCH_INDEX_URL"); fi
        "$VENV/bin/pip" install --quiet --disable-pip-version-check ${TORCH_INDEX_ARGS[@]+"${TORCH_INDEX_ARGS[@]}"} torch==2.13.0
        "$VENV/bin/pip" install --quiet --disable-pip-version-check -e "${REPO_ROOT}[$EXTRAS]"
        echo "$WANT" > "$STAMP"
    fi
    export PATH="$VENV/bin:$PATH"
fi
