"""The adapters in a model: what every other part of the library iterates over, never their tensor names."""

from __future__ import annotations

from torch import nn

from lightning_lorafa import _compat
from lightning_lorafa.adapters.base import LoraFAAdapter
from lightning_lorafa.adapters.experts import LoraFAExperts
from lightning_lorafa.adapters.linear import LoraFALinear


def lorafa_adapters(model: nn.Module) -> dict[str, LoraFAAdapter]:
    """Every adapter of ``model`` (an A and a B: a ``LoraFALinear``, or one projection of fused experts), by module
    name, in model order; of a ``torch.compile``d model, those of the model it compiled."""
    return {name: m for name, m in _compat.uncompiled(model).named_modules() if isinstance(m, LoraFAAdapter)}


def lorafa_modules(model: nn.Module) -> dict[str, LoraFALinear | LoraFAExperts]:
    """Every module of ``model`` that replaced one of its own modules (``LoraFALinear``, routers' and
    ``nn.MultiheadAttention``'s included, and ``LoraFAExperts``), by name, in model order."""
    return {
        name: m for name, m in _compat.uncompiled(model).named_modules() if isinstance(m, (LoraFALinear, LoraFAExperts))
    }


def lorafa_layers(model: nn.Module) -> dict[str, LoraFALinear]:
    """The ``LoraFALinear`` modules of ``model`` (routers' and ``nn.MultiheadAttention``'s included), by name."""
    return {name: m for name, m in lorafa_modules(model).items() if isinstance(m, LoraFALinear)}


def lorafa_experts(model: nn.Module) -> dict[str, LoraFAExperts]:
    """The ``LoraFAExperts`` modules of ``model``, by name."""
    return {name: m for name, m in lorafa_modules(model).items() if isinstance(m, LoraFAExperts)}
