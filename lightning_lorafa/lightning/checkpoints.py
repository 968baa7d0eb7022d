"""Lightning checkpoints of LoRA-FA training: adapter-only, atomic, loadable into a fresh base model.

The ``LoraFA`` callback keeps only ``module_adapter_keys`` in each Lightning checkpoint (``keep_adapter_only``: the
adapters, ``modules_to_save``, resized embeddings, and what the LightningModule trains beside its model), and fills
the frozen base tensors back in before Lightning loads one (``fill_frozen_tensors``). ``load_from_checkpoint``
rebuilds a trained LightningModule from such a checkpoint outside ``Trainer.fit``; ``AtomicCheckpointIO`` writes each
checkpoint to a temporary file and renames it into place. Checkpoints are read weights-only unless the caller passes
``weights_only=False`` (``lightning_lorafa.model.safe_load``).
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

from lightning_lorafa import _compat
from lightning_lorafa.adapters.base import is_adapter_tensor
from lightning_lorafa.model.adapter_state import (
    adapter_keys,
    atomic_write,
    check_adapter_state,
    check_vocabulary,
    embedding_keys,
)
from lightning_lorafa.model.convert import apply_lorafa
from lightning_lorafa.model.safe_load import load_checkpoint_file
from lightning_lorafa.settings import LoraFASettings

#: The first entry of every adapter-only Lightning checkpoint: loading it with Lightning's own
#: ``MyModule.load_from_checkpoint(path)``, which cannot rebuild the frozen base, fails with this key in its message.
ADAPTER_ONLY_MARKER = (
    "LoRA-FA adapter-only checkpoint: load it with lightning_lorafa.load_from_checkpoint(MyModule, path), which "
    "loads the base model and the adapter"
)


def module_adapter_keys(module: nn.Module) -> list[str]:
    """State-dict keys of ``module`` (a LightningModule, say) that its adapter-only checkpoints hold: the
    ``adapter_keys`` of every converted model inside it, with their prefixes (a ``torch.compile``d model's with
    its ``_orig_mod.``, as in ``module.state_dict()``), and, outside those models, every trainable parameter and
    every buffer of ``module`` (a classifier the LightningModule holds beside ``self.model``: what training
    changes there; frozen parameters come back from ``__init__``)."""
    keys: list[str] = []
    owners: list[str] = []
    for name, sub in module.named_modules():
        if "lorafa_config" in vars(sub) and not any(name == o or name.startswith(f"{o}.") for o in owners):
            keys += adapter_keys(sub, f"{name}." if name else "")
            owners.append(name)
    if owners and "" not in owners:
        roots = tuple(f"{owner}." for owner in owners)
        keys += [
            key
            for key, tensor in module.state_dict(keep_vars=True).items()
            if not key.startswith(roots) and (not isinstance(tensor, nn.Parameter) or tensor.requires_grad)
        ]
    return keys


def keep_adapter_only(state_dict: dict[str, Any], module: nn.Module) -> dict[str, Any]:
    """The entries of a LightningModule's ``state_dict`` that ``module_adapter_keys(module)`` names, after
    ``ADAPTER_ONLY_MARKER``."""
    keep = set(module_adapter_keys(module))
    return {ADAPTER_ONLY_MARKER: torch.zeros(())} | {key: value for key, value in state_dict.items() if key in keep}


def fill_frozen_tensors(module: nn.Module, state_dict: dict[str, Any], prefix: str = "") -> None:
    """Before ``module.load_state_dict(state_dict)``: check the adapter tensors of ``state_dict`` (names,
    shapes, rank) and fill in, in place, the frozen base tensors that an adapter-only checkpoint leaves out.

    Raises:
        ValueError: ``state_dict`` holds no LoRA-FA adapter at all (a checkpoint of training without LoRA-FA;
            the message says how to start from its weights), its adapter does not fit (keys named), or it holds
            a resized token embedding the model does not have (the message says where to resize).
    """
    state_dict.pop(ADAPTER_ONLY_MARKER, None)
    own = module.state_dict(prefix=prefix, keep_vars=True)
    expected = {prefix + key: own[prefix + key] for key in module_adapter_keys(module)}
    if not any(is_adapter_tensor(key) for key in state_dict):
        raise ValueError(
            "The checkpoint holds no LoRA-FA adapter (no lora_A/lora_B tensors): it was written by training "
            "without LoraFA. To start LoRA-FA from its weights, load them into the model first (e.g. "
            "MyModule.load_from_checkpoint(path) in a run without LoraFA, or "
            "module.load_state_dict(torch.load(path)['state_dict'])), then call trainer.fit(module) with LoraFA "
            "and without ckpt_path."
        )
    check_vocabulary(state_dict, own, "The checkpoint", embedding_keys(module))
    given = {key: value for key, value in state_dict.items() if key in expected or is_adapter_tensor(key)}
    configs = [sub.lorafa_config for sub in module.modules() if "lorafa_config" in vars(sub)]
    check_adapter_state(expected, given, "The checkpoint", configs[0].r if configs else 0)
    for key, value in own.items():
        state_dict.setdefault(key, value.detach())


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary file beside the target, ``fsync``, then rename it into place.

    A run killed while writing leaves the previous checkpoint intact and, at worst, a hidden
    ``.<name>.*.tmp`` file that ``ckpt_path="last"`` does not pick up. Lightning's own ``TorchCheckpointIO``
    writes to the system temp directory and moves the file, which copies it in place (not atomic) when that
    directory is on another filesystem. Remote (``scheme://``) paths fall back to Lightning's writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_write(Path(path), lambda tmp: torch.save(checkpoint, tmp))


ModuleT = TypeVar("ModuleT", bound=pl.LightningModule)


def saved_lorafa_config(checkpoint: Mapping[str, Any]) -> LoraFASettings:
    """The settings a ``LoraFA`` callback stored in a Lightning checkpoint (its callback state), names resolved.

    Raises:
        ValueError: the checkpoint holds no ``LoraFA`` callback state (not written with the callback).
    """
    for key, state in (checkpoint.get("callbacks") or {}).items():
        if str(key).startswith("LoraFA") and isinstance(state, Mapping):
            if "config" in state:
                return LoraFASettings.from_dict(state["config"])
            lora = dict(state.get("lora", {}))
            if lora:  # written before the resolved config was stored: convert with the settings themselves
                lora.pop("exclude", None)
                lora["modules_to_save"] = lora.get("modules_to_save") or []  # None meant none then
                return LoraFASettings.from_dict(lora)  # target_modules is resolved again on the fresh model
    raise ValueError(
        "The checkpoint holds no LoraFA callback state, so it was not written by training with LoraFA: load it "
        "with MyModule.load_from_checkpoint(path) directly."
    )


def load_from_checkpoint(
    module_class: type[ModuleT],
    checkpoint_path: str | os.PathLike,
    model_attr: str | None = None,
    weights_only: bool = True,
    **kwargs: Any,
) -> ModuleT:
    """A LightningModule restored from an adapter-only checkpoint of ``LoraFA`` training, ready to predict.

    ``module_class.load_from_checkpoint(path, strict=False, weights_only=weights_only, **kwargs)`` rebuilds the module
    from its saved hyper-parameters (loading the frozen base model as its ``__init__`` does), the module's model is
    converted with the settings stored in the checkpoint, and the adapter (A, B, ``modules_to_save``, resized token
    embeddings) is loaded and checked key by key: the result gives the trained module's outputs. ``model_attr`` is the
    ``LoraFA`` callback's (default: the module's ``model`` attribute, else the module). ``kwargs`` go to Lightning's
    ``load_from_checkpoint`` (``map_location``, ``hparams_file``, hyper-parameter overrides).

    The file is read weights-only, as Lightning and torch read checkpoints: one that holds other objects (a
    tokenizer in the hyper-parameters, or code) is refused. ``weights_only=False`` reads it whole, running whatever
    it holds: pass it only for a file you trust.

    Raises:
        ValueError: the checkpoint was not written with ``LoraFA``, holds objects weights-only loading refuses, its
            adapter does not fit the model, or the model is not built by the module's ``__init__``.
    """
    checkpoint = load_checkpoint_file(checkpoint_path, weights_only)
    config = saved_lorafa_config(checkpoint)
    # Lightning builds the module from the hyper-parameters; the tensors are loaded below, into the converted model
    without_tensors = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
    buffer = io.BytesIO()
    torch.save(without_tensors | {"state_dict": {}}, buffer)
    buffer.seek(0)
    with warnings.catch_warnings():  # it lists every tensor of the model as missing: they are loaded below
        warnings.filterwarnings("ignore", message="Found keys that are in the model state dict but not in the")
        warnings.filterwarnings("ignore", message="The state dict in .* contains no parameters")
        module = module_class.load_from_checkpoint(buffer, strict=False, weights_only=weights_only, **kwargs)
    attr = model_attr or ("model" if isinstance(getattr(module, "model", None), nn.Module) else None)
    owner = getattr(module, attr) if attr else module
    if not isinstance(owner, nn.Module) or not any(True for _ in owner.parameters()):
        raise ValueError(
            f"{module_class.__name__}.__init__ builds no {'model' if attr is None else repr(attr)} to load the adapter "
            "into (a model built in setup or configure_model does not exist outside a Trainer run). Build it in "
            "__init__, or call setup/configure_model yourself and load the adapter with lightning_lorafa.load_adapter "
            "or module.load_state_dict."
        )
    model = _compat.uncompiled(owner)
    if getattr(model, "lorafa_config", None) is None:
        apply_lorafa(model, **config.adapter_kwargs())
    saved = checkpoint["state_dict"]
    saved.pop(ADAPTER_ONLY_MARKER, None)
    own = module.state_dict()
    source = f"The checkpoint {checkpoint_path}"
    check_vocabulary(saved, own, source, embedding_keys(module))
    expected = {key: own[key] for key in module_adapter_keys(module)}
    given = {key: value for key, value in saved.items() if key in expected or is_adapter_tensor(key)}
    check_adapter_state(expected, given, source, config.r)
    module.load_state_dict({key: value for key, value in saved.items() if key in own}, strict=False)
    return module


def wrote_legacy_optimizer_state(checkpoint: Mapping[str, Any]) -> bool:
    """Whether ``checkpoint`` was written by lightning-lorafa 0.1, whose callback replaced the user's optimizer by a
    ``LoraFAOptimizer`` (its param groups hold a ``gradient_correction`` entry)."""
    states = checkpoint.get("optimizer_states") or []
    return any("gradient_correction" in group for state in states for group in state.get("param_groups", []))


def legacy_optimizer_message(optimizers: list[torch.optim.Optimizer]) -> str:
    """Why a checkpoint of lightning-lorafa 0.1 does not resume into ``optimizers``, and what to do."""
    return (
        "The checkpoint was written by lightning-lorafa 0.1, whose LoraFA callback replaced your optimizer by a "
        f"LoraFAOptimizer; its optimizer state does not fit your {', '.join(type(o).__name__ for o in optimizers)}. "
        "To resume it exactly, return lightning_lorafa.create_lorafa_optimizer(self.model, lr=...) from "
        "configure_optimizers; or start a new run from its adapter: module = "
        "lightning_lorafa.load_from_checkpoint(MyModule, path), then trainer.fit(module) without ckpt_path."
    )
