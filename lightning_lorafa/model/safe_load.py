"""Reading checkpoints without running code from them, unless the caller says it trusts the file.

``torch.load(path, weights_only=True)`` (torch's default since 2.6, and Lightning's) rebuilds tensors and plain Python
data only: a file holding any other object (a pickled call of ``os.system``, a tokenizer in a module's
hyper-parameters) is refused instead of run. Every checkpoint read of this library goes through here:

- ``load_checkpoint_file``: one file (a Lightning ``.ckpt``, a sharded checkpoint's ``meta.pt``);
- ``WeightsOnlyFileSystemReader`` and ``WeightsOnlyLoadPlanner``: ``torch.distributed.checkpoint`` directories (FSDP2),
  whose ``.metadata`` file is a pickle and whose non-tensor entries torch loads with ``weights_only=False``: the reader
  unpickles only the classes of DCP's metadata format, the planner loads entries weights-only;
- ``read_sharded_state``: the model tensors of such a directory, without a process group.

``weights_only=False`` is the caller's explicit choice: it trusts the file (it wrote it itself).
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

TRUST_ADVICE = (
    "Loading them would run code from the file. If you trust it (you wrote it yourself), pass weights_only=False "
    "(`lorafa export --no-weights_only`). A LightningModule whose hyper-parameters hold such an object (a tokenizer, "
    "say) saves it in every checkpoint: self.save_hyperparameters(ignore=[...]) keeps it out."
)


def load_checkpoint_file(path: str | os.PathLike, weights_only: bool = True, map_location: Any = "cpu") -> Any:
    """``torch.load(path, map_location, weights_only)``, refusing what weights-only loading refuses with a message
    that says what to do.

    Raises:
        ValueError: ``weights_only`` and the file holds objects other than tensors and plain data (named).
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} holds objects that weights-only loading refuses ({_detail(error)}). {TRUST_ADVICE}"
        ) from error


def _detail(error: BaseException) -> str:
    """The line of torch's weights-only refusal that names what was refused."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[0] if lines else "")


#: The globals a torch.distributed.checkpoint ``.metadata`` pickle names (its format's dataclasses and enums, the
#: dtypes and memory layouts of its tensors, the checkpoint's path).
_METADATA_MODULES = ("torch.distributed.checkpoint.metadata",)
_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP ``.metadata`` file, refusing any global outside its format."""

    def find_class(self, module: str, name: str) -> Any:
        if module in _METADATA_MODULES or (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(
            getattr(torch, name, None), (torch.dtype, torch.memory_format, torch.layout)
        ):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"the checkpoint metadata names {module}.{name}, which is not part of its format")


class WeightsOnlyFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose metadata pickle may only rebuild DCP's metadata classes."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        path = Path(self.path) / (".metadata" if rank is None else f"__{rank}.metadata")
        try:
            metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
        except pickle.UnpicklingError as error:
            raise ValueError(
                f"{path} holds objects that weights-only loading refuses ({error}). {TRUST_ADVICE}"
            ) from error
        if not isinstance(metadata, Metadata):
            raise ValueError(f"{path} is not the metadata of a torch.distributed.checkpoint directory.")
        if getattr(metadata, "storage_meta", None) is None:  # as FileSystemReader.read_metadata does
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` that loads the checkpoint's non-tensor entries with ``weights_only=True``."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            entry = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as error:
            raise ValueError(
                f"The checkpoint entry {read_item.dest_index.fqn} holds objects that weights-only loading refuses "
                f"({_detail(error)}). {TRUST_ADVICE}"
            ) from error
        checked = io.BytesIO()
        torch.save(entry, checked)
        checked.seek(0)
        super().load_bytes(read_item, checked)


def sharded_reader_and_planner(path: str | os.PathLike, weights_only: bool) -> dict[str, Any]:
    """The ``storage_reader`` and ``planner`` keywords of ``torch.distributed.checkpoint.load`` for ``path``."""
    if weights_only:
        return {"storage_reader": WeightsOnlyFileSystemReader(path), "planner": WeightsOnlyLoadPlanner()}
    return {"storage_reader": FileSystemReader(path), "planner": DefaultLoadPlanner()}


def load_sharded(state: dict[str, Any], path: str | os.PathLike, weights_only: bool = True) -> None:
    """``torch.distributed.checkpoint.load(state, ...)`` from the directory ``path`` (in place), weights-only unless
    told otherwise; a refusal is raised as the ``ValueError`` that says why, not wrapped in DCP's exception."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    keywords = sharded_reader_and_planner(path, weights_only)
    try:
        dcp.load(state, no_dist=not (dist.is_available() and dist.is_initialized()), **keywords)
    except CheckpointException as error:
        refusals = [exc for exc, _ in error.failures.values() if isinstance(exc, ValueError)]  # (exception, trace)
        if refusals:
            raise ValueError(str(refusals[0])) from error
        raise


def read_sharded_state(path: str | os.PathLike, weights_only: bool = True) -> dict[str, torch.Tensor]:
    """The ``state_dict`` tensors of a ``torch.distributed.checkpoint`` directory written by Lightning (its model
    state), read in one process, as full tensors on CPU."""
    metadata = sharded_reader_and_planner(path, weights_only)["storage_reader"].read_metadata()
    state = {
        key: torch.empty(entry.size, dtype=entry.properties.dtype)
        for key, entry in metadata.state_dict_metadata.items()
        if key.startswith("state_dict.") and isinstance(entry, TensorStorageMetadata)
    }
    load_sharded(state, path, weights_only)
    return {key.removeprefix("state_dict."): tensor for key, tensor in state.items()}
