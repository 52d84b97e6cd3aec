#!/usr/bin/env bash
# Installs metaquant and everything its main job and tests need, on a fresh Debian/Ubuntu machine with
# Python >= 3.10. Safe to run again: each step is skipped when already done.
#   - torch: a CPU build when none is installed (torch==2.13.0; install your own CUDA build first to use a GPU)
#   - metaquant itself, editable, with the test and plotting extras
#   - Fashion-MNIST from Debian's dataset-fashion-mnist package (needs root or sudo for apt-get)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  "$PYTHON" -m pip install --quiet "torch==2.13.0"
fi
"$PYTHON" -m pip install --quiet -e ".[test,plot]"

if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
"$PYTHON" -c "import metaquant, torch; print(f'metaquant {metaquant.__version__} with torch {torch.__version__} ready')"
