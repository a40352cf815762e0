#!/usr/bin/env bash
# Refresh requirements/lock.txt from a virtualenv the suite passed in (`make lock`).
#
#   VENV=.venv bash scripts/lock.sh     # after upgrading packages there and a green `make test`
#
# The lock pins every installed distribution (the torch pair and setuptools included; pip
# and latentforge itself excluded) and records the interpreter's major.minor:
# scripts/bootstrap.sh installs with it as pip constraints when the interpreter matches.
# A new version of torch, open_clip, submitit or MLflow also needs its adapter's TESTED range
# (latentforge/compat.py lists the adapters; tests/test_compat.py fails until it has one),
# and a new DeepSpeed its entry in training/deepspeed_compat.py's TESTED_VERSIONS.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
LOCK=${LOCK:-requirements/lock.txt}
[ -x "$VENV/bin/python" ] || { echo "[lock] no virtualenv at $VENV (run make venv first)" >&2; exit 1; }
py=$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
mkdir -p "$(dirname "$LOCK")"
tmp=$(mktemp "$LOCK.XXXXXX")
trap 'rm -f "$tmp"' EXIT
{
  echo "# The versions the test suite passed with (pip constraints). Do not edit by hand: \`make lock\`"
  echo "# rewrites it from .venv (VENV=... for another); see scripts/lock.sh. scripts/bootstrap.sh"
  echo "# installs with \`pip install -c requirements/lock.txt -e '.[dev]'\` when the interpreter matches:"
  echo "# python: $py"
  echo "# platform: $("$VENV/bin/python" -c 'import platform; print(platform.system(), platform.machine())')"
  "$VENV/bin/python" -m pip freeze --all --exclude-editable --exclude latentforge --exclude pip 2>/dev/null | grep -v '^#' | LC_ALL=C sort -f
} >"$tmp"
grep -q '^torch==' "$tmp" || { echo "[lock] torch is not installed in $VENV: refusing to write a lock without it" >&2; exit 1; }
mv "$tmp" "$LOCK"
trap - EXIT
echo "[lock] wrote $LOCK: $(grep -c '==' "$LOCK") packages, Python $py"
