#!/usr/bin/env bash
# Create or reuse the project-local virtualenv and install latentforge into it, at the
# versions the suite passed with: requirements/lock.txt, as pip constraints.
#
#   bash scripts/bootstrap.sh                # what `make demo` and `make test` run first
#   LOCK= bash scripts/bootstrap.sh          # pyproject.toml's ranges only (untested versions)
#   PYTHON=python3.11 bash scripts/bootstrap.sh
#
# Idempotent: a stamp keyed by pyproject.toml and the lock skips the install when neither
# changed. Fails loudly: a pip error stops it with pip's own message and a non-zero status.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
LOCK=${LOCK-requirements/lock.txt}
PIP_VERSION=26.2.1  # the pip that installs (not part of the lock: it shapes no result)
export PIP_DISABLE_PIP_VERSION_CHECK=1

# (this script and the bytecode warm-up are in the key: a change to either redoes the install)
key=$(cat pyproject.toml ${LOCK:+"$LOCK"} scripts/bootstrap.sh scripts/warm_bytecode.py | sha256sum | cut -c1-16)
stamp="$VENV/.latentforge-installed-$key"
if [ -f "$stamp" ]; then
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "[bootstrap] creating $VENV ($("$PYTHON" --version 2>&1))"
  "$PYTHON" -m venv "$VENV"
fi

# The lock was made with one Python minor version (its "# python:" line); wheels such as
# numpy's differ per version, so another interpreter installs from pyproject's ranges.
constraints=()
what="pyproject.toml's ranges"
if [ -n "$LOCK" ]; then
  [ -f "$LOCK" ] || { echo "[bootstrap] $LOCK not found (LOCK= installs from pyproject's ranges)" >&2; exit 1; }
  lock_py=$(sed -n 's/^# python: *//p' "$LOCK")
  venv_py=$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  if [ "$lock_py" = "$venv_py" ]; then
    constraints=(-c "$LOCK")
    what="the tested versions in $LOCK"
  else
    echo "[bootstrap] warning: $LOCK holds the versions tested with Python $lock_py, $VENV has Python" \
         "$venv_py: installing from pyproject.toml's ranges instead (PYTHON=python$lock_py uses the lock)" >&2
  fi
fi

echo "[bootstrap] installing latentforge[dev] into $VENV at $what (torch 2.14.1 / torchvision 0.29.1;" \
     "about 2 minutes the first time)"
# A recent pip first: for this install Python 3.11's bundled pip 23.2 used 99 s of CPU,
# pip 26.2 70 s (one run each). pip only installs: the environment is the lock's. Where
# that pip cannot be had (a mirror without it), the one there does the same, slower.
"$VENV/bin/python" -m pip install -q --no-compile "pip==$PIP_VERSION" 2>&1 | { grep -v "^WARNING: Location" || true; } \
  || echo "[bootstrap] note: pip $PIP_VERSION is not available; installing with $("$VENV/bin/python" -m pip --version)"
# pipefail: pip's status is the pipeline's; the filter only drops this machine's notes about
# absent local index folders. --no-compile: of the ~18,000 modules installed most are never
# imported; byte-compiling them all took 40 s of the install on 2 cores, while the few that
# are imported are byte-compiled by scripts/warm_bytecode.py below.
"$VENV/bin/python" -m pip install -q --no-compile ${constraints[@]+"${constraints[@]}"} -e '.[dev]' 2>&1 \
  | { grep -v "^WARNING: Location" || true; }
"$VENV/bin/python" -m pip check 2>&1 | { grep -v "^WARNING: Location" || true; }
DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} \
  "$VENV/bin/python" -c "import torch, torchvision, deepspeed, open_clip, diffusers, mlflow, submitit, webdataset, peft, transformers" \
  || { echo "[bootstrap] the install is incomplete: an import failed above" >&2; exit 1; }
# The bytecode of what latentforge imports, cached now: where PYTHONDONTWRITEBYTECODE is
# set, nothing would cache it later and every rank would compile torch, DeepSpeed, diffusers
# and open_clip again (open_clip alone: 8 s against 3 s on 2 cores).
if warm=$(DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} "$VENV/bin/python" scripts/warm_bytecode.py 2>&1); then
  grep "^\[bootstrap\]" <<<"$warm" || true
else  # only a cache: the install stands
  echo "$warm" | tail -20 >&2
  echo "[bootstrap] note: the bytecode warm-up failed (above); the install is complete, start-up is slower" >&2
fi
rm -f "$VENV"/.latentforge-installed-*
touch "$stamp"
echo "[bootstrap] ready: $VENV"
