"""Adapter-only state: what training changes (A, B, ``modules_to_save``), saved without the frozen base.

One rule decides what an adapter holds (``adapter_keys``): every ``lora_A``/``lora_B``, every entry of the
``modules_to_save``, and a token embedding weight whose rows differ from the pretrained vocabulary's
(``resize_token_embeddings``: the new rows are not in the base checkpoint, so a reload needs them). It serves
``save_adapter``/``load_adapter`` (safetensors files), the ``LoraFA`` callback's Lightning checkpoints
(``keep_adapter_only``, ``fill_frozen_tensors``), ``load_from_checkpoint`` (a LightningModule from an adapter-only
checkpoint), ``TrainingState`` (Fabric and plain PyTorch resume) and ``LoraFAModelParallelStrategy`` (FSDP2).

A is stored as a tensor (not only its seed), so a restored layer has exactly the A it trained with.
Files are written to a temporary name and renamed into place (``atomic_write``, ``AtomicCheckpointIO``), so a
crash never leaves a half file; a file damaged some other way (a cut-off copy, an empty file, another format)
is refused with its name. Checkpoints are read weights-only unless the caller passes ``weights_only=False``
(``lightning_lorafa.safe_load``).
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lightning_lorafa import _compat
from lightning_lorafa.convert import LoraFAConfig, apply_lorafa, get_lorafa_config
from lightning_lorafa.safe_load import load_checkpoint_file

ADAPTER_FILE = "adapter.safetensors"
CONFIG_FILE = "lorafa_config.json"


#: The first entry of every adapter-only Lightning checkpoint: loading it with Lightning's own
#: ``MyModule.load_from_checkpoint(path)``, which cannot rebuild the frozen base, fails with this key in its message.
ADAPTER_ONLY_MARKER = (
    "LoRA-FA adapter-only checkpoint: load it with lightning_lorafa.load_from_checkpoint(MyModule, path), which "
    "loads the base model and the adapter"
)


def adapter_keys(model: nn.Module, prefix: str = "") -> list[str]:
    """State-dict keys of ``model`` (each with ``prefix``) that an adapter checkpoint holds: every
    ``lora_A``/``lora_B``, every entry of the ``modules_to_save``, and every resized token embedding weight
    (``resized_embeddings``)."""
    model = _compat.uncompiled(model)
    save_roots = tuple(name + "." for name in get_lorafa_config(model).modules_to_save)
    resized = set(resized_embeddings(model))
    keys = [
        key
        for key in model.state_dict(keep_vars=True)
        if key.endswith((".lora_A", ".lora_B")) or key.startswith(save_roots) or key in resized
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
    if not any(key.endswith((".lora_A", ".lora_B")) for key in state_dict):
        raise ValueError(
            "The checkpoint holds no LoRA-FA adapter (no lora_A/lora_B tensors): it was written by training "
            "without LoraFA. To start LoRA-FA from its weights, load them into the model first (e.g. "
            "MyModule.load_from_checkpoint(path) in a run without LoraFA, or "
            "module.load_state_dict(torch.load(path)['state_dict'])), then call trainer.fit(module) with LoraFA "
            "and without ckpt_path."
        )
    check_vocabulary(state_dict, own, "The checkpoint", embedding_keys(module))
    given = {
        key: value for key, value in state_dict.items() if key in expected or key.endswith((".lora_A", ".lora_B"))
    }
    configs = [sub.lorafa_config for sub in module.modules() if "lorafa_config" in vars(sub)]
    check_adapter_state(expected, given, "The checkpoint", configs[0].r if configs else 0)
    for key, value in own.items():
        state_dict.setdefault(key, value.detach())


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
        if key.endswith(".lora_B") and key in expected and tensor.shape[-1] != expected[key].shape[-1]:
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


def saved_lorafa_config(checkpoint: Mapping[str, Any]) -> LoraFAConfig:
    """The ``LoraFAConfig`` a ``LoraFA`` callback stored in a Lightning checkpoint (its callback state).

    Raises:
        ValueError: the checkpoint holds no ``LoraFA`` callback state (not written with the callback).
    """
    for key, state in (checkpoint.get("callbacks") or {}).items():
        if str(key).startswith("LoraFA") and isinstance(state, Mapping):
            if "config" in state:
                return LoraFAConfig(**state["config"])
            lora = dict(state.get("lora", {}))
            if lora:  # written before the resolved config was stored: convert with the settings themselves
                lora.pop("exclude", None)
                lora["modules_to_save"] = lora.get("modules_to_save") or []  # None meant none then
                return LoraFAConfig(**lora)  # target_modules is resolved again on the fresh model
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
    given = {key: value for key, value in saved.items() if key in expected or key.endswith((".lora_A", ".lora_B"))}
    check_adapter_state(expected, given, source, config.r)
    module.load_state_dict({key: value for key, value in saved.items() if key in own}, strict=False)
    return module


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
        saved, config = LoraFAConfig(**state["config"]), get_lorafa_config(self.model)
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
