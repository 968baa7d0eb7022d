"""Preparing a model for LoRA-FA training, the same way from every entry point.

``prepare_model(model, settings)`` is what the ``LoraFA`` callback runs on ``setup``, and what Lightning
Fabric and plain PyTorch users call themselves: convert the target linears (``apply_lorafa``), make a
quantized base keep no inputs, choose the attention implementation, make the model's dropouts keep a seed
instead of a mask, and recompute what ``recompute`` asks for. Each step logs what it did, by name, and what
it left out.
"""

from __future__ import annotations

import logging

from torch import nn

from lightning_lorafa.attention import use_seeded_dropout_attention
from lightning_lorafa.dropout import replace_dropout

log = logging.getLogger(__name__)


def keep_dropout_seeds(model: nn.Module) -> list[str]:
    """Make every dropout of ``model`` that the library can reach keep a seed instead of a mask.

    ``nn.Dropout`` modules become ``RecomputedDropout`` (``replace_dropout``); transformers models on eager or
    SDPA attention switch to the attention that keeps a seed (``use_seeded_dropout_attention``). Returns the
    dotted names changed; models whose attention stays as it was are logged with the reason.
    """
    changed = replace_dropout(model)
    switched, kept = use_seeded_dropout_attention(model)
    for name, reason in kept.items():
        log.info("LoRA-FA: attention dropout of %s keeps its mask: %s", name, reason)
    return changed + switched
