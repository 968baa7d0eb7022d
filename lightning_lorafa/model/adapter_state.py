"""Adapter-only state: what training changes (A, B, ``modules_to_save``), saved without the frozen base.

One rule decides what an adapter holds (``adapter_keys``): every adapter's A and B, every entry of the
``modules_to_save``, and a token embedding weight whose rows differ from the pretrained vocabulary's
(``resize_token_embeddings``: the new rows are not in the base checkpoint, so a reload needs them). It serves
``save_adapter``/``load_adapter`` (safetensors files), ``TrainingState`` (Fabric and plain PyTorch resume), and the
Lightning integration's checkpoints (``lightning_lorafa.lightning.checkpoints``).

A is stored as a tensor (not only its seed), so a restored layer has exactly the A it trained with. Files are
written to a temporary name and renamed into place (``atomic_write``), so a crash never leaves a half file; a file
damaged some other way (a cut-off copy, an empty file, another format) is refused with its name.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lightning_lorafa import _compat
from lightning_lorafa.adapters.base import TRAINED, adapter_state_keys
from lightning_lorafa.adapters.find import lorafa_adapters
from lightning_lorafa.model.convert import apply_lorafa, get_lorafa_config
from lightning_lorafa.settings import LoraFASettings

ADAPTER_FILE = "adapter.safetensors"


CONFIG_FILE = "lorafa_config.json"


def adapter_keys(model: nn.Module, prefix: str = "") -> list[str]:
    """State-dict keys of ``model`` (each with ``prefix``) that an adapter checkpoint holds: every adapter's A and
    B, every entry of the ``modules_to_save``, and every resized token embedding weight (``resized_embeddings``), in
    the model's order."""
    model = _compat.uncompiled(model)
    save_roots = tuple(name + "." for name in get_lorafa_config(model).modules_to_save)
    adapters = {key for name in lorafa_adapters(model) for key in adapter_state_keys(name)}
    resized = set(resized_embeddings(model))
    keys = [
        key
        for key in model.state_dict(keep_vars=True)
        if key in adapters or key.startswith(save_roots) or key in resized
    ]
    return [prefix + key for key in keys]


def resized_embeddings(model: nn.Module) -> dict[str, tuple[int, int]]:
    """The token embedding weights of ``model`` whose rows differ from the pretrained checkpoint's
    (``LoraFAConfig.vocabulary_rows``), with the state-dict keys of the weights tied to them: key ->
    ``(pretrained rows, rows now)``."""
    model = _compat.uncompiled(model)
    state = model.state_dict(keep_vars=True)
    resized = {}
    for key, rows in get_lorafa_config(model).vocabulary_rows.items():
        weight = state.get(key)
        if weight is None or weight.shape[0] == rows:
            continue
        for alias, tensor in state.items():
            if tensor is weight:
                resized[alias] = (rows, weight.shape[0])
    return resized


def embedding_keys(module: nn.Module) -> set[str]:
    """The state-dict keys of ``module`` (prefixed as in ``module.state_dict()``) of the token embedding weights of
    every converted model inside it (``LoraFAConfig.vocabulary_rows``), with the keys of the weights tied to them."""
    state = module.state_dict(keep_vars=True)
    keys = set()
    for name, sub in module.named_modules():
        if "lorafa_config" in vars(sub):
            prefix = f"{name}." if name else ""
            weights = {id(state[prefix + key]) for key in sub.lorafa_config.vocabulary_rows if prefix + key in state}
            keys |= {key for key, tensor in state.items() if id(tensor) in weights}
    return keys


def check_vocabulary(
    given: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], source: str, keys: set[str]
) -> None:
    """Raise ``ValueError`` when a token embedding weight (one of ``keys``) of ``given`` has other rows than the
    model's (``own``): embeddings resized in training but not in this model. The message says where to resize."""
    for key in [key for key in own if key in keys and key in given]:  # in the model's order
        tensor, mine = given[key], own.get(key)
        if mine is not None and tensor.shape[0] != mine.shape[0]:
            raise ValueError(
                f"{source} holds {key} with {tensor.shape[0]:,} rows, but the model has {mine.shape[0]:,}: its token "
                "embeddings were resized in training (resize_token_embeddings). Resize them the same way before "
                "loading, where the model is built (in the LightningModule's __init__ or setup: LoraFA converts the "
                "model in its setup hook, and Lightning restores a checkpoint after setup, before on_fit_start)."
            )


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors of ``model`` by state-dict key (detached, contiguous; tied weights as separate copies)."""
    model = _compat.uncompiled(model)
    state = model.state_dict()
    tied = set(resized_embeddings(model))
    return {
        key: state[key].detach().clone() if key in tied else state[key].detach().contiguous()
        for key in adapter_keys(model)
    }


def check_adapter_state(
    expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], source: str, r: int
) -> None:
    """Raise a ``ValueError`` naming the keys when ``given`` does not fit ``expected`` (names and shapes).

    A different LoRA rank (last dim of ``lora_B``) is reported as such.
    """
    for key, tensor in given.items():
        if key.endswith(f".{TRAINED}") and key in expected and tensor.shape[-1] != expected[key].shape[-1]:
            raise ValueError(
                f"{source} was saved with LoRA rank r={tensor.shape[-1]}, but the model has r={r} "
                f"(key {key}). Convert the model with r={tensor.shape[-1]} (e.g. LoraFA(r={tensor.shape[-1]}))."
            )
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    mismatched = sorted(
        f"{key}: saved {tuple(given[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in set(given) & set(expected)
        if given[key].shape != expected[key].shape
    )
    if missing or unexpected or mismatched:
        parts = [
            f"{name}: {_first(keys)}"
            for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
            if keys
        ]
        raise ValueError(
            f"{source} does not fit this model ({'; '.join(parts)}). Load it into the same architecture, "
            "converted with the same target_modules and modules_to_save."
        )


def _first(keys: list[str], limit: int = 8) -> str:
    more = f" ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` for a temporary file beside ``path``, flush it to disk, then rename it to ``path``.

    Readers see the old file or the complete new one. A process killed mid-write leaves a hidden
    ``.<name>.*.tmp`` file behind; an exception removes it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the adapter of ``model`` to ``directory``: ``adapter.safetensors`` + ``lorafa_config.json``.

    Returns the directory. Raises ``ValueError`` when the model was not converted.
    """
    config = get_lorafa_config(model)
    directory = Path(directory)
    tensors = {key: tensor.cpu() for key, tensor in adapter_state_dict(model).items()}
    config_json = json.dumps(config.to_dict(), indent=2)
    atomic_write(directory / ADAPTER_FILE, lambda tmp: save_file(tensors, tmp, metadata={"lorafa_config": config_json}))
    atomic_write(directory / CONFIG_FILE, lambda tmp: Path(tmp).write_text(config_json + "\n"))
    return directory


def read_adapter_files(directory: str | os.PathLike) -> tuple[LoraFASettings, dict[str, torch.Tensor], Path]:
    """The saved settings and tensors of an adapter directory, and the adapter file's path.

    Raises:
        FileNotFoundError: ``directory`` holds no ``adapter.safetensors`` or no ``lorafa_config.json``.
        ValueError: either file is damaged (truncated, empty, not safetensors/JSON, fields missing); the
            message names the file.
    """
    directory = Path(directory)
    path, config_path = directory / ADAPTER_FILE, directory / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"No LoRA-FA adapter at {path}: expected a directory written by save_adapter().")
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{config_path} is missing: save_adapter() writes it next to {ADAPTER_FILE}. Copy the whole adapter "
            "directory, or save the adapter again."
        )
    advice = (
        "The file is damaged (e.g. cut off by an interrupted copy or download): copy it again, "
        "or save the adapter again with save_adapter()."
    )
    try:
        saved = LoraFASettings.from_dict(json.loads(config_path.read_text()))
    except (ValueError, TypeError) as error:  # bad JSON or text, or fields that are no settings
        raise ValueError(f"Cannot read the LoRA-FA adapter config {config_path}: {error}. {advice}") from error
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as error:
        size = path.stat().st_size
        raise ValueError(f"Cannot read the LoRA-FA adapter file {path} ({size} bytes): {error}. {advice}") from error
    return saved, tensors, path


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load an adapter written by ``save_adapter`` into ``model`` and return it.

    A model that is not converted yet is converted first with the saved settings (same layers,
    rank, alpha, dropout, modules_to_save). A converted model must match them.

    Raises:
        FileNotFoundError: ``directory`` holds no adapter (or no config beside it).
        ValueError: a damaged file (named in the message), or rank, names or shapes differ (the message
            names the keys).
    """
    saved, tensors, path = read_adapter_files(directory)
    given, model = model, _compat.uncompiled(model)
    if getattr(model, "lorafa_config", None) is None:
        try:
            apply_lorafa(model, **saved.adapter_kwargs())
        except (ValueError, TypeError) as error:
            raise ValueError(f"Adapter {path} does not fit {type(model).__name__}: {error}") from error
    config = get_lorafa_config(model)
    state = model.state_dict()
    check_vocabulary(tensors, state, f"Adapter {path}", embedding_keys(model))
    check_adapter_state({key: state[key] for key in adapter_keys(model)}, tensors, f"Adapter {path}", config.r)
    if config.alpha != saved.alpha or config.use_rslora != saved.use_rslora:
        raise ValueError(
            f"Adapter {path} was trained with alpha={saved.alpha}, use_rslora={saved.use_rslora}, but the model "
            f"has alpha={config.alpha}, use_rslora={config.use_rslora}: convert it with the saved settings."
        )
    model.load_state_dict(tensors, strict=False)
    return given


def rng_state() -> dict[str, Any]:
    """The RNG states that draw LoRA-FA's dropout seeds (and every other random op of training): torch's CPU
    generator and, once CUDA is in use, every CUDA device's."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what ``rng_state`` returned (CUDA states only on a machine with as many devices)."""
    if "cpu" in state:
        torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


class TrainingState:
    """What resumes LoRA-FA training exactly with Lightning Fabric or plain PyTorch: the adapter (A, B,
    ``modules_to_save``, resized token embeddings), its settings, and the RNG state that draws the seeds of the
    dropout masks. Fabric saves and loads it as it saves any object with ``state_dict``/``load_state_dict``::

        state = {"lorafa": TrainingState(model), "optimizer": optimizer, "step": step}
        fabric.save("run.ckpt", state)          # the adapter, the optimizer and the RNG, not the frozen base
        ...
        fabric.load("run.ckpt", state)          # into a freshly prepared model: training continues exactly

    ``model`` is the model ``prepare_model`` converted (the one Fabric's ``setup`` wrapped, or that wrapper).
    In plain PyTorch: ``torch.save(state.state_dict(), path)`` and ``state.load_state_dict(torch.load(path))``.
    """

    def __init__(self, model: nn.Module) -> None:
        from lightning.fabric.wrappers import is_wrapped

        while is_wrapped(model) and isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        self.model = _compat.uncompiled(model)
        get_lorafa_config(self.model)  # names a model that was not converted

    def state_dict(self) -> dict[str, Any]:
        return {
            "adapter": adapter_state_dict(self.model),
            "config": get_lorafa_config(self.model).to_dict(),
            "rng": rng_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load the adapter into the model (checked key by key, settings compared) and restore the RNG state.

        Raises:
            ValueError: the adapter was trained with other settings, or does not fit the model (keys named).
        """
        saved, config = LoraFASettings.from_dict(state["config"]), get_lorafa_config(self.model)
        if (saved.r, saved.alpha, saved.use_rslora) != (config.r, config.alpha, config.use_rslora):
            raise ValueError(
                f"The saved adapter was trained with r={saved.r}, alpha={saved.alpha}, use_rslora={saved.use_rslora}; "
                f"the model is converted with r={config.r}, alpha={config.alpha}, use_rslora={config.use_rslora}."
            )
        own = self.model.state_dict()
        check_vocabulary(state["adapter"], own, "The saved training state", embedding_keys(self.model))
        expected = {k: own[k] for k in adapter_keys(self.model)}
        check_adapter_state(expected, state["adapter"], "The saved training state", config.r)
        self.model.load_state_dict(state["adapter"], strict=False)
        set_rng_state(state.get("rng", {}))
