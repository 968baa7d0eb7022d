"""Adapter-only state: what training changes (A, B, ``modules_to_save``), saved without the frozen base.

A is stored as a tensor (not only its seed), so a restored layer has exactly the A it trained with.
Files are written to a temporary name and renamed into place, so a crash never leaves a half file; a file
damaged some other way (a cut-off copy, an empty file, another format) is refused with its name.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lightning_lorafa.convert import LoraFAConfig, apply_lorafa, get_lorafa_config

ADAPTER_FILE = "adapter.safetensors"
CONFIG_FILE = "lorafa_config.json"


def adapter_keys(model: nn.Module, prefix: str = "") -> list[str]:
    """State-dict keys of ``model`` (each with ``prefix``) that an adapter checkpoint holds:
    every ``lora_A``/``lora_B`` and every entry of the ``modules_to_save``."""
    save_roots = tuple(name + "." for name in get_lorafa_config(model).modules_to_save)
    keys = [
        key
        for key in model.state_dict(keep_vars=True)
        if key.endswith((".lora_A", ".lora_B")) or key.startswith(save_roots)
    ]
    return [prefix + key for key in keys]


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors of ``model`` by state-dict key (detached, contiguous)."""
    state = model.state_dict()
    return {key: state[key].detach().contiguous() for key in adapter_keys(model)}


def check_adapter_state(
    expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], source: str, r: int
) -> None:
    """Raise a ``ValueError`` naming the keys when ``given`` does not fit ``expected`` (names and shapes).

    A different LoRA rank (second dim of ``lora_B``) is reported as such.
    """
    for key, tensor in given.items():
        if key.endswith(".lora_B") and key in expected and tensor.shape[1] != expected[key].shape[1]:
            raise ValueError(
                f"{source} was saved with LoRA rank r={tensor.shape[1]}, but the model has r={r} "
                f"(key {key}). Convert the model with r={tensor.shape[1]} (e.g. LoraFA(r={tensor.shape[1]}))."
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


def read_adapter_files(directory: str | os.PathLike) -> tuple[LoraFAConfig, dict[str, torch.Tensor], Path]:
    """The saved ``LoraFAConfig`` and tensors of an adapter directory, and the adapter file's path.

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
        saved = LoraFAConfig(**json.loads(config_path.read_text()))
    except (ValueError, TypeError) as error:  # bad JSON or text, or fields that are not LoraFAConfig's
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
    if getattr(model, "lorafa_config", None) is None:
        try:
            apply_lorafa(
                model,
                r=saved.r,
                alpha=saved.alpha,
                dropout=saved.dropout,
                target_modules=saved.target_modules,
                modules_to_save=saved.modules_to_save,
                seed=saved.seed,
                use_rslora=saved.use_rslora,
                init_a=saved.init_a,
            )
        except (ValueError, TypeError) as error:
            raise ValueError(f"Adapter {path} does not fit {type(model).__name__}: {error}") from error
    config = get_lorafa_config(model)
    state = model.state_dict()
    check_adapter_state({key: state[key] for key in adapter_keys(model)}, tensors, f"Adapter {path}", config.r)
    if config.alpha != saved.alpha or config.use_rslora != saved.use_rslora:
        raise ValueError(
            f"Adapter {path} was trained with alpha={saved.alpha}, use_rslora={saved.use_rslora}, but the model "
            f"has alpha={config.alpha}, use_rslora={config.use_rslora}: convert it with the saved settings."
        )
    model.load_state_dict(tensors, strict=False)
    return model
