#!/bin/sh
# Run pytest as the unprivileged user nobody (uid 65534), from a root shell:
#   scripts/test_as_nobody.sh tests/test_budgets.py tests/test_scan.py ...
# The interpreter here usually lives under /root (pyenv), which nobody cannot enter. So
# this runs in a private mount namespace (`unshare -m`, nothing leaks to the host) where
# a world-readable directory holding a bind of /root/.pyenv is mounted over /root; then
# setpriv drops to nobody with no supplementary groups and runs .venv/bin/python -m
# pytest. Exit code: pytest's, or 2 when not root or unshare/setpriv are missing.
set -eu

if [ "$(id -u)" != 0 ] || ! command -v unshare >/dev/null || ! command -v setpriv >/dev/null; then
    echo "$0: needs root, unshare and setpriv (util-linux); already unprivileged? run pytest directly" >&2
    exit 2
fi
cd "$(dirname "$0")/.."
view=$(mktemp -d /tmp/failcore-rootview.XXXXXX)
trap 'rmdir "$view/.pyenv" 2>/dev/null; rmdir "$view" 2>/dev/null' EXIT
chmod 755 "$view"
mkdir "$view/.pyenv"
unshare -m sh -c '
    set -e
    mount --make-rprivate /
    if [ -d /root/.pyenv ]; then
        mount --bind /root/.pyenv "$0/.pyenv"
        mount --rbind "$0" /root
    fi
    exec setpriv --reuid=65534 --regid=65534 --clear-groups \
        env HOME=/tmp PYTHONDONTWRITEBYTECODE=1 .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
' "$view" "$@"
