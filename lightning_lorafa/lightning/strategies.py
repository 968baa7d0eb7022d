"""LoRA-FA under Lightning's distributed strategies: DDP, FSDP1 (``strategy="fsdp"``) and FSDP2.

Only the frozen base weights need sharding; B, its gradient and its AdamW moments are small.

- DDP all-reduces the gradients of trainable tensors only (B and ``modules_to_save``).
- FSDP2 (``ModelParallelStrategy`` + ``fully_shard``) shards each parameter by rows: B (d_out, r) becomes
  a row-sharded DTensor and ``LoraFAOptimizer`` corrects each rank's rows with the full r x r matrix.
  A is a buffer, which ``fully_shard`` leaves whole on every rank.
- FSDP1 flattens a unit's parameters into one vector and shards that, so a rank may hold a ragged piece
  of B. The correction therefore runs in backward (``LoraFALinear.correct_in_backward``), on each rank's
  full local gradient before FSDP reduce-scatters it; the correction is linear, so this equals correcting
  the reduced gradient.

Checkpoints hold only the adapter. ``LoraFAModelParallelStrategy`` saves and loads them under FSDP2
(full file or sharded directory); ``AtomicCheckpointIO`` (``checkpoints.py``) writes checkpoint files by
temp-file-and-rename.
Building a sharded model in ``configure_model`` (convert first, then ``fully_shard``) is
``lightning_lorafa.lightning.sharding``.
This module does not depend on the ``LoraFA`` callback; the callback uses its checks.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, Strategy
from torch import nn

from lightning_lorafa import _compat
from lightning_lorafa.adapters.base import FROZEN
from lightning_lorafa.adapters.find import lorafa_adapters, lorafa_layers
from lightning_lorafa.lightning.checkpoints import ADAPTER_ONLY_MARKER, AtomicCheckpointIO, module_adapter_keys
from lightning_lorafa.model.adapter_state import check_adapter_state
from lightning_lorafa.model.safe_load import load_checkpoint_file, load_sharded


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` holds FSDP2/tensor-parallel (DTensor) parameters or FSDP1-wrapped modules."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters()) or any(
        isinstance(m, FullyShardedDataParallel) for m in model.modules()
    )


def check_not_sharded(model: nn.Module) -> None:
    """Raise ``RuntimeError`` when an unconverted ``model`` is already sharded: LoRA-FA layers must exist first."""
    if is_sharded(model):
        raise RuntimeError(
            f"LoraFA: {type(model).__name__} is already sharded (DTensor parameters or FSDP-wrapped modules) but "
            "not converted to LoRA-FA. Convert before sharding: in configure_model, call "
            "lightning_lorafa.convert_before_sharding(self) after building the model and before fully_shard(...)."
        )


def _is_sharding_strategy(strategy: Strategy) -> bool:
    return isinstance(strategy, (FSDPStrategy, ModelParallelStrategy))


def prepare_for_strategy(model: nn.Module, strategy: Strategy, gradient_correction: bool = True) -> None:
    """Set up the LoRA-FA layers of a converted ``model`` for ``strategy``.

    Under FSDP1 (``FSDPStrategy``) each layer corrects B's gradient in backward (see the module docstring); under
    FSDP2 (``ModelParallelStrategy``) the fused experts do (``correct_experts_in_backward``).

    Raises:
        ValueError: FSDP1 without ``use_orig_params=True`` (frozen and trainable tensors share flat parameters,
            which FSDP1 supports only with the original parameters exposed).
    """
    if isinstance(strategy, ModelParallelStrategy):
        correct_experts_in_backward(model, gradient_correction)
    if not isinstance(strategy, FSDPStrategy):
        return
    if not strategy.kwargs.get("use_orig_params", False):
        raise ValueError(
            "LoraFA under FSDPStrategy needs use_orig_params=True: LoRA-FA keeps frozen W and A next to the trainable "
            "B in one FSDP unit. Pass FSDPStrategy(use_orig_params=True) (Lightning's default), or use "
            "ModelParallelStrategy with fully_shard (FSDP2)."
        )
    for layer in lorafa_layers(model).values():
        layer.correct_in_backward = gradient_correction
    correct_experts_in_backward(model, gradient_correction)


def correct_experts_in_backward(model: nn.Module, gradient_correction: bool = True) -> None:
    """Have every fused experts adapter of ``model`` correct B's gradient in backward, on the whole (E, d_out, r)
    gradient: a sharded strategy splits B (E, d_out, r) along the experts, where each rank's rows would need
    their own experts' (r, r) matrices."""
    for adapter in lorafa_adapters(model).values():
        if adapter.lora_B.ndim == 3:  # a fused experts projection: (E, d_out, r)
            adapter.correct_in_backward = gradient_correction


def keep_lora_A_out_of_ddp_buffer_sync(module: nn.Module) -> list[str]:
    """Have DDP skip the LoRA-FA ``lora_A`` buffers of ``module`` (the module DDP will wrap) when it broadcasts
    buffers from rank 0 before every forward (``broadcast_buffers=True``, its default); return their names.

    A is frozen and every rank draws the same A from its layer's seed (or loads the same adapter), so that
    broadcast, all of A at every step (LLaMA-7B, r 64: 146 MB in bf16), moves nothing new. The model's other
    buffers are still broadcast. Call it before DDP wraps the module.
    """
    names = [f"{name}.{FROZEN}" for name in lorafa_adapters(module)]
    return names if _compat.ddp_ignore_params_and_buffers(module, names) else []


def check_resume_supported(trainer: pl.Trainer, adapter_only_checkpoints: bool) -> None:
    """Raise ``ValueError`` when resuming an adapter-only checkpoint with a plain ``ModelParallelStrategy``.

    Lightning's ``ModelParallelStrategy`` loads every tensor of the model, while an adapter-only checkpoint
    holds only the adapter; ``LoraFAModelParallelStrategy`` loads it.
    """
    strategy = trainer.strategy
    if (
        adapter_only_checkpoints
        and trainer.ckpt_path is not None
        and isinstance(strategy, ModelParallelStrategy)
        and not isinstance(strategy, LoraFAModelParallelStrategy)
    ):
        raise ValueError(
            f"Resuming from {trainer.ckpt_path} with ModelParallelStrategy: LoraFA checkpoints hold only the adapter, "
            "which this strategy cannot load. Use lightning_lorafa.LoraFAModelParallelStrategy(...) (same arguments), "
            "or LoraFA(adapter_only_checkpoints=False) for full checkpoints."
        )


class LoraFAModelParallelStrategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` (FSDP2) whose checkpoints hold only the LoRA-FA adapter.

    Saving gathers (``save_distributed_checkpoint=False``, the default here: the adapter is small) or writes
    per-rank shards of only the trainable tensors and the A buffers, never the frozen base weights; the
    ``LoraFA`` callback keeps the adapter keys. Loading fills just those tensors into the freshly built,
    sharded model and restores the optimizer state. Full files are written by ``AtomicCheckpointIO``; a
    sharded directory is written beside the target and swapped in by two renames.
    """

    def __init__(self, *args: Any, save_distributed_checkpoint: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)
        #: Checkpoints are directories of shards (True) or one full file written by rank 0 (False).
        self.saves_distributed_checkpoint = save_distributed_checkpoint
        self.checkpoint_io = AtomicCheckpointIO()

    def _adapter_keys(self) -> set[str]:
        """State-dict keys of the LightningModule's adapter (``checkpoint.module_adapter_keys``)."""
        assert self.model is not None
        return set(module_adapter_keys(self.model))

    def lightning_module_state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        assert self.model is not None
        keys = self._adapter_keys()
        options = StateDictOptions(
            full_state_dict=not self.saves_distributed_checkpoint, cpu_offload=True, ignore_frozen_params=True
        )
        return {key: value for key, value in get_model_state_dict(self.model, options=options).items() if key in keys}

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        if not self.saves_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(filepath))
        tmp, old = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
        if self.is_global_zero and tmp.exists():
            shutil.rmtree(tmp)
        self.barrier()
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier()
        if self.is_global_zero:
            if path.exists():
                os.replace(path, old)
            os.replace(tmp, path)
            if old.is_dir():
                shutil.rmtree(old)
            elif old.exists():
                old.unlink()
        self.barrier()

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        assert self.model is not None
        if not _compat.HAS_SHARDED_CHECKPOINTS:
            raise RuntimeError(
                "LoraFAModelParallelStrategy cannot load checkpoints with this Lightning version: "
                f"{_compat.missing_features['sharded_checkpoints']}. Install lightning 2.5-2.6, or resume with "
                "ModelParallelStrategy and LoraFA(adapter_only_checkpoints=False)."
            )
        path = Path(self.broadcast(checkpoint_path))
        keys = self._adapter_keys()
        own = {key: value for key, value in get_model_state_dict(self.model).items() if key in keys}
        safe = weights_only is not False  # torch's and Lightning's default: weights-only
        if _compat.is_sharded_checkpoint(path):
            load_sharded({"state_dict": own}, path, safe)
            set_model_state_dict(self.model, own, options=StateDictOptions(strict=False))
            for idx, optimizer in enumerate(self.optimizers):
                state = {f"optimizer_{idx}": get_optimizer_state_dict(self.model, optimizer)}
                load_sharded(state, path, safe)
                set_optimizer_state_dict(self.model, optimizer, optim_state_dict=state[f"optimizer_{idx}"])
            return load_checkpoint_file(path / _compat.CHECKPOINT_METADATA_FILENAME, safe)

        checkpoint = load_checkpoint_file(path, safe)
        saved = {key: value for key, value in checkpoint.pop("state_dict").items()}
        saved.pop(ADAPTER_ONLY_MARKER, None)
        r = next((adapter.r for adapter in lorafa_adapters(self.lightning_module).values()), 0)
        check_adapter_state(own, saved, f"The checkpoint {path}", r)
        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(self.model, saved, options=options)
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"], strict=True):
            state = _compat.rekey_optimizer_state_if_needed(state, self.model)
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=state, options=options)
        return checkpoint
