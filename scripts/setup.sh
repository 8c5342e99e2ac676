#!/usr/bin/env bash
# One-command setup on a fresh machine: system data (where the OS allows), a virtual
# environment in .venv, torch, and the package with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages from Debian where the OS allows it: Fashion-MNIST (the offline default
# dataset) and Chromium (the neighbour-gallery page is checked in a real headless browser).
# Skipped without apt or root; snca then needs --data-dir and the browser test fails loudly.
if command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
  missing=()
  for pkg in dataset-fashion-mnist chromium fonts-dejavu-core; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ] && $SUDO true 2>/dev/null; then
    $SUDO apt-get update -qq || true
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" \
      || echo "setup: could not install ${missing[*]} with apt-get" >&2
  fi
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q -e ".[test,bench,tensorboard]"
echo "setup: done (.venv ready)"
