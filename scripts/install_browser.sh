#!/usr/bin/env bash
# Installs Debian's Chromium for the demo's browser test (Playwright drives it; it never downloads a browser).
# Does nothing when a Chromium is already there. Where it cannot install one (no apt-get, no root or sudo, no
# package index), it says so and the browser test is skipped with that reason; the rest of the suite runs.
set -uo pipefail
for candidate in "${BERNINI_CHROMIUM:-}" /usr/bin/chromium /usr/bin/chromium-browser; do
    if [ -n "$candidate" ] && [ -x "$candidate" ]; then exit 0; fi
done
warn() { echo "install_browser: $1; the demo's browser test will be skipped (set BERNINI_CHROMIUM to a Chromium)" >&2; exit 0; }
command -v apt-get >/dev/null || warn "no Chromium and no apt-get"
SUDO=""
if [ "$(id -u)" != 0 ]; then
    if sudo -n true 2>/dev/null; then SUDO="sudo -n"; else warn "no Chromium, and installing one needs root"; fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 \
    || { $SUDO apt-get update -q >/dev/null 2>&1 \
         && $SUDO apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; } \
    || warn "apt-get could not install chromium"
echo "install_browser: $(/usr/bin/chromium --version 2>/dev/null || echo 'chromium installed')"
