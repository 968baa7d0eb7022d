"""lightning-lorafa: LoRA-FA fine-tuning for PyTorch Lightning.

``Trainer(callbacks=[LoraFA(r=8)])`` converts the model's linear layers to ``LoraFALinear`` (frozen W
and A, trainable B), trains B with your own optimizer and B's gradient corrected before each step, and
checkpoints only the adapter. Without Lightning: ``prepare_model(model, r=8)``, any optimizer over the
trainable parameters, ``attach_gradient_correction(optimizer, model)``.
"""

import logging as _logging

from lightning.fabric.utilities.rank_zero import rank_zero_only as _rank_zero_only

from lightning_lorafa.callback import LoraFA
from lightning_lorafa.checkpoint import (
    AtomicCheckpointIO,
    TrainingState,
    adapter_state_dict,
    load_adapter,
    load_from_checkpoint,
    save_adapter,
)
from lightning_lorafa.convert import (
    LoraFAConfig,
    apply_lorafa,
    count_parameters,
    find_target_modules,
    find_task_heads,
    get_lorafa_config,
    lorafa_experts,
    lorafa_layers,
    lorafa_modules,
    merge_lorafa,
)
from lightning_lorafa.distributed import LoraFAModelParallelStrategy
from lightning_lorafa.experts import LoraFAExperts
from lightning_lorafa.layer import LoraFALinear
from lightning_lorafa.optim import LoraFAOptimizer, correct_gradient, create_lorafa_optimizer
from lightning_lorafa.peft_export import export_peft
from lightning_lorafa.prepare import Preparation, attach_gradient_correction, prepare_model
from lightning_lorafa.quantization import keep_no_quantized_inputs, load_quantized_model, quantization_config
from lightning_lorafa.recompute import apply_recompute
from lightning_lorafa.router import LoraFARouter
from lightning_lorafa.settings import AdapterSettings, LoraFASettings
from lightning_lorafa.sharding import convert_before_sharding, fully_shard_blocks, transformer_block_classes

__all__ = [
    "AdapterSettings",
    "AtomicCheckpointIO",
    "LoraFA",
    "LoraFAConfig",
    "LoraFAExperts",
    "LoraFALinear",
    "LoraFAModelParallelStrategy",
    "LoraFAOptimizer",
    "LoraFARouter",
    "LoraFASettings",
    "Preparation",
    "TrainingState",
    "adapter_state_dict",
    "apply_lorafa",
    "apply_recompute",
    "attach_gradient_correction",
    "convert_before_sharding",
    "correct_gradient",
    "count_parameters",
    "create_lorafa_optimizer",
    "export_peft",
    "find_target_modules",
    "find_task_heads",
    "fully_shard_blocks",
    "get_lorafa_config",
    "keep_no_quantized_inputs",
    "load_adapter",
    "load_from_checkpoint",
    "load_quantized_model",
    "lorafa_experts",
    "lorafa_layers",
    "lorafa_modules",
    "merge_lorafa",
    "prepare_model",
    "quantization_config",
    "save_adapter",
    "transformer_block_classes",
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
