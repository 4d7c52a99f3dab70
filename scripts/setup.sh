#!/usr/bin/env bash
# Sets up fxprune on a fresh machine: the Fashion-MNIST Debian package, a virtual environment in .venv,
# torch pinned to the local CPU wheel (an unpinned torch pulls a multi-GB CUDA build), then the project.
# Usage: bash scripts/setup.sh [EXTRAS]   (EXTRAS defaults to "test,demo"; "bench" adds Torch-Pruning and the fortunes text)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test,demo}"
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "setup: Fashion-MNIST missing; run as root: apt-get install -y dataset-fashion-mnist" >&2
  fi
fi
if [[ ",${extras}," == *",bench,"* ]] && [ ! -d /usr/share/games/fortunes ]; then
  # benchmarks/llm.py trains its language model on the English text of the Debian package "fortunes"
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fortunes >/dev/null
  else
    echo "setup: the fortunes text (benchmarks/llm.py) is missing; run as root: apt-get install -y fortunes" >&2
  fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -c scripts/constraints.txt -e ".[${extras}]"
echo "setup: done (.venv, extras: ${extras})"
