"""The LoRA-FA layer: a frozen linear plus a low-rank branch whose down-projection A is frozen too.

    y = base(x) + s * dropout(x) A^T B^T        x: (..., d_in), A: (r, d_in), B: (d_out, r)

Only B trains. Its gradient needs ``h = dropout(x) A^T`` (..., r), and the input gradient needs
W, A, B and the dropout mask, so backward keeps ``h`` and a dropout seed, never ``x`` (..., d_in)
nor a mask. The frozen ``base(x)`` keeps only its weight (autograd saves ``x`` for a linear only
when the weight needs a gradient).

The base may be a quantized bitsandbytes ``Linear4bit``/``Linear8bitLt`` (both subclass ``nn.Linear``):
B then stays in float32 and merging is refused. It may also be transformers' ``Conv1D`` (GPT-2 and the models
built on it), a linear whose weight is stored transposed, (d_in, d_out): ``fan_in_fan_out`` is then True, A and
B keep the shapes above, and merging adds ``(s B A)^T``, as PEFT's ``fan_in_fan_out`` does.

B's gradient correction ``g_B (A A^T)^{-1} / s^2`` is linear in ``g_B``, so it may run in backward on
each rank's full local gradient (``correct_in_backward``) as well as in the optimizer: sums and means
over data-parallel ranks commute with it. Sharded strategies that flatten B (FSDP1) need the former.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import handle_torch_function, has_torch_function_variadic

from lightning_lorafa.correction import CorrectedGradient, correction_matrix
from lightning_lorafa.dropout import apply_seeded_mask
from lightning_lorafa.init import check_init_a, initialize_lora_A
from lightning_lorafa.kernels import keep_scale
from lightning_lorafa.memory import register_weight_copy

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is optional for plain torch models

    class Conv1D(nn.Module):  # a stand-in no module is an instance of
        pass


def add_lora_fa_branch(
    y: torch.Tensor, x: torch.Tensor, scaled_A: torch.Tensor, lora_B: torch.Tensor, p: float = 0.0
) -> torch.Tensor:
    """``y + s * dropout(x) A^T B^T`` computed as ``y + (x * mask) A'^T B^T`` with ``A' = s A / (1 - p)``.

    y (..., d_out), x (..., d_in), ``scaled_A`` = A' (r, d_in) frozen, B (d_out, r); ``mask`` is a fresh 0/1
    dropout mask with drop probability ``p`` (``p = 0``: none). Plain differentiable ops, so backward runs
    in autograd's C++ engine. With A frozen, autograd keeps ``h = (x * mask) A'^T`` (..., r) for B's
    gradient and never ``x``; the dropout keeps a seed, not a mask. Folding the scales into A (``LoraFALinear``
    keeps A' between steps) leaves no scaling op either way. Under autocast the products run in the
    autocast dtype, like any ``F.linear``.
    """
    if has_torch_function_variadic(y, x, scaled_A, lora_B):  # lets TorchFunctionMode (the recorder) name this op
        return handle_torch_function(add_lora_fa_branch, (y, x, scaled_A, lora_B), y, x, scaled_A, lora_B, p)
    if p > 0.0:
        x = apply_seeded_mask(x, p, 1.0)
    out = F.linear(F.linear(x, scaled_A), lora_B)  # (..., r) -> (..., d_out)
    if out.dtype != y.dtype:  # a quantized base computes in its own dtype while B stays float32
        out = out.to(y.dtype)
    return torch.add(y, out)


def branch_dtype(x: torch.Tensor, lora_B: torch.Tensor) -> tuple[torch.dtype, torch.Tensor]:
    """``(dtype, lora_B)`` for a branch on input ``x``: under autocast, the autocast dtype (what autocast casts A
    to; B is cast by autocast itself); otherwise x's dtype, with B cast to it when they differ (half inputs to a
    quantized base, whose A and B are float32)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type), lora_B
    return x.dtype, lora_B if lora_B.dtype == x.dtype else lora_B.to(x.dtype)


def scaled_copy(cache: dict, lora_A: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """``scale * lora_A`` in ``dtype`` (any shape), computed in float32 and rounded once.

    Kept in ``cache`` while A is unchanged (A is frozen), one copy per (dtype, scale), so forward launches no cast
    and no scaling; under ``torch.compile`` computed inline, which the compiler fuses. The copy counts as a weight
    for the saved-activation recorder (``register_weight_copy``).
    """
    if torch.compiler.is_compiling():
        return (lora_A.float() * scale).to(dtype)
    key = (dtype, scale)
    cached = cache.get(key)
    if cached is None or cached[0] is not lora_A or cached[1] != lora_A._version:
        if len(cache) >= 2:  # train and eval scales; anything else replaces them
            cache.clear()
        scaled = register_weight_copy((lora_A.detach().float() * scale).to(dtype))
        cached = cache[key] = (lora_A, lora_A._version, scaled)
    return cached[2]


class LoraFALinear(nn.Module):
    """A frozen ``nn.Linear`` with a LoRA-FA branch: ``y = base(x) + s * dropout(x) A^T B^T``.

    Args:
        base: the linear layer to adapt; its parameters are frozen. Shapes: weight (d_out, d_in), or
            (d_in, d_out) for transformers' ``Conv1D``.
        r: rank of the branch, ``1 <= r <= min(d_in, d_out)``.
        alpha: scale numerator: ``s = alpha / r`` (or ``alpha / sqrt(r)`` with ``use_rslora``).
        dropout: probability of dropping entries of x on the branch, in [0, 1). Its mask is
            regenerated in backward from a seed, so it costs no activation memory.
        use_rslora: use rank-stabilised scaling ``alpha / sqrt(r)``.
        seed: seed of A's draw (A is a frozen buffer, saved in state dicts).
        init_a: how A is drawn: ``"kaiming"`` (PEFT's LoRA A) or ``"orthogonal"`` (``lightning_lorafa.init``).

    A layer built on the meta device (a model too large for a CPU copy) has no values yet: after
    ``to_empty(device=...)``, ``reset_parameters()`` gives it exactly the A and B of a layer built on CPU.

    Attributes:
        lora_A: buffer (r, d_in), frozen.
        lora_B: parameter (d_out, r), zero-initialised, the only trainable tensor; float32 when the
            base is quantized.
        scaling: ``s``.
        merged: whether ``s * B A`` is currently folded into ``base.weight``.
        fan_in_fan_out: the base stores its weight (d_in, d_out) (transformers' ``Conv1D``).
        correct_in_backward: apply the gradient correction in backward, so that ``lora_B.grad`` is
            already corrected (set by the ``LoraFA`` callback under FSDP1; ``LoraFAOptimizer`` then
            leaves this layer's gradient alone).

    Raises:
        TypeError: ``base`` is not an ``nn.Linear`` or a transformers ``Conv1D``.
        ValueError: ``r``, ``alpha`` or ``dropout`` out of range.
    """

    #: The base's parameter the branch adds to, and merging folds into.
    weight_name = "weight"

    def __init__(
        self,
        base: nn.Linear | Conv1D,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        seed: int = 0,
        init_a: str = "kaiming",
    ) -> None:
        super().__init__()
        set_adapter_settings(self, r, alpha, dropout, use_rslora, seed, init_a)  # checked first
        d_in, d_out = self.base_features(base)
        if r > min(d_in, d_out):
            raise ValueError(
                f"r={r} exceeds min(in_features, out_features)={min(d_in, d_out)} "
                f"of this layer ({d_in} -> {d_out}); choose a smaller r."
            )
        self.base = base
        self.fan_in_fan_out = isinstance(base, Conv1D)
        self.base.requires_grad_(False)
        weight = self.base_weight(base)
        full_precision = weight.is_floating_point() and not is_quantized(base)
        factory = {"device": weight.device, "dtype": weight.dtype if full_precision else torch.float32}
        self.register_buffer("lora_A", torch.empty(r, d_in, **factory))
        self.lora_B = nn.Parameter(torch.empty(d_out, r, **factory))
        self.merged = False
        self.correct_in_backward = False
        self._scaled_A: dict[tuple[torch.dtype, float], tuple[torch.Tensor, int, torch.Tensor]] = {}
        if weight.device.type != "meta":
            self.reset_parameters()

    @staticmethod
    def base_features(base: nn.Module) -> tuple[int, int]:
        """``(d_in, d_out)`` of a base this class adapts; raises ``TypeError`` for any other module."""
        if not is_linear(base):
            raise TypeError(
                f"LoraFALinear adapts nn.Linear layers, got {type(base).__name__} (transformers' Conv1D works too)."
            )
        return linear_features(base)

    @staticmethod
    def base_weight(base: nn.Module) -> torch.Tensor:
        """The base's weight the branch adds to (and merging folds into)."""
        return base.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A (r, d_in) drawn from ``seed`` as ``init_a`` says, B (d_out, r) zero: the adapter of a fresh layer.
        The base layer is a child module with its own ``reset_parameters``; it is left alone here."""
        initialize_lora_A(self, self.seed, self.init_a)
        self.lora_B.zero_()
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.lora_A.shape[1]

    @property
    def out_features(self) -> int:
        return self.lora_B.shape[0]

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight (d_out, d_in), or (d_in, d_out) for a ``Conv1D`` base; models such as T5 read
        ``layer.weight.dtype``."""
        return self.base_weight(self.base)

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base, "bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., d_in) -> (..., d_out)."""
        y = self.base(x)
        return y if self.merged else self.add_branch(y, x)

    def add_branch(self, y: torch.Tensor, x: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        """``y + s * dropout(x) A^T B^T`` for the base's output y (..., d_out) on its input x (..., d_in); with
        ``rows``, for a product with those rows of the base's weight only (y (..., rows), B's rows ``rows``)."""
        p = self.dropout if self.training else 0.0
        dtype, lora_B = branch_dtype(x, self.lora_B)
        if self.correct_in_backward and lora_B.requires_grad:
            lora_B = CorrectedGradient.apply(lora_B, correction_matrix(self))
        if rows is not None:
            lora_B = lora_B[rows]
        scale = self.scaling * keep_scale(p)  # keep_scale(0.0) is 1.0
        return add_lora_fa_branch(y, x, self.scaled_lora_A(dtype, scale), lora_B, p)

    def scaled_lora_A(self, dtype: torch.dtype, scale: float) -> torch.Tensor:
        """``scale * A`` (r, d_in) in ``dtype``, computed in float32 and rounded once (``scaled_copy``)."""
        return scaled_copy(self._scaled_A, self.lora_A, dtype, scale)

    def delta_weight(self) -> torch.Tensor:
        """``s * B A`` (d_out, d_in), computed in float32; transposed, (d_in, d_out), for a ``Conv1D`` base,
        so that it adds to ``base.weight`` as stored."""
        delta = (self.lora_B.detach().float() @ self.lora_A.float()) * self.scaling
        return delta.t() if self.fan_in_fan_out else delta

    def _check_mergeable(self) -> None:
        if is_quantized(self.base):
            raise TypeError(
                f"Cannot merge into a quantized {type(self.base).__name__} base: its weight is not a float tensor. "
                "Save the adapter (save_adapter), load it into the base model in 16/32-bit (load_adapter), "
                "and merge there (merge_lorafa)."
            )

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``s * B A`` into ``base.weight`` (no-op if already merged).

        Raises:
            TypeError: the base is quantized (bitsandbytes).
        """
        self._check_mergeable()
        if not self.merged:
            weight = self.weight
            weight.copy_((weight.float() + self.delta_weight()).to(weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract ``s * B A`` from ``base.weight`` again (no-op if not merged)."""
        self._check_mergeable()
        if self.merged:
            weight = self.weight
            weight.copy_((weight.float() - self.delta_weight()).to(weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, dropout={self.dropout}, merged={self.merged}"


def is_linear(module: nn.Module) -> bool:
    """Whether ``LoraFALinear`` can adapt ``module``: an ``nn.Linear`` (bitsandbytes' quantized ones included)
    or transformers' ``Conv1D``."""
    return isinstance(module, (nn.Linear, Conv1D))


def linear_features(module: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` of an ``nn.Linear`` or a transformers ``Conv1D`` (weight (d_in, d_out))."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def is_quantized(linear: nn.Module) -> bool:
    """Whether ``linear`` is a bitsandbytes quantized linear (``Linear4bit``, ``Linear8bitLt``, ...)."""
    return type(linear).__module__.startswith("bitsandbytes.")


def set_adapter_settings(
    module: nn.Module, r: int, alpha: float, dropout: float, use_rslora: bool, seed: int, init_a: str
) -> None:
    """Check an adapter's settings and set them on ``module`` (a ``LoraFALinear`` or ``LoraFAExperts``) with its
    scaling ``s = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``)."""
    check_lora_arguments(r, alpha, dropout)
    check_init_a(init_a)
    module.r, module.alpha, module.dropout, module.use_rslora = r, alpha, float(dropout), use_rslora
    module.seed, module.init_a = seed, init_a
    module.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r


def check_lora_arguments(r: int, alpha: float, dropout: float) -> None:
    """Raise ``ValueError`` with advice when ``r``, ``alpha`` or ``dropout`` is out of range."""
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"r must be a positive integer (the adapter rank), got {r!r}.")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0 (scaling is alpha / r), got {alpha!r}.")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}.")
