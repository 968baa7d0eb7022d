"""A converted model's weights with the adapters folded in, under the base model's own names.

A LoRA-FA module keeps its base inside it: ``q_proj.base.weight``, ``q_proj.lora_A``, ``q_proj.lora_B``. Folding
turns those entries into the plain base's, ``q_proj.weight = W + s B A`` (float32 sum, rounded once to W's dtype),
without changing the model. It serves:

- ``merged_state_dict(model)``: the state dict of the model as if ``merge_lorafa`` had run (merged exports);
- ``save_pretrained``: ``fold_on_save_pretrained(model)`` (run at conversion) makes transformers'
  ``model.save_pretrained(directory)`` (and ``push_to_hub``) write this merged state, so that
  ``AutoModel*.from_pretrained(directory)`` loads the trained model, where it would otherwise find
  ``q_proj.base.weight`` and initialise every adapted layer at random. It is a state-dict hook on each transformers
  model that acts only when ``save_pretrained`` itself asks for the state dict
  (``_compat.called_from_save_pretrained``); every other ``state_dict()`` (Lightning and Fabric checkpoints,
  ``load_state_dict`` round trips) is unchanged.
"""

from __future__ import annotations

import warnings
import weakref

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_lorafa import _compat
from lightning_lorafa.adapters.find import lorafa_modules
from lightning_lorafa.adapters.linear import is_quantized


def check_foldable(model: nn.Module, what: str) -> None:
    """Raise ``TypeError`` naming the layers whose base is quantized (no float weight to fold into)."""
    quantized = [name for name, m in lorafa_modules(model).items() if is_quantized(getattr(m, "base", None))]
    if quantized:
        raise TypeError(
            f"LoRA-FA layers {quantized[:3]} have a quantized base, whose weight is not a float tensor, so {what} "
            "cannot fold the adapter into it: merge into the full-precision base instead (`lorafa export --format "
            "merged` loads it), or save the adapter alone with lightning_lorafa.export_peft(model, directory)."
        )


def fold_state(model: nn.Module, state: dict, prefix: str = "") -> dict:
    """``state`` (``model.state_dict()``, keys with ``prefix``) with every LoRA-FA module of ``model`` folded,
    innermost first (an ``nn.MultiheadAttention`` adapter holds its ``out_proj``'s)."""
    for name, module in reversed(list(lorafa_modules(model).items())):
        state = module.folded_state(state, f"{prefix}{name}." if name else prefix)
    return state


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict ``model`` has once every LoRA-FA module is folded into its base, without changing ``model``:
    ``{name}.weight = W + s B A`` (float32 sum, rounded once to W's dtype, as ``LoraFALinear.merge``), the base's
    other entries under its own names, no ``lora_A``/``lora_B``; fused experts ``{name}.gate_up_proj`` (E, ...) and
    ``{name}.down_proj`` with every expert's ``s B_e A_e`` added; ``nn.MultiheadAttention``'s ``in_proj_weight`` and
    ``out_proj.weight`` likewise; every other entry as it is.

    Raises:
        TypeError: a LoRA-FA layer's base is quantized (no float weight to fold into).
    """
    model = _compat.uncompiled(model)
    check_foldable(model, "a merged state dict")
    return {key: tensor.detach() for key, tensor in fold_state(model, model.state_dict()).items()}


#: transformers models whose save_pretrained writes merged weights: model -> its hook's handle.
_save_hooks: weakref.WeakKeyDictionary[nn.Module, RemovableHandle] = weakref.WeakKeyDictionary()


def _fold_when_saving_pretrained(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    if not _compat.called_from_save_pretrained():
        return
    check_foldable(module, "save_pretrained")
    folded = fold_state(module, state_dict, prefix)
    if folded is state_dict:
        return  # folded already (by the hook of a transformers model inside this one), or nothing to fold
    state_dict.clear()
    state_dict.update(folded)
    warnings.warn(
        f"LoRA-FA: save_pretrained writes {type(module).__name__} with each adapter folded into its base weight "
        "(W + s B A) under the base model's own parameter names, so from_pretrained loads the trained model. For the "
        "adapter alone (PEFT's format, for PeftModel.from_pretrained), call "
        "lightning_lorafa.export_peft(model, directory).",
        stacklevel=2,
    )


def fold_on_save_pretrained(model: nn.Module) -> list[str]:
    """Make ``save_pretrained`` of each transformers model in ``model`` write merged weights (see the module
    docstring); return their names. Without ``_compat``'s ``save_pretrained`` feature, a warning says that
    ``save_pretrained`` writes the adapters' own layout, which ``from_pretrained`` does not load."""
    found = [
        (name, module)
        for name, module in model.named_modules()
        if callable(getattr(module, "save_pretrained", None)) and hasattr(module, "base_model_prefix")
    ]
    if found and not _compat.HAS_SAVE_PRETRAINED_CHECK:
        _compat.warn_missing("save_pretrained_merged")
        return []
    for _, module in found:
        if module not in _save_hooks:
            _save_hooks[module] = module.register_state_dict_post_hook(_fold_when_saving_pretrained)
    return [name for name, _ in found]


def stop_folding_on_save_pretrained(model: nn.Module) -> None:
    """Undo ``fold_on_save_pretrained`` for the modules of ``model``."""
    for module in model.modules():
        handle = _save_hooks.pop(module, None)
        if handle is not None:
            handle.remove()
