"""Building a sharded LoRA-FA model in ``configure_model`` (FSDP2): convert first, then ``fully_shard`` each block.

LoRA-FA layers must exist before ``fully_shard`` runs, so that a block's frozen W, its A buffer and its trainable B
are sharded together. ``convert_before_sharding`` converts with the settings of the trainer's ``LoraFA`` callback;
``fully_shard_blocks`` then shards each transformer block (``transformer_block_classes``) and the root.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
from torch import nn

from lightning_lorafa import _compat
from lightning_lorafa.adapters.find import lorafa_layers
from lightning_lorafa.lightning.callback import LoraFA
from lightning_lorafa.model.convert import get_lorafa_config


def convert_before_sharding(pl_module: pl.LightningModule) -> list[str]:
    """Convert (prepare) ``pl_module``'s model now with the settings of the trainer's ``LoraFA`` callback.

    A LightningModule that builds its model in ``configure_model`` calls it at the end of that hook (a callback
    cannot run after it), before ``fully_shard`` when it shards::

        def configure_model(self):
            self.model = build_model()
            convert_before_sharding(self)
            fully_shard_blocks(self.model, self.device_mesh["data_parallel"])

    Returns the converted module names. Raises ``RuntimeError`` when the trainer has no ``LoraFA`` callback.
    """

    callbacks = [c for c in pl_module.trainer.callbacks if isinstance(c, LoraFA)]
    if not callbacks:
        raise RuntimeError("convert_before_sharding: the trainer has no LoraFA callback; add LoraFA(...) to callbacks.")
    callbacks[0].setup(pl_module.trainer, pl_module, pl_module.trainer.state.fn or "fit")
    return list(get_lorafa_config(callbacks[0].lorafa_model(pl_module)[0]).target_modules)


def transformer_block_classes(model: nn.Module) -> set[type[nn.Module]]:
    """The transformer block classes of a transformers model (its ``_no_split_modules`` found in it).

    Use them as FSDP1's ``auto_wrap_policy`` (``FSDPStrategy(auto_wrap_policy=...)``) or FSDP2 units.

    Raises:
        ValueError: the model names no block classes, or none of them occurs in it.
    """
    names = set(_compat.no_split_modules(model))
    # By the classes a module is an instance of: recompute="mlp" gives a BERT/RoBERTa layer a subclass.
    found = {type(m) for m in model.modules() if any(c.__name__ in names for c in type(m).__mro__)}
    if not found:
        raise ValueError(
            f"{type(model).__name__} names no transformer block classes (_no_split_modules={sorted(names)}) that "
            "occur in it; pass the block classes yourself (e.g. {LlamaDecoderLayer})."
        )
    return found


def fully_shard_blocks(
    model: nn.Module, mesh: Any = None, blocks: Iterable[type[nn.Module]] | None = None, **kwargs: Any
) -> nn.Module:
    """FSDP2: ``fully_shard`` each transformer block of a converted ``model``, then the model itself.

    Each block is one all-gather unit; its frozen W, A buffer and trainable B stay together.

    Args:
        mesh: the data-parallel device mesh (in a LightningModule: ``self.device_mesh["data_parallel"]``).
        blocks: block classes; default ``transformer_block_classes(model)``.
        kwargs: passed to ``fully_shard`` (e.g. ``mp_policy``, ``reshard_after_forward``).

    Raises:
        ValueError: ``model`` has no LoRA-FA layers (convert it first: sharding comes last).
    """
    from torch.distributed.fsdp import fully_shard

    if not lorafa_layers(model):
        raise ValueError(
            f"{type(model).__name__} has no LoRA-FA layers: convert it (convert_before_sharding(self) or apply_lorafa) "
            "before fully_shard_blocks."
        )
    classes = tuple(blocks) if blocks is not None else tuple(transformer_block_classes(model))
    for module in model.modules():
        if isinstance(module, classes):
            fully_shard(module, mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)
    return model
