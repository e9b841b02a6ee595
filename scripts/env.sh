#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install vlmo_large into it.
# Sourced by scripts/demo.sh and scripts/test.sh. The venv lives outside the clone
# (VLMO_VENV, default ~/.cache/vlmo_large/venv) so fresh clones and CI reuse it.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLMO_VENV:-$HOME/.cache/vlmo_large/venv}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[env] creating virtual environment in $VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip wheel "setuptools<80"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"

# Keep an existing torch (a cluster's CUDA build); otherwise take the build this machine kind
# provides locally (torch 2.14.1 + torchvision 0.29.1, see docs/CPU_STACK.md).
if ! python -c "import torch, torchvision" >/dev/null 2>&1; then
  echo "[env] installing torch"
  pip install -q "torch==${VLMO_TORCH_VERSION:-2.14.1}" "torchvision==${VLMO_TORCHVISION_VERSION:-0.29.1}"
fi

STAMP="$VENV/.vlmo_large_installed"
WANT="$(cat "$REPO/setup.py" | sha1sum | cut -d' ' -f1) $REPO"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[env] installing vlmo_large and its dependencies"
  pip install -q -e "$REPO[test]"
  echo "$WANT" > "$STAMP"
fi

export MLFLOW_DISABLE_TELEMETRY=true
export DO_NOT_TRACK=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
