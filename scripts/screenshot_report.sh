#!/usr/bin/env bash
# Render a run's report.html in headless Chromium and save a PNG, to check the page as a reader sees it.
#   apt-get install -y chromium            # once (Debian's package)
#   scripts/screenshot_report.sh runs/demo/report.html runs/demo/report.png   # WIDTH=1400 HEIGHT=2400 by default
set -euo pipefail
report=$(realpath "$1")
png=${2:-${report%.html}.png}
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$profile" --hide-scrollbars \
  --window-size="${WIDTH:-1400},${HEIGHT:-2400}" --screenshot="$(realpath -m "$png")" "file://$report" 2>/dev/null
echo "wrote $png"
