#!/usr/bin/env bash
# Every GPU check of the project in one run, about 8 minutes on one H100/H200: the CUDA tests, then the
# memory/speed benchmark at the paper's settings (eager), then PEFT LoRA and ours under torch.compile.
# Results go to $OUT (default outputs/gpu). Packages missing on the machine can come as wheels in .whl/
# (see benchmarks/README.md); they are installed into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers, peft; print(torch.__version__, triton.__version__, transformers.__version__, peft.__version__)" | tee -a "$OUT/gpu.txt"

timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_dropout.py tests/test_layer.py \
  tests/test_memory.py tests/test_attention.py tests/test_compile.py tests/test_quantization.py \
  2>&1 | tee "$OUT/cuda-tests.txt"
timeout 180 python3 benchmarks/memory_speed.py --device cuda --models '["roberta-base"]' --compile true --repeats 5 \
  --output_dir "$OUT/roberta-base" 2>&1 | tail -n 30
timeout 90 python3 benchmarks/memory_speed.py --device cuda --models '["roberta-large","t5-base"]' --repeats 5 \
  --output_dir "$OUT/large-t5" 2>&1 | tail -n 30
timeout 180 python3 benchmarks/memory_speed.py --device cuda --models '["llama-7b"]' --cuda_layers 4 --compile true \
  --repeats 3 --output_dir "$OUT/llama4" 2>&1 | tail -n 30
