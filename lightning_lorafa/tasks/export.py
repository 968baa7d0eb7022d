"""Export a trained run for serving: the PEFT adapter, or the base model with the adapter folded in.

    lorafa export --config outputs/llama/alpaca/version_0/config.yaml --ckpt_path last.ckpt --format merged \\
        --output merged/
    python -m lightning_lorafa.tasks.export --config configs/llama/alpaca.yaml --ckpt_path last.ckpt --format peft \\
        --output adapter/

The run's config (the one `lorafa fit` read, or the `config.yaml` it saved beside its logs; several `--config`
files are merged like the command's) names the task module and its base checkpoint and the `LoraFA` callback's
settings. The base is loaded as the task module loads it, converted with those settings, and the checkpoint's
adapter tensors (A, B, `modules_to_save`) are loaded into it; a file checkpoint and a sharded (FSDP2 distributed)
checkpoint directory both work. Then:

* `--format peft`: `adapter_model.safetensors` + `adapter_config.json` (`export_peft`), for
  `peft.PeftModel.from_pretrained(base, directory)`;
* `--format merged`: every LoRA-FA layer's weight replaced by `W + s B A` (computed in float32, rounded once to the
  base's dtype), saved with `save_pretrained` (safetensors) next to the base's tokenizer: a plain transformers
  checkpoint for `AutoModelForCausalLM.from_pretrained`, vLLM, TGI or llama.cpp's converter.

A base trained quantized (4-bit or 8-bit bitsandbytes, QLoRA style) has no float weight to fold the adapter into:
the export loads the full-precision base named by the config (or `--base_model`) and merges into that.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from torch import nn
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel

from lightning_lorafa import _compat
from lightning_lorafa.lightning.callback import LoraFA
from lightning_lorafa.lightning.checkpoints import ADAPTER_ONLY_MARKER, module_adapter_keys
from lightning_lorafa.model.adapter_state import adapter_keys, check_adapter_state, check_vocabulary, embedding_keys
from lightning_lorafa.model.convert import apply_lorafa, get_lorafa_config
from lightning_lorafa.model.merge import merged_state_dict
from lightning_lorafa.model.peft_export import export_peft
from lightning_lorafa.model.safe_load import load_checkpoint_file, read_sharded_state

log = logging.getLogger(__name__)

FORMATS = ("peft", "merged")
#: Name endings of bitsandbytes' quantization state in a state dict (4-bit: absmax, quant_map, quant_state; 8-bit: SCB).
QUANTIZED_STATE_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".SCB", ".weight_format")


def save_merged(
    model: PreTrainedModel, directory: str | os.PathLike, tokenizer_name_or_path: str | None = None
) -> Path:
    """Save ``model`` (converted by ``apply_lorafa``, unchanged by this) as a plain transformers checkpoint with the
    adapter folded in (``merged_state_dict``), in safetensors, plus the tokenizer of ``tokenizer_name_or_path``.

    Raises:
        TypeError: ``model`` is not a transformers ``PreTrainedModel``, or its LoRA-FA bases are quantized.
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"a merged export is a transformers checkpoint (save_pretrained); {type(model).__name__} is not a "
            "PreTrainedModel. Use merge_lorafa(model) and save it your own way, or export the adapter (format peft)."
        )
    directory = Path(directory)
    model.save_pretrained(directory, state_dict=merged_state_dict(model))
    if tokenizer_name_or_path is not None:
        AutoTokenizer.from_pretrained(tokenizer_name_or_path).save_pretrained(directory)
    return directory


def peft_task_type(model: nn.Module) -> str | None:
    """PEFT's task type for a transformers model class: CAUSAL_LM, SEQ_CLS, SEQ_2_SEQ_LM, or None."""
    name = type(model).__name__
    if name.endswith("ForCausalLM"):
        return "CAUSAL_LM"
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return "SEQ_2_SEQ_LM"
    return None


# ----------------------------------------------------------------------------------------------- the run's config
def read_config(paths: Sequence[str | os.PathLike]) -> dict[str, Any]:
    """The YAML files merged in order (mappings merged key by key, anything else replaced), like repeated
    `--config` options of the `lorafa` command."""

    def merge(base: Any, update: Any) -> Any:
        if isinstance(base, dict) and isinstance(update, dict):
            return {**base, **{key: merge(base.get(key), value) for key, value in update.items()}}
        return update

    merged: dict[str, Any] = {}
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"config {path} does not exist; give the YAML file the run was started with.")
        merged = merge(merged, yaml.safe_load(Path(path).read_text()) or {})
    return merged


def import_class(class_path: str) -> type:
    """The class named by a dotted `class_path` (`lightning_lorafa.tasks.InstructionTuner`)."""
    module_name, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"cannot import class_path {class_path!r}: {error}") from error


def lorafa_callback(config: dict[str, Any]) -> LoraFA:
    """The `LoraFA` callback of the config's `trainer.callbacks`, built with its `init_args`.

    Raises:
        ValueError: the config has no LoraFA callback.
    """
    callbacks = (config.get("trainer") or {}).get("callbacks") or []
    for entry in callbacks if isinstance(callbacks, list) else [callbacks]:
        if isinstance(entry, dict) and "class_path" in entry:
            cls = import_class(entry["class_path"])
            if isinstance(cls, type) and issubclass(cls, LoraFA):
                return cls(**(entry.get("init_args") or {}))
    raise ValueError(
        "the config has no lightning_lorafa.LoraFA callback under trainer.callbacks, so the adapter's rank, alpha "
        "and target modules are unknown; give the config the run was trained with."
    )


def is_quantized_state(state: dict[str, Any]) -> bool:
    """Whether a checkpoint's state dict holds bitsandbytes quantization state (a base trained 4-/8-bit)."""
    return any(key.endswith(QUANTIZED_STATE_SUFFIXES) or ".quant_state." in key for key in state)


def read_checkpoint_state(ckpt_path: str | os.PathLike, weights_only: bool = True) -> dict[str, torch.Tensor]:
    """The `state_dict` of a Lightning checkpoint file, or of a distributed (FSDP2 sharded) checkpoint directory
    (read in this process, no process group needed), read weights-only unless `weights_only=False` (a file you
    trust: reading it whole runs whatever it holds)."""
    path = Path(ckpt_path)
    if path.is_dir():
        state = read_sharded_state(path, weights_only)
    elif path.is_file():
        checkpoint = load_checkpoint_file(path, weights_only)
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            raise ValueError(f"{path} is not a Lightning checkpoint (it has no 'state_dict').")
        state = checkpoint["state_dict"]
    else:
        raise FileNotFoundError(f"checkpoint {path} does not exist; give the .ckpt file (or directory) of the run.")
    state.pop(ADAPTER_ONLY_MARKER, None)
    return state


def build_trained_model(
    config: dict[str, Any],
    ckpt_path: str | os.PathLike,
    base_model: str | None = None,
    dtype: str | None = None,
    weights_only: bool = True,
) -> tuple[nn.Module, str]:
    """The run's model, converted with its `LoraFA` settings and holding the checkpoint's adapter, and the name or
    path of its base checkpoint. The task module (`model.class_path`) is built from its `init_args`, with
    `model_name_or_path` replaced by `base_model` and `dtype` by `dtype` when given.

    A run whose base was quantized is rebuilt over the full-precision base: a task module option `quantization`
    is set to None, and a quantized checkpoint named as the base is refused (pass `base_model`).

    Raises:
        ValueError: the config names no task module or no LoraFA callback, the base is a quantized checkpoint, or
            the checkpoint's adapter does not fit the model (the message names the keys).
    """
    model_section = config.get("model") or {}
    if "class_path" not in model_section:
        raise ValueError("the config has no model.class_path (the task module); give the run's config.")
    module_class = import_class(model_section["class_path"])
    init_args = dict(model_section.get("init_args") or {})
    if base_model is not None:
        init_args["model_name_or_path"] = base_model
    if dtype is not None:
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype '{dtype}' is not a torch dtype; use e.g. 'float32' or 'bfloat16'.")
        init_args["dtype"] = dtype
    name = init_args.get("model_name_or_path")
    if name is None:
        raise ValueError("the config's model.init_args has no model_name_or_path; pass base_model.")
    state = read_checkpoint_state(ckpt_path, weights_only)
    quantization = init_args.get("quantization")
    if quantization or is_quantized_state(state):
        log.warning(
            "LoRA-FA export: the run trained over a quantized (%s) base; the adapter is merged into the "
            "full-precision base %s instead (its outputs differ from the quantized model's by the quantization "
            "error).",
            quantization or "bitsandbytes",
            name,
        )
        if "quantization" in inspect.signature(module_class).parameters:
            init_args["quantization"] = None
    base_config = AutoConfig.from_pretrained(os.path.expanduser(name))
    if getattr(base_config, "quantization_config", None) is not None:
        raise ValueError(
            f"the base {name} is a quantized checkpoint ({base_config.quantization_config.get('quant_method', '?')}"
            " in its config.json), which has no full-precision weights to merge into; pass base_model (--base_model)"
            " naming its full-precision original."
        )
    callback = lorafa_callback(config)
    module = module_class(**init_args)
    model = _compat.uncompiled(callback.lorafa_model(module)[0])
    prefix = next(f"{name}." if name else "" for name, sub in module.named_modules() if sub is model)
    apply_lorafa(model, callback)  # the settings the run trained with (its LoraFA callback)
    given = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    own = model.state_dict()
    expected = {key: own[key] for key in adapter_keys(model)}
    adapter = {key: value for key, value in given.items() if key in expected or ".lora_" in key}
    check_vocabulary(given, own, f"The checkpoint {ckpt_path}", embedding_keys(model))
    check_adapter_state(expected, adapter, f"The checkpoint {ckpt_path}", get_lorafa_config(model).r)
    model.load_state_dict({key: value for key, value in given.items() if key in own}, strict=False)
    outside = [key for key in module_adapter_keys(module) if not key.startswith(prefix)] if prefix else []
    if outside:
        log.warning(
            "LoRA-FA export: %s trained %s beside its model %s; the export holds the model only.",
            type(module).__name__,
            ", ".join(outside[:8]) + (" ..." if len(outside) > 8 else ""),
            prefix.rstrip("."),
        )
    return model.eval(), name


def export(
    config: list[str],
    ckpt_path: str,
    output: str,
    format: Literal["peft", "merged"] = "merged",
    base_model: str | None = None,
    dtype: str | None = None,
    task_type: str | None = None,
    weights_only: bool = True,
) -> Path:
    """Export a trained run: its PEFT adapter or the merged model.

    Args:
        config: the run's config file(s), merged in order.
        ckpt_path: the Lightning checkpoint (file, or FSDP2 sharded directory).
        output: the folder to write.
        format: "peft" (the adapter, as `export_peft` writes it) or "merged" (`save_pretrained` of the base with
            `s B A` folded in, with its tokenizer).
        base_model: the base checkpoint to load instead of the config's `model_name_or_path` (e.g. the
            full-precision original of a quantized base).
        dtype: load the base (and so write the merged weights) in this dtype instead of the config's.
        task_type: PEFT task type for `format="peft"` (default: from the model class).
        weights_only: read the checkpoint weights-only (the default, as torch and Lightning read checkpoints); False
            reads it whole, running whatever objects it holds: only for a file you trust.
    """
    if format not in FORMATS:
        raise ValueError(f"format={format!r} is not one of {FORMATS}.")
    model, name = build_trained_model(read_config(config), ckpt_path, base_model, dtype, weights_only)
    if format == "peft":
        path = export_peft(model, output, name, task_type or peft_task_type(model))
    else:
        path = save_merged(model, output, os.path.expanduser(name))
    log.warning("LoRA-FA export: wrote the %s model of %s to %s", format, ckpt_path, path)
    return path


def main(args: list[str] | None = None) -> Path:
    """`lorafa export ...` / `python -m lightning_lorafa.tasks.export ...` (see `export` for the options)."""
    parser = argparse.ArgumentParser(
        prog="lorafa export", description="Export a trained LoRA-FA run: its PEFT adapter or the merged model."
    )
    parser.add_argument("--config", action="append", required=True, help="the run's config YAML (repeatable)")
    parser.add_argument("--ckpt_path", required=True, help="the Lightning checkpoint file or sharded directory")
    parser.add_argument("--output", required=True, help="the folder to write")
    parser.add_argument("--format", choices=FORMATS, default="merged")
    parser.add_argument("--base_model", default=None, help="base checkpoint instead of the config's")
    parser.add_argument("--dtype", default=None, help="load the base in this dtype (float32, bfloat16, ...)")
    parser.add_argument("--task_type", default=None, help="PEFT task type of the adapter (format peft)")
    parser.add_argument(
        "--weights_only",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="read the checkpoint weights-only (default); --no-weights_only reads it whole, running whatever objects "
        "it holds: only for a checkpoint you trust",
    )
    options = parser.parse_args(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return export(**vars(options))


if __name__ == "__main__":
    main()
