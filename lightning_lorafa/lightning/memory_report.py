"""``MemoryReport``: what a training step keeps for backward, and how fast the steps run.

``Trainer(callbacks=[LoraFA(r=8), MemoryReport()])`` (or ``LoraFA(report_memory=True)``) logs the saved-for-backward
bytes of the first training step by op, and at the end of training the tokens/s of the timed steps (from the second
on) and, on CUDA, the peak allocated memory.
"""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_lorafa.profiling import SavedActivationRecorder


class MemoryReport(pl.Callback):
    """Log the first training step's saved-for-backward bytes by op, then tokens/s and, on CUDA, peak memory.

    Example::

        trainer = pl.Trainer(callbacks=[LoraFA(r=8), MemoryReport()])
    """

    def __init__(self) -> None:
        self._recorder: SavedActivationRecorder | None = None
        self._timing: dict[str, float] = {}

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._timing:
            self._recorder = SavedActivationRecorder(pl_module).__enter__()
            self._timing = {"steps": 0, "tokens": 0, "start": 0.0}
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
        elif self._timing["steps"] == 0:  # time from the second step on: the first one warms up
            _synchronize()
            self._timing["start"] = time.perf_counter()
        if self._timing["start"]:
            self._timing["steps"] += 1
            self._timing["tokens"] += _count_tokens(batch)

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if self._recorder is not None:
            self._recorder.__exit__(None, None, None)
            rank_zero_info(f"LoRA-FA: saved for backward in the first training step:\n{self._recorder.report()}")
            self._recorder = None

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._timing.get("start"):
            return
        _synchronize()
        seconds = time.perf_counter() - self._timing["start"]
        message = f"LoRA-FA: {self._timing['steps']} timed steps, {self._timing['tokens'] / seconds:,.0f} tokens/s"
        if torch.cuda.is_available():
            message += f", peak CUDA memory allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
        rank_zero_info(message)


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _count_tokens(batch: Any) -> int:
    """Tokens in a batch: ``input_ids`` of a mapping, or the first tensor of a sequence (its element count)."""
    if isinstance(batch, dict) and isinstance(batch.get("input_ids"), torch.Tensor):
        return batch["input_ids"].numel()
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0].numel()
    return 0
