"""lightning-lorafa: LoRA-FA fine-tuning for PyTorch Lightning.

``Trainer(callbacks=[LoraFA(r=8)])`` converts the model's linear layers to ``LoraFALinear`` (frozen W
and A, trainable B), trains B with the gradient-corrected ``LoraFAOptimizer``, and checkpoints only
the adapter.
"""

from lightning_lorafa.callback import LoraFA
from lightning_lorafa.checkpoint import adapter_state_dict, load_adapter, save_adapter
from lightning_lorafa.convert import (
    LoraFAConfig,
    apply_lorafa,
    count_parameters,
    find_target_modules,
    get_lorafa_config,
    lorafa_layers,
    merge_lorafa,
)
from lightning_lorafa.distributed import AtomicCheckpointIO, LoraFAModelParallelStrategy
from lightning_lorafa.layer import LoraFALinear
from lightning_lorafa.optim import LoraFAOptimizer, correct_gradient, create_lorafa_optimizer
from lightning_lorafa.peft_export import export_peft
from lightning_lorafa.quantization import keep_no_quantized_inputs, load_quantized_model, quantization_config
from lightning_lorafa.recompute import apply_recompute
from lightning_lorafa.sharding import convert_before_sharding, fully_shard_blocks, transformer_block_classes

__all__ = [
    "AtomicCheckpointIO",
    "LoraFA",
    "LoraFAConfig",
    "LoraFALinear",
    "LoraFAModelParallelStrategy",
    "LoraFAOptimizer",
    "adapter_state_dict",
    "apply_lorafa",
    "apply_recompute",
    "convert_before_sharding",
    "correct_gradient",
    "count_parameters",
    "create_lorafa_optimizer",
    "export_peft",
    "find_target_modules",
    "fully_shard_blocks",
    "get_lorafa_config",
    "keep_no_quantized_inputs",
    "load_adapter",
    "load_quantized_model",
    "lorafa_layers",
    "merge_lorafa",
    "quantization_config",
    "save_adapter",
    "transformer_block_classes",
]
