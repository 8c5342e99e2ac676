#!/usr/bin/env bash
# One-command setup on a fresh machine: system data (where the OS allows), a virtual
# environment in .venv, torch, and the package with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

# Fashion-MNIST from Debian (the offline default dataset). Skipped where apt is absent
# or we are not root; snca then falls back to --data-dir or a torchvision download.
if command -v apt-get >/dev/null 2>&1 && [ ! -d /usr/share/datasets/fashion-mnist ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
  if $SUDO true 2>/dev/null; then
    $SUDO apt-get update -qq || true
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist \
      || echo "setup: could not install dataset-fashion-mnist; pass --data-dir to snca" >&2
  fi
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q -e ".[test,bench,tensorboard]"
echo "setup: done (.venv ready)"
