#!/usr/bin/env bash
# Installs Debian's Chromium for the demo's browser test (Playwright drives it; it never downloads a browser).
# Does nothing when a Chromium is already there; needs root or sudo and apt-get otherwise.
set -euo pipefail
for candidate in "${BERNINI_CHROMIUM:-}" /usr/bin/chromium /usr/bin/chromium-browser; do
    if [ -n "$candidate" ] && [ -x "$candidate" ]; then exit 0; fi
done
if ! command -v apt-get >/dev/null; then
    echo "install_browser: no Chromium and no apt-get; install Chromium and set BERNINI_CHROMIUM" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 \
    || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q --no-install-recommends chromium >/dev/null; }
echo "install_browser: $(/usr/bin/chromium --version 2>/dev/null || echo 'chromium installed')"
