#!/usr/bin/env bash
# The GPU checks of the project, each part one run of at most about 9.5 minutes on one H100/H200 (the timeouts):
#   bash scripts/gpu_check.sh speed    # (default) CUDA tests, the benchmark at the paper's settings, eager and compiled
#   bash scripts/gpu_check.sh memory   # LLaMA-7B, 4 and 32 layers, with and without recompute="mlp" (H200: 141 GB)
#   bash scripts/gpu_check.sh llm      # chunked loss (Liger where its wheel is in .whl/), offload, Llama-3.2-1B shape
# Results go to $OUT (default outputs/gpu). Packages missing on the machine can come as wheels in .whl/
# (see benchmarks/README.md); they are installed into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
PART=${1:-speed}
OUT=${OUT:-outputs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers, peft; print(torch.__version__, triton.__version__, transformers.__version__, peft.__version__)" | tee -a "$OUT/gpu.txt"

if [ "$PART" = memory ]; then
  timeout 200 python3 benchmarks/memory_speed.py --device cuda --models '["llama-7b"]' --cuda_layers 4 \
    --recompute '["none","mlp"]' --repeats 3 --output_dir "$OUT/llama4-recompute" 2>&1 | tail -n 30
  timeout 300 python3 benchmarks/memory_speed.py --device cuda --models '["llama-7b"]' --cuda_layers 32 \
    --recompute '["none","mlp"]' --repeats 2 --output_dir "$OUT/llama32-recompute" 2>&1 | tail -n 30
  exit 0
fi
if [ "$PART" = llm ]; then
  timeout 90 python3 -m pytest -q -p no:cacheprovider tests/model/test_chunked_loss.py tests/model/test_offload.py \
    2>&1 | tee "$OUT/llm-tests.txt"
  timeout 450 python3 benchmarks/llm_memory.py --device cuda --dtype bfloat16 --models '[llama-3.2-1b]' --tokens 8192 \
    --steps 3 --alternate 3 --out "$OUT/llm" 2>&1 | tail -n 60
  exit 0
fi
timeout 110 python3 -m pytest -q -p no:cacheprovider tests/adapters/test_kernels.py tests/adapters/test_dropout.py tests/adapters/test_layer.py \
  tests/model/test_memory.py tests/model/test_attention.py tests/model/test_compile.py tests/model/test_quantization.py tests/adapters/test_cuda_graphs.py \
  2>&1 | tee "$OUT/cuda-tests.txt"
timeout 40 python3 -m pytest -q -p no:cacheprovider tests/model/test_recompute.py -k 4bit 2>&1 | tee -a "$OUT/cuda-tests.txt"
# every kind of adapted module (linear, Conv1D, fused experts, routers) and attention path through the callback
timeout 45 python3 -m pytest -q -p no:cacheprovider tests/model/test_models.py -k cuda 2>&1 | tee -a "$OUT/cuda-tests.txt"
timeout 40 python3 benchmarks/dropout_paths.py --device cuda --max_log2 25 --calls 10 --rounds 5 --output_dir "$OUT" 2>&1 | tail -n 20
timeout 170 python3 benchmarks/memory_speed.py --device cuda --models '["roberta-base"]' --compile true --repeats 5 \
  --output_dir "$OUT/roberta-base" 2>&1 | tail -n 30
timeout 80 python3 benchmarks/memory_speed.py --device cuda --models '["roberta-large","t5-base"]' --repeats 5 \
  --output_dir "$OUT/large-t5" 2>&1 | tail -n 30
timeout 150 python3 benchmarks/memory_speed.py --device cuda --models '["llama-7b"]' --cuda_layers 4 --compile true \
  --repeats 3 --output_dir "$OUT/llama4" 2>&1 | tail -n 30
