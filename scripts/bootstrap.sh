#!/usr/bin/env bash
# Create or reuse the project-local virtualenv and install latentforge into it.
# Idempotent: a stamp keyed by pyproject.toml's content skips the install when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
stamp="$VENV/.latentforge-installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ -f "$stamp" ]; then
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "[bootstrap] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
echo "[bootstrap] installing torch 2.14.1 / torchvision 0.29.1 (the tested pair; takes a few minutes the first time)"
"$VENV/bin/pip" install -q torch==2.14.1 torchvision==0.29.1 2>&1 | grep -v "^WARNING: Location" || true
echo "[bootstrap] installing latentforge and its dependencies"
"$VENV/bin/pip" install -q -e '.[dev]' 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -c "import torch, torchvision, deepspeed, open_clip, diffusers, mlflow, submitit, webdataset, peft, transformers" \
  || { echo "[bootstrap] the install is incomplete: an import failed above" >&2; exit 1; }
rm -f "$VENV"/.latentforge-installed-*
touch "$stamp"
echo "[bootstrap] ready: $VENV"
