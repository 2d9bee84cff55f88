#!/usr/bin/env bash
# Installs headless Chromium + chromedriver (Debian packages) for tests/test_chat_browser.py, only when absent.
# Called by runs/test.sh; safe to run again. Without root or apt it does nothing and says why (the browser
# test then skips with that reason).
set -uo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_chromium: apt-get not found; the browser test will be skipped" >&2
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "install_chromium: not root and no passwordless sudo; the browser test will be skipped" >&2
        exit 0
    fi
fi
export DEBIAN_FRONTEND=noninteractive
if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver; }; then
    echo "install_chromium: apt-get install chromium chromium-driver failed; the browser test will be skipped" >&2
fi
exit 0
