"""Quantized frozen base weights (QLoRA style) under LoRA-FA: 4-bit NF4 with double quantization, or 8-bit.

The base model is loaded quantized by transformers + bitsandbytes, on the current CUDA GPU or, where the
installed bitsandbytes has a CPU backend (0.50 has one), on CPU; ``apply_lorafa`` then wraps its
``Linear4bit``/``Linear8bitLt`` layers like any ``nn.Linear``. A and B stay in float32; the branch computes in
the activations' dtype. bitsandbytes is imported only here, when quantization is asked for.

``keep_no_quantized_inputs`` (applied by ``load_quantized_model``) makes the frozen quantized matmuls keep
no input for backward: bitsandbytes' int8 matmul keeps its input ``x`` (batch x seq x d_in) as a context
attribute whenever ``x`` needs a gradient, which would undo LoRA-FA's saving; and on CPUs with AVX512-BF16 a
no-grad forward of ``Linear4bit`` (validation) repacks its weight into an inference layout whose matmul has
no backward, so later training would silently drop the input gradient.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

import torch
from torch import nn

from lightning_lorafa.model.in_place import InPlaceSubclass

#: Accepted values of ``quantization``: 4-bit NormalFloat with double quantization, or LLM.int8().
QUANTIZATION_KINDS = ("nf4", "int8")


def bitsandbytes_runs_on_cpu() -> bool:
    """Whether the installed bitsandbytes has a CPU backend (it lists ``"cpu"`` in ``supported_torch_devices``)."""
    try:
        bnb = importlib.import_module("bitsandbytes")
    except ImportError:
        return False
    return "cpu" in getattr(bnb, "supported_torch_devices", ())


def quantization_device(kind: str) -> torch.device:
    """The device bitsandbytes runs ``kind`` on: the current CUDA GPU, else the CPU where bitsandbytes supports it.

    Raises:
        RuntimeError: naming everything missing: the package, or both CUDA and bitsandbytes' CPU backend.
    """
    try:
        bnb = importlib.import_module("bitsandbytes")
    except ImportError:
        bnb = None
    if bnb is not None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if bnb is not None and bitsandbytes_runs_on_cpu():
        return torch.device("cpu")
    problems = []
    if bnb is None:
        problems.append("the bitsandbytes package is not installed (pip install 'lightning-lorafa[quant]')")
    if not torch.cuda.is_available():
        problem = "no CUDA GPU is available (torch.cuda.is_available() is False)"
        if bnb is not None:
            problem += f" and bitsandbytes {getattr(bnb, '__version__', '?')} has no CPU backend"
        problems.append(problem)
    raise RuntimeError(
        f"quantization={kind!r} runs the frozen base on bitsandbytes' kernels, but {'; and '.join(problems)}. "
        "Train with quantization=None here, on a CUDA machine, or install a bitsandbytes with a CPU backend "
        "(pip install 'bitsandbytes>=0.50')."
    )


def require_bitsandbytes(kind: str) -> None:
    """Raise ``RuntimeError`` when bitsandbytes cannot run ``kind`` here (see ``quantization_device``)."""
    quantization_device(kind)


def quantization_config(kind: str | None, compute_dtype: torch.dtype = torch.bfloat16) -> Any:
    """A transformers ``BitsAndBytesConfig`` for ``kind`` (``"nf4"``, ``"int8"``), or None for ``kind=None``.

    ``"nf4"``: 4-bit NormalFloat weights with double quantization (the quantization constants quantized too),
    matmuls in ``compute_dtype``. ``"int8"``: LLM.int8() 8-bit weights.

    Raises:
        ValueError: unknown ``kind``.
        RuntimeError: bitsandbytes is missing, or it runs neither on CUDA here nor on CPU (the message says which).
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
    """Load a transformers model with its weights quantized (``quantization_config``) on the current GPU, or on
    CPU where bitsandbytes supports it, and make its quantized linears keep no input (``keep_no_quantized_inputs``).

    ``auto_class`` defaults to ``AutoModelForCausalLM``; ``kwargs`` go to ``from_pretrained`` (a ``device_map``
    given there wins). Convert the result with ``apply_lorafa`` (or ``LoraFA``): the quantized linears become
    frozen LoRA-FA bases.

    Raises:
        ValueError, RuntimeError: as ``quantization_config``.
    """
    config = quantization_config(quantization, compute_dtype)
    if auto_class is None:
        from transformers import AutoModelForCausalLM

        auto_class = AutoModelForCausalLM
    if config is not None:
        device = quantization_device(quantization)
        kwargs.setdefault("device_map", {"": device.index if device.type == "cuda" else "cpu"})
    model = auto_class.from_pretrained(name_or_path, quantization_config=config, dtype=compute_dtype, **kwargs)
    keep_no_quantized_inputs(model)
    return model


class _FrozenInt8Linear(torch.autograd.Function):
    """A frozen ``Linear8bitLt``: bitsandbytes' forward; backward ``dx = dy @ (CB * SCB / 127)`` keeping no input.

    bitsandbytes' own backward computes ``dx`` the same way, but its forward keeps ``x`` for a weight gradient
    that a frozen int8 weight never needs.
    """

    @staticmethod
    def forward(ctx, x, module, module_forward):  # noqa: D102
        ctx.module, ctx.x_shape, ctx.x_dtype = module, x.shape, x.dtype
        return module_forward(x)  # autograd is off here: bitsandbytes records nothing

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        state = ctx.module.state
        if state.CB is None:
            raise RuntimeError("Linear8bitLt lost its int8 weight (state.CB) before backward.")
        weight = state.CB.to(ctx.x_dtype, copy=True).mul_(state.SCB.unsqueeze(1).mul(1.0 / 127.0))  # (d_out, d_in)
        grad_x = torch.matmul(grad_out.reshape(-1, grad_out.shape[-1]).to(ctx.x_dtype), weight)
        return grad_x.view(ctx.x_shape), None, None


class Int8LinearKeepingNoInput(InPlaceSubclass):
    """Marks a ``Linear8bitLt`` whose class ``keep_no_quantized_inputs`` swapped for a subclass whose frozen
    forward runs under ``_FrozenInt8Linear`` (``<Class>KeepingNoInput``; see ``in_place``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        bitsandbytes_forward = super().forward
        if self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad):
            return bitsandbytes_forward(x)  # a trainable int8 layer needs bitsandbytes' own backward
        if not (torch.is_grad_enabled() and x.requires_grad):
            return bitsandbytes_forward(x)
        return _FrozenInt8Linear.apply(x, self, bitsandbytes_forward)


@functools.cache
def _keeping_no_input_class(cls: type) -> type:
    """``<cls>KeepingNoInput``: ``cls`` (a ``Linear8bitLt`` class) with ``Int8LinearKeepingNoInput``'s forward."""
    namespace = {"made_by": (_keeping_no_input_class, (cls,)), "__module__": __name__}
    return type(f"{cls.__name__}KeepingNoInput", (Int8LinearKeepingNoInput, cls), namespace)


def keep_no_quantized_inputs(model: nn.Module) -> int:
    """Make the frozen bitsandbytes linears of ``model`` keep no input for backward; returns how many changed.

    ``Linear8bitLt``: its class becomes a subclass whose forward runs under ``_FrozenInt8Linear`` when the layer
    is frozen (same output, same input gradient, no copy of ``x`` kept; ``Int8LinearKeepingNoInput``).
    ``Linear4bit``: keeps only its packed weight already; its CPU inference repacking is turned off, since a
    training forward after it has no backward. Idempotent; a model without bitsandbytes layers is left alone.
    """
    try:
        bnb = importlib.import_module("bitsandbytes")
    except ImportError:
        return 0
    changed = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear8bitLt) and not isinstance(module, Int8LinearKeepingNoInput):
            if "forward" in vars(module):
                raise ValueError(
                    f"keep_no_quantized_inputs: a {type(module).__name__} has its forward replaced on the instance "
                    f"({vars(module)['forward']!r}); remove that wrapper first."
                )
            module.__class__ = _keeping_no_input_class(type(module))
            changed += 1
        elif isinstance(module, bnb.nn.Linear4bit) and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed
