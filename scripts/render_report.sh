#!/bin/sh
# Screenshot a FailCore HTML report with headless Chromium:
#   scripts/render_report.sh REPORT.html OUT.png
# The report is self-contained (no external resources), so Chromium runs inside a fresh
# network namespace when `unshare -n` is permitted: it cannot reach the network at all.
# A throwaway profile directory is removed afterwards. Exit 2 on bad usage or input,
# 1 when Chromium fails or writes no image.
set -eu

if [ "$#" -ne 2 ]; then
    echo "usage: $0 REPORT.html OUT.png" >&2
    exit 2
fi
report=$1
out=$2
if [ ! -f "$report" ]; then
    echo "$0: $report: no such file" >&2
    exit 2
fi
browser=""
for name in chromium chromium-browser google-chrome; do
    if command -v "$name" >/dev/null 2>&1; then
        browser=$(command -v "$name")
        break
    fi
done
if [ -z "$browser" ]; then
    echo "$0: chromium not found (Debian: apt-get install -y chromium)" >&2
    exit 2
fi

report_abs=$(realpath "$report")
out_abs=$(realpath -m "$out")
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT INT TERM

isolate=""
if unshare -n true >/dev/null 2>&1; then
    isolate="unshare -n"
fi
rm -f "$out_abs"
# shellcheck disable=SC2086  # $isolate is empty or two words on purpose
$isolate "$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --disable-breakpad --disable-crash-reporter --no-default-browser-check \
    --hide-scrollbars --user-data-dir="$profile" \
    --screenshot="$out_abs" --window-size=1280,2000 "file://$report_abs" \
    >"$profile/chromium.log" 2>&1 || {
    echo "$0: chromium failed:" >&2
    tail -n 20 "$profile/chromium.log" >&2
    exit 1
}
if [ ! -s "$out_abs" ]; then
    echo "$0: chromium wrote no screenshot to $out_abs" >&2
    tail -n 20 "$profile/chromium.log" >&2
    exit 1
fi
echo "$out_abs"
