"""Quantized frozen base weights (QLoRA style) under LoRA-FA: 4-bit NF4 with double quantization, or 8-bit.

The base model is loaded quantized by transformers + bitsandbytes (CUDA only); ``apply_lorafa`` then wraps
its ``Linear4bit``/``Linear8bitLt`` layers like any ``nn.Linear``. A and B stay in float32; the branch
computes in the activations' dtype. bitsandbytes is imported only here, when quantization is asked for.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn

#: Accepted values of ``quantization``: 4-bit NormalFloat with double quantization, or LLM.int8().
QUANTIZATION_KINDS = ("nf4", "int8")


def require_bitsandbytes(kind: str) -> None:
    """Raise ``RuntimeError`` naming everything missing for bitsandbytes quantization: the package, CUDA."""
    problems = []
    try:
        importlib.import_module("bitsandbytes")
    except ImportError:
        problems.append("the bitsandbytes package is not installed (pip install 'lightning-lorafa[quant]')")
    if not torch.cuda.is_available():
        problems.append("no CUDA GPU is available (torch.cuda.is_available() is False)")
    if problems:
        raise RuntimeError(
            f"quantization={kind!r} runs the frozen base on bitsandbytes' CUDA kernels, but {'; and '.join(problems)}. "
            "Train with quantization=None here, or on a CUDA machine with bitsandbytes installed."
        )


def quantization_config(kind: str | None, compute_dtype: torch.dtype = torch.bfloat16) -> Any:
    """A transformers ``BitsAndBytesConfig`` for ``kind`` (``"nf4"``, ``"int8"``), or None for ``kind=None``.

    ``"nf4"``: 4-bit NormalFloat weights with double quantization (the quantization constants quantized too),
    matmuls in ``compute_dtype``. ``"int8"``: LLM.int8() 8-bit weights.

    Raises:
        ValueError: unknown ``kind``.
        RuntimeError: bitsandbytes or CUDA is missing (the message says which).
    """
    if kind is None:
        return None
    if kind not in QUANTIZATION_KINDS:
        raise ValueError(f"quantization must be one of {QUANTIZATION_KINDS} or None, got {kind!r}.")
    require_bitsandbytes(kind)
    from transformers import BitsAndBytesConfig

    if kind == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def load_quantized_model(
    name_or_path: str,
    quantization: str | None = "nf4",
    auto_class: Any = None,
    compute_dtype: torch.dtype = torch.bfloat16,
    **kwargs: Any,
) -> nn.Module:
    """Load a transformers model with its weights quantized (``quantization_config``) on the current GPU.

    ``auto_class`` defaults to ``AutoModelForCausalLM``; ``kwargs`` go to ``from_pretrained``. Convert the
    result with ``apply_lorafa`` (or ``LoraFA``): the quantized linears become frozen LoRA-FA bases.

    Raises:
        ValueError, RuntimeError: as ``quantization_config``.
    """
    config = quantization_config(quantization, compute_dtype)
    if auto_class is None:
        from transformers import AutoModelForCausalLM

        auto_class = AutoModelForCausalLM
    if config is not None:
        kwargs.setdefault("device_map", {"": torch.cuda.current_device()})
    return auto_class.from_pretrained(name_or_path, quantization_config=config, dtype=compute_dtype, **kwargs)
