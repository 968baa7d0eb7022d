"""Measuring what a training step keeps for backward, and its CUDA peak memory and throughput.

``SavedActivationRecorder`` sees every tensor autograd saves (``torch.autograd.graph.saved_tensors_hooks``)
while it is active and labels it with the torch function, or the custom ``autograd.Function``, that saved it;
``lora_fa_branch`` for the products of a LoRA-FA adapter of the ``module`` given (its ``h = x A^T``), ``dropout seed``
for the seed a seed-kept dropout keeps instead of its mask. Bytes are counted per storage, once: views and tensors
saved by several ops share one storage. Weights (parameters, their views, and the buffers of the ``module`` given,
and its adapters' scaled copies of A) are kept apart in ``weight_bytes``: they exist whether or not backward runs,
while activations are what training adds. The library's layers know nothing of this recorder.
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from lightning_lorafa import _compat
from lightning_lorafa.adapters.base import LoraFAAdapter


@dataclass(frozen=True)
class SavedTensor:
    """One storage kept for backward: who saved it first, its shape and dtype, and the storage's bytes."""

    op: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    is_weight: bool


@dataclass
class ActivationReport:
    """Saved-for-backward bytes of one recorded forward, activations and weights apart."""

    tensors: list[SavedTensor] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        """Activation bytes (distinct storages, weights excluded)."""
        return sum(t.nbytes for t in self.tensors if not t.is_weight)

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights saved for backward (parameters, their views, the module's buffers)."""
        return sum(t.nbytes for t in self.tensors if t.is_weight)

    @property
    def num_tensors(self) -> int:
        """Number of distinct activation storages."""
        return sum(not t.is_weight for t in self.tensors)

    @property
    def by_op(self) -> dict[str, int]:
        """Activation bytes per saving op, largest first."""
        counts: Counter[str] = Counter()
        for t in self.tensors:
            if not t.is_weight:
                counts[t.op] += t.nbytes
        return dict(counts.most_common())

    def to_markdown(self) -> str:
        """A markdown table of activation MiB and tensor count per op, with totals."""
        tensors: Counter[str] = Counter(t.op for t in self.tensors if not t.is_weight)
        lines = ["| op | activation MiB | tensors |", "|---|---:|---:|"]
        lines += [f"| {op} | {_mib(n)} | {tensors[op]} |" for op, n in self.by_op.items()]
        lines.append(f"| **total** | **{_mib(self.total_bytes)}** | **{self.num_tensors}** |")
        lines.append(f"| weights (not counted) | {_mib(self.weight_bytes)} | {len(self.tensors) - self.num_tensors} |")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f}"


class _CurrentOp(TorchFunctionMode):
    """Tracks the outermost torch function being called, so pack hooks can name the op that saves. The two
    products of a LoRA-FA branch are ``lora_fa_branch``: ``F.linear`` with one of ``adapter_weights()`` (an
    adapter's scaled copy of A, or B) as its weight, and ``F.linear`` of what such a product returned (h)."""

    def __init__(self, adapter_weights: Callable[[], set[int]]) -> None:
        super().__init__()
        self.name: str | None = None
        self.adapter_weights = adapter_weights
        self._branch_outputs: set[int] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func)).strip("_")
        branch = func is F.linear and len(args) > 1 and (
            _storage(args[1]) in self.adapter_weights() or _storage(args[0]) in self._branch_outputs
        )
        outer, self.name = self.name, self.name or (BRANCH if branch else name)
        try:
            out = func(*args, **(kwargs or {}))
        finally:
            self.name = outer
        if branch:
            self._branch_outputs.add(_storage(out))
        return out


def _storage(tensor: Any) -> int | None:
    return tensor.untyped_storage().data_ptr() if isinstance(tensor, torch.Tensor) else None


#: The labels of what a LoRA-FA adapter keeps: its branch's products, and a seed-kept dropout's seed.
BRANCH, SEED = "lora_fa_branch", "dropout seed"


def _autograd_function_name() -> str | None:
    """Name of the custom ``autograd.Function`` whose ``apply`` is on the stack, if any."""
    frame = inspect.currentframe()
    while frame is not None:
        owner = frame.f_locals.get("cls")
        if frame.f_code.co_name == "apply" and isinstance(owner, type) and issubclass(owner, torch.autograd.Function):
            return owner.__name__
        frame = frame.f_back
    return None


class SavedActivationRecorder:
    """Context manager recording the tensors autograd saves for backward inside it.

    ``module``: optional; storages of its parameters and buffers, and its LoRA-FA adapters' scaled copies of A,
    count as weights, and its adapters' products are labelled ``lora_fa_branch`` (parameters and their views are
    recognised as weights without it; frozen buffers, e.g. a LoRA-FA ``lora_A``, are not).

    Example::

        with SavedActivationRecorder(model) as rec:
            loss = model(**batch).loss
        print(rec.report().total_bytes)

    ``__enter__``/``__exit__`` may also be called from separate hooks (e.g. a callback's
    ``on_train_batch_start`` and ``on_before_backward``). Storages are recognised by address while the
    recorded graph keeps them alive, so record one forward at a time.
    """

    def __init__(self, module: nn.Module | None = None) -> None:
        self._weights = set()
        self._adapters: list[LoraFAAdapter] = []
        if module is not None:
            self._weights = {t.untyped_storage().data_ptr() for t in (*module.parameters(), *module.buffers())}
            self._adapters = [m for m in module.modules() if isinstance(m, LoraFAAdapter)]
        self._seen: dict[int, SavedTensor] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
        self._mode = _CurrentOp(self._adapter_weights)

    def _adapter_weights(self) -> set[int]:
        """Storages of the adapters' B's and of their scaled copies of A (made in forward, kept between steps)."""
        tensors = [a.lora_B for a in self._adapters] + [c for a in self._adapters for c in a.weight_copies()]
        return {t.untyped_storage().data_ptr() for t in tensors}

    def __enter__(self) -> SavedActivationRecorder:
        self._seen.clear()
        self._hooks.__enter__()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._mode.__exit__(*exc)
        self._hooks.__exit__(*exc)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in self._seen and storage.nbytes() > 0:
            base = _compat.tensor_base(tensor)
            is_weight = isinstance(base, nn.Parameter) or key in self._weights or key in self._adapter_weights()
            op = (self._mode.name or _autograd_function_name()) or "unknown"
            if tensor.dtype == torch.int64 and tensor.dim() == 0 and op in ("mul", "addcmul"):
                op = SEED  # what a seed-kept dropout's product saves instead of its mask
            self._seen[key] = SavedTensor(op, tuple(tensor.shape), tensor.dtype, storage.nbytes(), is_weight)
        return tensor

    def report(self) -> ActivationReport:
        """What was saved since ``__enter__``, each storage once."""
        return ActivationReport(list(self._seen.values()))


def _unpack(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def measure_saved_activations(step: Callable[[], Any], module: nn.Module | None = None) -> ActivationReport:
    """Run ``step`` (a training forward, e.g. ``lambda: model(**batch).loss``) under a recorder; report it.

    The graph ``step`` builds is dropped afterwards (no backward runs).
    """
    with SavedActivationRecorder(module) as recorder:
        step()
    return recorder.report()


@dataclass(frozen=True)
class StepStats:
    """Median wall time of a step, tokens per second, and (on CUDA) peak allocated bytes; None elsewhere."""

    seconds: float
    tokens_per_second: float
    peak_allocated_bytes: int | None


def measure_step(
    step: Callable[[], Any], tokens: int, repeats: int = 3, warmup: int = 1, device: torch.device | str = "cpu"
) -> StepStats:
    """Time ``step`` (forward, backward and optimizer step) ``repeats`` times after ``warmup`` runs.

    ``tokens``: tokens one step processes (batch * sequence). ``device``: where the step runs. On a CUDA
    device, synchronizes around each step and reports ``torch.cuda.max_memory_allocated`` over the timed
    steps; elsewhere ``peak_allocated_bytes`` is None (also when CUDA is present but the step runs on CPU).
    """
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return StepStats(seconds, tokens / seconds, torch.cuda.max_memory_allocated() if cuda else None)
