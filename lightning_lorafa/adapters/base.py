"""The LoRA-FA adapter: a frozen A, a trainable B and a scale, and the branch they add to a frozen weight's product.

    y = base(x) + s * dropout(x) A^T B^T        x: (..., d_in), A: (r, d_in), B: (d_out, r)

Only B trains. Its gradient needs ``h = dropout(x) A^T`` (..., r), and the input gradient needs A, B and the
dropout mask, so backward keeps ``h`` and a dropout seed, never ``x`` (..., d_in) nor a mask.

``LoraFAAdapter`` is what every adapter shares -- the linear layer's (``LoraFALinear``: ``nn.Linear``, transformers'
``Conv1D``, a MoE router, ``nn.MultiheadAttention``) and each fused experts projection's (one A and B per expert,
stacked: A (E, r, d_in), B (E, d_out, r)): the tensors and their names (only this module spells them), the scale,
A's draw, the scaled copy of A the branch multiplies by, the gradient correction in backward, and ``s B A``
folded into (or out of) a weight -- merging, written once.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from lightning_lorafa import _compat
from lightning_lorafa.adapters.correction import CorrectedGradient, correction_matrix
from lightning_lorafa.adapters.dropout import apply_seeded_mask
from lightning_lorafa.adapters.initialization import draw_lora_A, expert_seed
from lightning_lorafa.settings import check_adapter_arguments, scaling

#: The names of an adapter's tensors in state dicts: the frozen A (a buffer) and the trained B (a parameter).
FROZEN, TRAINED = "lora_A", "lora_B"


def is_adapter_tensor(key: str) -> bool:
    """Whether the state-dict ``key`` names an adapter's A or B."""
    return key.rpartition(".")[2] in (FROZEN, TRAINED)


def add_lora_fa_branch(
    y: torch.Tensor, x: torch.Tensor, scaled_A: torch.Tensor, lora_B: torch.Tensor, p: float = 0.0
) -> torch.Tensor:
    """``y + s * dropout(x) A^T B^T`` computed as ``y + (x * mask) A'^T B^T`` with ``A' = s A / (1 - p)``.

    y (..., d_out), x (..., d_in), ``scaled_A`` = A' (r, d_in) frozen, B (d_out, r); ``mask`` is a fresh 0/1
    dropout mask with drop probability ``p`` (``p = 0``: none). Plain differentiable ops, so backward runs in
    autograd's C++ engine: with A frozen it keeps ``h = (x * mask) A'^T`` (..., r) for B's gradient and never
    ``x``; the dropout keeps a seed, not a mask. Under autocast the products run in the autocast dtype.
    """
    out = F.linear(lora_fa_down(x, scaled_A, p), lora_B)  # (..., r) -> (..., d_out)
    if out.dtype != y.dtype:  # a quantized base computes in its own dtype while B stays float32
        out = out.to(y.dtype)
    return torch.add(y, out)


def lora_fa_down(x: torch.Tensor, scaled_A: torch.Tensor, p: float = 0.0) -> torch.Tensor:
    """``h = (x * mask) A'^T`` (..., r): the branch's down-projection, all that backward keeps of it (with a seed
    when ``p > 0``)."""
    if p > 0.0:
        x = apply_seeded_mask(x, p, 1.0)
    return F.linear(x, scaled_A)


def branch_dtype(x: torch.Tensor, lora_B: torch.Tensor) -> tuple[torch.dtype, torch.Tensor]:
    """``(dtype, lora_B)`` for a branch on input ``x``: under autocast, the autocast dtype (what autocast casts A
    to; B is cast by autocast itself); otherwise x's dtype, with B cast to it when they differ (half inputs to a
    quantized base, whose A and B are float32)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type), lora_B
    return x.dtype, lora_B if lora_B.dtype == x.dtype else lora_B.to(x.dtype)


class LoraFAAdapter(nn.Module):
    """A frozen A (*stack, r, d_in), a trainable B (*stack, d_out, r) and the scale ``s``.

    ``stack`` is ``()`` for one weight, ``(E,)`` for the E experts of a fused projection (expert e's A drawn from
    ``expert_seed(seed, e)``). A module built on the meta device has no values yet: after ``to_empty``,
    ``reset_parameters()`` gives it exactly the A and B of one built on CPU.

    Attributes:
        lora_A: buffer, frozen; saved in state dicts, so a restored adapter has the exact A it trained with.
        lora_B: parameter, zero-initialised, the only trainable tensor (float32 when ``factory`` asks for it).
        r, alpha, dropout, use_rslora, seed, init_a: the settings; ``scaling``: ``s``.
        merged: whether ``s B A`` is folded into the weight it adapts.
        correct_in_backward: apply the gradient correction in backward, so that ``lora_B.grad`` is corrected
            already (set under sharded strategies; optimizers then leave it alone).

    Raises:
        TypeError, ValueError: a setting of the wrong type or range (named), or ``r > min(d_in, d_out)``.
    """

    def __init__(
        self,
        stack: tuple[int, ...],
        d_in: int,
        d_out: int,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        seed: int = 0,
        init_a: str = "kaiming",
        factory: dict | None = None,
    ) -> None:
        super().__init__()
        check_adapter_arguments(type(self).__name__, r, alpha, dropout, use_rslora, seed, init_a)
        if r > min(d_in, d_out):
            raise ValueError(
                f"r={r} exceeds min(in_features, out_features)={min(d_in, d_out)} of this layer ({d_in} -> {d_out}); "
                "choose a smaller r."
            )
        self.r, self.alpha, self.dropout, self.use_rslora = r, alpha, float(dropout), use_rslora
        self.seed, self.init_a = seed, init_a
        self.scaling = scaling(alpha, r, use_rslora)
        self.merged = False
        self.correct_in_backward = False
        self.register_buffer(FROZEN, torch.empty(*stack, r, d_in, **(factory or {})))
        setattr(self, TRAINED, nn.Parameter(torch.empty(*stack, d_out, r, **(factory or {}))))
        self._scaled_A: dict[tuple[torch.dtype, float], tuple[torch.Tensor, int, torch.Tensor]] = {}
        if self.lora_A.device.type != "meta":
            self.reset_parameters()

    @property
    def in_features(self) -> int:
        return self.lora_A.shape[-1]

    @property
    def out_features(self) -> int:
        return self.lora_B.shape[-2]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A drawn from ``seed`` as ``init_a`` says (per expert for a stack), B zero: a fresh adapter."""
        r, d_in = self.lora_A.shape[-2:]
        if self.lora_A.ndim == 2:
            self.lora_A.copy_(draw_lora_A(r, d_in, self.seed, self.init_a))
        else:
            for index in range(self.lora_A.shape[0]):
                self.lora_A[index].copy_(draw_lora_A(r, d_in, expert_seed(self.seed, index), self.init_a))
        self.lora_B.zero_()
        self.merged = False

    def scaled_lora_A(self, dtype: torch.dtype, scale: float) -> torch.Tensor:
        """``scale * A`` in ``dtype``, computed in float32 and rounded once.

        Kept while A is unchanged (A is frozen), one copy per (dtype, scale), so forward launches no cast and no
        scaling; under ``torch.compile`` computed inline, which the compiler fuses.
        """
        lora_A = self.lora_A
        if torch.compiler.is_compiling():
            return (lora_A.float() * scale).to(dtype)
        key = (dtype, scale)
        cached = self._scaled_A.get(key)
        version = _compat.tensor_version(lora_A)
        if cached is None or cached[0] is not lora_A or cached[1] != version:
            if len(self._scaled_A) >= 2:  # train and eval scales; anything else replaces them
                self._scaled_A.clear()
            scaled = (lora_A.detach().float() * scale).to(dtype)
            cached = self._scaled_A[key] = (lora_A, version, scaled)
        return cached[2]

    def weight_copies(self) -> list[torch.Tensor]:
        """The scaled copies of A kept between steps: weights, not activations, for a profiler."""
        return [entry[2] for entry in self._scaled_A.values()]

    def branch_operands(self, x: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A', B)`` for a branch on inputs like ``x``: ``scale * A`` in the branch's dtype, and B cast as the
        branch needs, through the in-backward correction when ``correct_in_backward`` is set."""
        dtype, lora_B = branch_dtype(x, self.lora_B)
        if self.correct_in_backward and lora_B.requires_grad:
            lora_B = CorrectedGradient.apply(lora_B, correction_matrix(self))
        return self.scaled_lora_A(dtype, scale), lora_B

    def delta_weight(self, transposed: bool = False) -> torch.Tensor:
        """``s B A`` (*stack, d_out, d_in) in float32; ``transposed``: (*stack, d_in, d_out)."""
        delta = torch.matmul(self.lora_B.detach().float(), self.lora_A.float()) * self.scaling
        return delta.transpose(-1, -2) if transposed else delta

    def merged_weight(self, weight: torch.Tensor, sign: float = 1.0, transposed: bool = False) -> torch.Tensor:
        """``weight + sign * s B A``, summed in float32 and rounded once to ``weight``'s dtype: merging (``sign=1``),
        unmerging (``-1``), and the merged tensors of a state dict (``lightning_lorafa.model.merge``)."""
        delta = self.delta_weight(transposed).to(weight.device)
        return (weight.detach().float() + sign * delta).to(weight.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, dropout={self.dropout}, merged={self.merged}"


def adapter_state_keys(adapter_name: str) -> list[str]:
    """The state-dict keys of the adapter at module ``adapter_name`` (``""``: the model itself)."""
    prefix = f"{adapter_name}." if adapter_name else ""
    return [prefix + FROZEN, prefix + TRAINED]
