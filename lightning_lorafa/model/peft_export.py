"""Export a LoRA-FA adapter in Hugging Face PEFT's LoRA format.

PEFT's LoRA computes the same ``base(x) + s * dropout(x) A^T B^T``; its format does not record that
A was frozen, so the exported A is the exact A we trained with. Layers on transformers' ``Conv1D`` (GPT-2)
are exported with ``fan_in_fan_out``, PEFT's flag for that weight layout; A and B keep their shapes. Fused MoE
experts are exported in PEFT's ``target_parameters`` format (``ParamWrapper``, A (E * r, d_in), B (d_out, E * r)),
and so are MoE routers (``LoraFARouter``: ``<router>.weight``, A (r, H), B (E, r)), with ``lora_dropout`` 0, which
PEFT requires there. The directory loads with
``peft.PeftModel.from_pretrained(base_model, directory)``.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import warnings
from pathlib import Path

from packaging.version import Version
from safetensors.torch import save_file
from torch import nn

from lightning_lorafa import _compat
from lightning_lorafa.adapters.find import lorafa_experts, lorafa_layers
from lightning_lorafa.adapters.multihead import LoraFAMultiheadAttention
from lightning_lorafa.adapters.router import LoraFARouter
from lightning_lorafa.model.adapter_state import atomic_write, resized_embeddings
from lightning_lorafa.model.convert import get_lorafa_config

PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"
_PREFIX = "base_model.model."


#: The modules_to_save PEFT adds by itself for a task type (``PeftModelForSequenceClassification`` ...).
TASK_MODULES_TO_SAVE = {
    "SEQ_CLS": ["classifier", "score"],
    "TOKEN_CLS": ["classifier", "score"],
    "QUESTION_ANS": ["qa_outputs"],
}


def _peft_suffix_matches(model: nn.Module, entry: str) -> list[str]:
    """Module names (relative to ``model``) that PEFT wraps for a ``modules_to_save`` entry: it wraps every module
    of the ``PeftModel`` whose name ends with the entry as a string (``"classifier"`` matches ``pre_classifier``)."""
    return [name for name, _ in model.named_modules() if name and (_PREFIX + name).endswith(entry)]


def peft_modules_to_save(model: nn.Module, task_type: str | None = None) -> tuple[list[str], list[str]]:
    """``(entries, wrapped)``: the ``modules_to_save`` entries to write into PEFT's config, and the modules PEFT will
    wrap when loading (ours plus those its ``task_type`` adds), whose tensors the adapter file must hold.

    An entry whose bare name PEFT would also match elsewhere (DistilBERT's ``classifier`` and ``pre_classifier``)
    is written as ``model.<name>``, which PEFT's suffix rule matches exactly (its module names start with
    ``base_model.model.``).

    Raises:
        ValueError: a module PEFT's task type would wrap by itself is, or holds, a LoRA-FA layer.
    """
    config = get_lorafa_config(model)
    adapted = list(lorafa_layers(model))
    entries = []
    for name in config.modules_to_save:
        exact = [match for match in _peft_suffix_matches(model, name) if match != name]
        entries.append("model." + name if exact else name)
    wrapped = list(config.modules_to_save)
    for entry in TASK_MODULES_TO_SAVE.get(task_type or "", []):
        for match in _peft_suffix_matches(model, entry):
            clash = [layer for layer in adapted if layer == match or layer.startswith(match + ".")]
            if clash:
                raise ValueError(
                    f"PEFT's task_type={task_type!r} adds modules_to_save={TASK_MODULES_TO_SAVE[task_type]} and "
                    f"matches them by bare suffix: {entry!r} also matches {match!r}, which holds the adapted layer(s) "
                    f"{clash[:3]}, and PeftModel.from_pretrained would fail. Export with task_type=None (load with "
                    "PeftModel.from_pretrained(model, directory)), or convert with exclude=[...] naming that layer."
                )
            if match not in wrapped and not any(match.startswith(saved + ".") for saved in wrapped):
                wrapped.append(match)
    return entries, wrapped


def _expert_wrappers(model: nn.Module) -> dict[str, nn.Module]:
    """PEFT's module name of each fused experts projection -> its ``ExpertsAdapter``.

    PEFT adapts a 3D expert parameter with a ``ParamWrapper`` (``target_parameters``); several parameters of one
    module nest, the first parameter of the module innermost: ``experts.base_layer`` holds ``gate_up_proj``'s
    adapter and ``experts`` the ``down_proj`` one. Its A is (E * r, d_in) (expert e's rows e*r .. e*r + r - 1) and
    its B (d_out, E * r) (expert e's columns e, e + E, ...), which are our (E, r, d_in) and (E, d_out, r) reshaped.
    """
    wrappers = {}
    for name, experts in lorafa_experts(model).items():
        order = [param for param, _ in experts.base.named_parameters(recurse=False) if param in experts.adapters]
        for index, param in enumerate(order):
            wrappers[name + ".base_layer" * (len(order) - 1 - index)] = experts.adapters[param]
    return wrappers


def peft_layer_names(model: nn.Module) -> dict[str, str]:
    """PEFT's module name of each LoRA-FA layer of ``model``: the same, except that the ``out_proj`` inside an
    ``nn.MultiheadAttention`` adapter (ours: ``<attention>.base.out_proj``) sits under PEFT's wrapper as
    ``<attention>.base_layer.out_proj``."""
    layers = lorafa_layers(model)
    attentions = [name for name, layer in layers.items() if isinstance(layer, LoraFAMultiheadAttention)]
    names = {}
    for name in layers:
        outer = next((a for a in attentions if name.startswith(f"{a}.base.")), None)
        names[name] = name if outer is None else f"{outer}.base_layer.{name[len(outer) + 6 :]}"
    return names


def peft_state_dict(model: nn.Module, task_type: str | None = None) -> dict:
    """Adapter tensors under PEFT's key names (``base_model.model.<module>.lora_A.weight`` ...), and the full
    tensors of every module PEFT wraps as ``modules_to_save`` when loading for ``task_type``."""
    model = _compat.uncompiled(model)
    tensors = {}
    names = peft_layer_names(model)
    for name, layer in lorafa_layers(model).items():
        tensors[f"{_PREFIX}{names[name]}.lora_A.weight"] = layer.lora_A.detach()
        tensors[f"{_PREFIX}{names[name]}.lora_B.weight"] = layer.lora_B.detach()
    for name, adapter in _expert_wrappers(model).items():
        num_experts, d_out, r = adapter.lora_B.shape
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = adapter.lora_A.detach().reshape(num_experts * r, -1)
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = adapter.lora_B.detach().permute(1, 2, 0).reshape(d_out, -1)
    modules = dict(model.named_modules())
    for name in peft_modules_to_save(model, task_type)[1]:
        for key, tensor in modules[name].state_dict().items():
            tensors[f"{_PREFIX}{name}.{key}"] = tensor.detach()
    state = model.state_dict()
    for key in resized_embeddings(model):  # PEFT's save_embedding_layers: load into a base resized the same way
        tensors[f"{_PREFIX}{key}"] = state[key].detach().clone()
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
        ValueError: the model was not converted, its layers are merged, or PEFT's ``task_type`` would wrap an
            adapted layer as a ``modules_to_save`` module (the message says what to pass instead).
    """
    model = _compat.uncompiled(model)
    config = get_lorafa_config(model)
    merged = [name for name, layer in lorafa_layers(model).items() if layer.merged]
    directory = Path(directory)
    target_parameters = [
        f"{name}.{param}" for name, experts in lorafa_experts(model).items() for param in experts.adapters
    ]
    routers = [name for name, layer in lorafa_layers(model).items() if isinstance(layer, LoraFARouter)]
    target_parameters += [f"{name}.weight" for name in routers]  # PEFT wraps a router's weight, not the module
    merged += [name for name, experts in lorafa_experts(model).items() if experts.merged]
    if merged:
        raise ValueError(f"Layers {merged[:4]} are merged; call unmerge() on them before exporting the adapter.")
    modules_to_save, _ = peft_modules_to_save(model, task_type)
    tensors = peft_state_dict(model, task_type)
    peft_config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.r,
        "lora_alpha": config.alpha,
        # PEFT's ParamWrapper (fused experts, routers) refuses dropout; an exported adapter is for inference, where
        # the dropout does nothing.
        "lora_dropout": 0.0 if target_parameters else config.dropout,
        "use_rslora": config.use_rslora,
        # an nn.MultiheadAttention's out_proj is adapted with its module (PEFT adapts both when the module is named)
        "target_modules": sorted(
            name for name, peft in peft_layer_names(model).items() if name == peft and name not in routers
        ),
        "target_parameters": target_parameters or None,
        "modules_to_save": modules_to_save or None,
        "bias": "none",
        # PEFT sets fan_in_fan_out per layer from its type (True for Conv1D, False for nn.Linear), warning when
        # the config says otherwise; say True when any layer stores its weight (d_in, d_out).
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in lorafa_layers(model).values()),
        "init_lora_weights": True,
        "inference_mode": True,
    }
    attentions = [name for name, layer in lorafa_layers(model).items() if isinstance(layer, LoraFAMultiheadAttention)]
    if attentions and _peft_doubles_the_out_proj_delta():
        warnings.warn(
            f"LoRA-FA: the adapter of {len(attentions)} nn.MultiheadAttention modules ({_first(attentions)}) is "
            f"exported as PEFT stores it, but PEFT {_peft_version()}'s MultiheadAttention layer adds out_proj's delta "
            "twice in its forward and its merge (huggingface/peft#3774), so a PeftModel loaded from it computes "
            "W_o + 2 s B_o A_o; and in eval mode torch's fused nn.TransformerEncoderLayer path skips PEFT's "
            "MultiheadAttention adapters. Until PEFT is fixed, serve this model merged: "
            "lightning_lorafa.merge_lorafa(model), or its state from "
            "lightning_lorafa.model.merge.merged_state_dict(model).",
            stacklevel=2,
        )
    atomic_write(directory / PEFT_WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(directory / PEFT_CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(peft_config, indent=2)))
    return directory


#: The last PEFT release whose MultiheadAttention LoRA adds out_proj's delta twice (huggingface/peft#3774, open).
PEFT_DOUBLES_OUT_PROJ_UP_TO = "0.21.2"


def _peft_version() -> str:
    try:
        return importlib.metadata.version("peft")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def _peft_doubles_the_out_proj_delta() -> bool:
    """Whether the installed PEFT (or, without one, the latest PEFT known) has the MultiheadAttention bug."""
    version = _peft_version()
    return version == "(not installed)" or Version(version) <= Version(PEFT_DOUBLES_OUT_PROJ_UP_TO)


def _first(names: list[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (" ..." if len(names) > limit else "")
