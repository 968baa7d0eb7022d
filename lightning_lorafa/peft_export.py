"""Export a LoRA-FA adapter in Hugging Face PEFT's LoRA format.

PEFT's LoRA computes the same ``base(x) + s * dropout(x) A^T B^T``; its format does not record that
A was frozen, so the exported A is the exact A we trained with. Layers on transformers' ``Conv1D`` (GPT-2)
are exported with ``fan_in_fan_out``, PEFT's flag for that weight layout; A and B keep their shapes. The directory
loads with
``peft.PeftModel.from_pretrained(base_model, directory)``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from lightning_lorafa.checkpoint import atomic_write
from lightning_lorafa.convert import get_lorafa_config, lorafa_layers

PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"
_PREFIX = "base_model.model."


def peft_state_dict(model: nn.Module) -> dict:
    """Adapter tensors under PEFT's key names (``base_model.model.<module>.lora_A.weight`` ...)."""
    config = get_lorafa_config(model)
    tensors = {}
    for name, layer in lorafa_layers(model).items():
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach()
    modules = dict(model.named_modules())
    for name in config.modules_to_save:
        for key, tensor in modules[name].state_dict().items():
            tensors[f"{_PREFIX}{name}.{key}"] = tensor.detach()
    return {key: tensor.cpu().contiguous() for key, tensor in tensors.items()}


def export_peft(
    model: nn.Module,
    directory: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> Path:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` for PEFT into ``directory``.

    Args:
        model: a model converted by ``apply_lorafa`` (module names are taken relative to it, so pass
            the transformers model itself, not a LightningModule around it).
        base_model_name_or_path: recorded in the config, as PEFT does.
        task_type: PEFT task type (e.g. ``"SEQ_CLS"``, ``"CAUSAL_LM"``), or None for a plain ``PeftModel``.

    Raises:
        ValueError: the model was not converted, or its layers are merged.
    """
    config = get_lorafa_config(model)
    merged = [name for name, layer in lorafa_layers(model).items() if layer.merged]
    if merged:
        raise ValueError(f"Layers {merged[:4]} are merged; call unmerge() on them before exporting the adapter.")
    directory = Path(directory)
    peft_config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "target_modules": sorted(config.target_modules),
        "modules_to_save": config.modules_to_save or None,
        "bias": "none",
        # PEFT sets fan_in_fan_out per layer from its type (True for Conv1D, False for nn.Linear), warning when
        # the config says otherwise; say True when any layer stores its weight (d_in, d_out).
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in lorafa_layers(model).values()),
        "init_lora_weights": True,
        "inference_mode": True,
    }
    tensors = peft_state_dict(model)
    atomic_write(directory / PEFT_WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(directory / PEFT_CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(peft_config, indent=2)))
    return directory
