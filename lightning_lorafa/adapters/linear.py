"""The LoRA-FA layer: a frozen linear plus a low-rank branch whose down-projection A is frozen too.

    y = base(x) + s * dropout(x) A^T B^T        x: (..., d_in), A: (r, d_in), B: (d_out, r)

The frozen ``base(x)`` keeps only its weight (autograd saves ``x`` for a linear only when the weight needs a
gradient), and the branch keeps ``h = dropout(x) A^T`` and a seed (``adapters.base``).

The base may be a quantized bitsandbytes ``Linear4bit``/``Linear8bitLt`` (both subclass ``nn.Linear``): B then stays
in float32 and merging is refused. It may also be transformers' ``Conv1D`` (GPT-2 and the models built on it), a
linear whose weight is stored transposed, (d_in, d_out): ``fan_in_fan_out`` is then True, A and B keep the shapes
above, and merging adds ``(s B A)^T``, as PEFT's ``fan_in_fan_out`` does.

B's gradient correction ``g_B (A A^T)^{-1} / s^2`` is linear in ``g_B``, so it may run in backward on each rank's
full local gradient (``correct_in_backward``) as well as in the optimizer: sums and means over data-parallel ranks
commute with it. Sharded strategies that flatten B (FSDP1) need the former.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_lorafa.adapters.base import FROZEN, TRAINED, LoraFAAdapter, add_lora_fa_branch, lora_fa_down
from lightning_lorafa.adapters.dropout_masks import keep_scale

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is optional for plain torch models

    class Conv1D(nn.Module):  # a stand-in no module is an instance of
        pass


class LoraFALinear(LoraFAAdapter):
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
        init_a: how A is drawn: ``"kaiming"`` (PEFT's LoRA A) or ``"orthogonal"``
            (``lightning_lorafa.adapters.initialization``).

    Attributes: those of ``LoraFAAdapter`` (lora_A (r, d_in), lora_B (d_out, r), scaling, merged,
    correct_in_backward), and ``fan_in_fan_out``: the base stores its weight (d_in, d_out) (``Conv1D``).

    Raises:
        TypeError: ``base`` is not an ``nn.Linear`` or a transformers ``Conv1D``.
        ValueError: ``r``, ``alpha`` or ``dropout`` out of range.
    """

    #: The base's parameter the branch adds to, and merging folds into.
    weight_name = "weight"

    def __init__(
        self,
        base: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        seed: int = 0,
        init_a: str = "kaiming",
    ) -> None:
        d_in, d_out = self.base_features(base)
        weight = self.base_weight(base)
        full_precision = weight.is_floating_point() and not is_quantized(base)
        factory = {"device": weight.device, "dtype": weight.dtype if full_precision else torch.float32}
        super().__init__((), d_in, d_out, r, alpha, dropout, use_rslora, seed, init_a, factory)
        self.base = base
        self.fan_in_fan_out = isinstance(base, Conv1D)
        self.base.requires_grad_(False)

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
        scaled_A, lora_B = self.branch_operands(x, self.scaling * keep_scale(p))  # keep_scale(0.0) is 1.0
        return add_lora_fa_branch(y, x, scaled_A, lora_B if rows is None else lora_B[rows], p)

    def branch_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h, B)`` of the branch on x (..., d_in): ``h = s * dropout(x) A^T`` (..., r) and B (d_out, r), so that
        the branch is ``h B^T`` (for a consumer that multiplies by B itself, as the chunked loss does)."""
        p = self.dropout if self.training else 0.0
        scaled_A, lora_B = self.branch_operands(x, self.scaling * keep_scale(p))
        return lora_fa_down(x, scaled_A, p), lora_B

    def _check_mergeable(self) -> None:
        if is_quantized(self.base):
            raise TypeError(
                f"Cannot merge into a quantized {type(self.base).__name__} base: its weight is not a float tensor. "
                "Save the adapter (save_adapter), load it into the base model in 16/32-bit (load_adapter), "
                "and merge there (merge_lorafa)."
            )

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``s * B A`` into the base weight (no-op if already merged).

        Raises:
            TypeError: the base is quantized (bitsandbytes).
        """
        self._fold(1.0)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract ``s * B A`` from the base weight again (no-op if not merged)."""
        self._fold(-1.0)

    def _fold(self, sign: float) -> None:
        self._check_mergeable()
        if self.merged != (sign > 0):
            self.weight.copy_(self.merged_weight(self.weight, sign, self.fan_in_fan_out))
            self.merged = sign > 0

    def folded_state(self, state: dict, prefix: str) -> dict:
        """``state`` (a state dict) with this layer's entries (keys starting with ``prefix``) replaced by those of
        its plain base with the adapter folded in: A and B dropped, ``<prefix>base.<name>`` renamed
        ``<prefix><name>``, ``s B A`` added to the weight (unless merged already). ``state`` itself when its
        entries are folded already.

        Raises:
            TypeError: the base is quantized.
        """
        self._check_mergeable()
        dropped = (prefix + FROZEN, prefix + TRAINED)
        if dropped[1] not in state:
            return state
        base_prefix, folded = prefix + "base.", {}
        for key, tensor in state.items():
            if key in dropped:
                continue
            if key.startswith(base_prefix):
                name = key[len(base_prefix) :]
                if name == self.weight_name and not self.merged:
                    tensor = self.merged_weight(tensor, 1.0, self.fan_in_fan_out)
                key = prefix + name
            folded[key] = tensor
        return folded


def is_linear(module: nn.Module) -> bool:
    """Whether ``LoraFALinear`` can adapt ``module``: an ``nn.Linear`` (bitsandbytes' quantized ones included)
    or transformers' ``Conv1D``."""
    return isinstance(module, (nn.Linear, Conv1D)) and not isinstance(module, LoraFAAdapter)


def linear_features(module: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` of an ``nn.Linear`` or a transformers ``Conv1D`` (weight (d_in, d_out))."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def is_quantized(linear: nn.Module | None) -> bool:
    """Whether ``linear`` is a bitsandbytes quantized linear (``Linear4bit``, ``Linear8bitLt``, ...)."""
    return linear is not None and any(c.__module__.startswith("bitsandbytes.") for c in type(linear).__mro__)
