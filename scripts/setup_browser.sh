#!/usr/bin/env bash
# The browser of the playground's tests (tests/test_browser_playground.py): Debian's
# chromium, driven by Playwright through executable_path (Playwright's own browser download
# needs the internet). Idempotent: returns at once when /usr/bin/chromium is there. Without
# root (or sudo) and without chromium it says so and exits 0: the browser tests then skip
# with that reason.
set -euo pipefail
CHROMIUM=${SAE_SERVE_CHROMIUM:-/usr/bin/chromium}
if [ -x "$CHROMIUM" ]; then
    exit 0
fi
if [ "$(id -u)" = 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
else
    echo "setup_browser: $CHROMIUM is missing and installing it needs root; the browser tests will skip" >&2
    exit 0
fi
echo "==> installing chromium for the browser tests (apt-get)"
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get install -y --no-install-recommends chromium fonts-dejavu-core >/dev/null 2>&1; then
    $SUDO apt-get update -qq
    $SUDO apt-get install -y --no-install-recommends chromium fonts-dejavu-core >/dev/null
fi
[ -x "$CHROMIUM" ] && echo "==> chromium: $("$CHROMIUM" --version 2>/dev/null || echo installed)"
