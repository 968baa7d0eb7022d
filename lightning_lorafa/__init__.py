"""lightning-lorafa: LoRA-FA fine-tuning for PyTorch Lightning.

``Trainer(callbacks=[LoraFA(r=8)])`` converts the model's linear layers to ``LoraFALinear`` (frozen W
and A, trainable B), trains B with your own optimizer and B's gradient corrected before each step, and
checkpoints only the adapter. Without Lightning: ``prepare_model(model, r=8)``, any optimizer over the
trainable parameters, ``attach_gradient_correction(optimizer, model)``.

The package's layers, each importing only those below it: ``adapters`` (the math), ``model`` (model-level
operations), ``lightning`` (the Lightning integration) and ``tasks`` (the recipes: task modules, the ``lorafa``
command; their packages are the ``recipes`` extra).
"""

import logging as _logging

from lightning.fabric.utilities.rank_zero import rank_zero_only as _rank_zero_only

from lightning_lorafa.adapters.find import lorafa_modules
from lightning_lorafa.adapters.linear import LoraFALinear
from lightning_lorafa.lightning.callback import LoraFA
from lightning_lorafa.lightning.checkpoints import AtomicCheckpointIO, load_from_checkpoint
from lightning_lorafa.lightning.memory_report import MemoryReport
from lightning_lorafa.lightning.sharding import convert_before_sharding, fully_shard_blocks
from lightning_lorafa.lightning.strategies import LoraFAModelParallelStrategy
from lightning_lorafa.model.adapter_state import TrainingState, load_adapter, save_adapter
from lightning_lorafa.model.convert import (
    apply_lorafa,
    count_parameters,
    get_lorafa_config,
    merge_lorafa,
    prepare_model,
)
from lightning_lorafa.model.optim import LoraFAOptimizer, attach_gradient_correction, create_lorafa_optimizer
from lightning_lorafa.model.peft_export import export_peft
from lightning_lorafa.model.quantization import load_quantized_model
from lightning_lorafa.settings import LoraFASettings

__all__ = [
    "AtomicCheckpointIO",
    "LoraFA",
    "LoraFALinear",
    "LoraFAModelParallelStrategy",
    "LoraFAOptimizer",
    "LoraFASettings",
    "MemoryReport",
    "TrainingState",
    "apply_lorafa",
    "attach_gradient_correction",
    "convert_before_sharding",
    "count_parameters",
    "create_lorafa_optimizer",
    "export_peft",
    "fully_shard_blocks",
    "get_lorafa_config",
    "load_adapter",
    "load_from_checkpoint",
    "load_quantized_model",
    "lorafa_modules",
    "merge_lorafa",
    "prepare_model",
    "save_adapter",
]


def _show_log_lines() -> None:
    """Show the library's log lines (what it converted, trains fully, leaves out, keeps) as Lightning shows its own:
    INFO and above, on stderr when the application has configured no logging, else through the root logger's
    handlers; on rank 0 only, so a multi-process run prints each line once."""
    logger = _logging.getLogger(__name__)
    logger.setLevel(_logging.INFO)
    logger.addFilter(lambda record: getattr(_rank_zero_only, "rank", 0) == 0)
    if not _logging.getLogger().hasHandlers():
        logger.addHandler(_logging.StreamHandler())
        logger.propagate = False


_show_log_lines()
