"""Choosing the attention implementation of a transformers model.

``set_attention_implementation(model, "auto")`` picks FlashAttention-2 where flash-attn, the model and the
device allow it, otherwise PyTorch SDPA (whose own flash and memory-efficient kernels run on CUDA),
otherwise eager, and switches already-built models with ``PreTrainedModel.set_attn_implementation``.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import is_flash_attn_2_available

from lightning_lorafa.dropout import RECOMPUTED_DROPOUT_SDPA

log = logging.getLogger(__name__)

IMPLEMENTATIONS = ("auto", "flash_attention_2", "sdpa", "eager")


def pretrained_models(model: nn.Module) -> list[PreTrainedModel]:
    """The outermost ``PreTrainedModel`` instances in ``model`` (itself, or e.g. those a LightningModule holds)."""
    found: list[PreTrainedModel] = []
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and not any(module in outer.modules() for outer in found):
            found.append(module)
    return found


def set_attention_implementation(
    model: nn.Module, implementation: str = "auto", device: torch.device | str | None = None
) -> str:
    """Switch every transformers model inside ``model`` to an attention implementation; return and log it.

    ``"auto"``: ``"flash_attention_2"`` when flash-attn is installed, the model supports it and ``device`` is
    a CUDA GPU of compute capability 8.0 or newer; otherwise ``"sdpa"`` when the model supports it; otherwise
    ``"eager"``. ``device`` is where the model will run (default: where its first parameter is; pass the
    trainer's root device when the model has not been moved yet). A model already switched to
    ``RECOMPUTED_DROPOUT_SDPA`` by ``replace_dropout`` keeps it when the choice is ``"sdpa"`` or ``"eager"``.

    Returns ``"unchanged"`` for ``"auto"`` when ``model`` holds no transformers model.
    Raises ``ValueError`` for an unknown value, for an explicit value on a model without a transformers
    model, or for one the model, the device or the installed packages cannot run (e.g. T5 with
    ``"flash_attention_2"``: its relative position bias is added to the attention scores, which FlashAttention
    does not take).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation={implementation!r} is not one of {IMPLEMENTATIONS}.")
    targets = pretrained_models(model)
    if not targets:
        if implementation != "auto":
            raise ValueError(
                f"attn_implementation={implementation!r} needs a transformers PreTrainedModel, and "
                f"{type(model).__name__} holds none; use 'auto' to leave its attention unchanged."
            )
        log.info("attention implementation: unchanged (%s holds no transformers model)", type(model).__name__)
        return "unchanged"
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    chosen = [_choose(target, implementation, device) for target in targets]
    for target, name in zip(targets, chosen, strict=True):
        if target.config._attn_implementation == RECOMPUTED_DROPOUT_SDPA and name in ("sdpa", "eager"):
            name = RECOMPUTED_DROPOUT_SDPA
        target.set_attn_implementation(name)
        if target.config._attn_implementation != name:
            raise ValueError(f"{type(target).__name__} cannot switch its attention implementation to {name!r}.")
    result = targets[0].config._attn_implementation
    log.info("attention implementation: %s (requested %r, device %s)", result, implementation, device)
    return result


def _choose(model: PreTrainedModel, implementation: str, device: torch.device) -> str:
    """The implementation ``set_attention_implementation`` gives ``model``; raises ``ValueError`` if unusable."""
    name = type(model).__name__
    flash_device = device.type == "cuda" and torch.cuda.is_available()
    flash_device = flash_device and torch.cuda.get_device_capability(device)[0] >= 8
    if implementation == "auto":
        if model._supports_flash_attn and flash_device and is_flash_attn_2_available():
            return "flash_attention_2"
        return "sdpa" if model._supports_sdpa else "eager"
    if implementation == "flash_attention_2":
        if not model._supports_flash_attn:
            raise ValueError(f"{name} does not support flash_attention_2; use 'sdpa' or 'auto'.")
        if not is_flash_attn_2_available():
            raise ValueError("flash_attention_2 needs flash-attn (`pip install lightning-lorafa[flash]`); use 'sdpa'.")
        if not flash_device:
            raise ValueError(f"flash_attention_2 needs a CUDA GPU of compute capability 8.0+, not {device}.")
    if implementation == "sdpa" and not model._supports_sdpa:
        raise ValueError(f"{name} does not support sdpa; use 'eager' or 'auto'.")
    return implementation
