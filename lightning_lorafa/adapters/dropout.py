"""Dropout that keeps a seed instead of a mask.

A dropout mask is as large as its input. Backward needs it, so ordinary dropout keeps it alive
from forward to backward. Here forward draws a seed tensor from the device's RNG (so runs stay
reproducible under ``seed_everything``), multiplies by the mask that seed determines
(``dropout_masks.dropout_mask``: one Triton kernel on CUDA), and backward rebuilds the identical mask from
the same seed: only the 8-byte seed is kept, and nothing waits for the device.

In eager mode the product is one ATen op (``x * mask``, or ``addcmul`` with the ``1 / (1 - p)`` scale) run
under saved-tensor hooks that replace the saved mask by its seed, so backward is autograd's own C++ node
plus a small unpack call that rebuilds the mask: no Python ``autograd.Function`` per dropout. Under
``torch.compile`` the same mask comes from the ``dropout_mul`` custom op inside an ``autograd.Function``,
which the compiler traces.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lightning_lorafa import _compat
from lightning_lorafa.adapters.dropout_masks import draw_seed, dropout_mask, dropout_mul, keep_scale, uses_triton


class _SeededDropout(torch.autograd.Function):
    """``dropout_mul(x, seed, p, scale)``, keeping the seed instead of the mask (the ``torch.compile`` path)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, seed: torch.Tensor, p: float, scale: float) -> torch.Tensor:
        ctx.save_for_backward(seed)
        ctx.p, ctx.scale = p, scale
        return dropout_mul(x, seed, p, scale)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (seed,) = ctx.saved_tensors
        return dropout_mul(grad_out, seed, ctx.p, ctx.scale), None, None, None


class _SavedMask:
    """What autograd keeps of a dropout mask: the seed it is rebuilt from (packed by any outer saved-tensor
    hooks, such as a checkpoint's or the saved-activation recorder's) and the mask's shape, ``p`` and dtype."""

    __slots__ = ("seed", "outer_unpack", "shape", "p", "dtype")

    def __init__(self, seed: Any, outer_unpack: Callable[[Any], torch.Tensor] | None, mask: torch.Tensor, p: float):
        self.seed, self.outer_unpack, self.shape, self.p, self.dtype = seed, outer_unpack, mask.shape, p, mask.dtype


def _rebuild_mask(saved: _SavedMask | torch.Tensor) -> torch.Tensor:
    """Unpack hook: the mask again, from its seed."""
    if not isinstance(saved, _SavedMask):  # a tensor the product saved besides the mask, kept as it was
        return saved
    seed = saved.seed if saved.outer_unpack is None else saved.outer_unpack(saved.seed)
    return dropout_mask(saved.shape, seed, saved.p, saved.dtype)


def _mask_multiply(x: torch.Tensor, seed: torch.Tensor, p: float, scale: float) -> torch.Tensor:
    """``x * mask * scale`` as one differentiable ATen op whose saved mask autograd replaces by its seed.

    The product runs under saved-tensor hooks that pack the 0/1 mask as ``_SavedMask`` and rebuild it in
    backward, so backward is autograd's own ``MulBackward0``/``AddcmulBackward0`` (C++) plus one small unpack
    call, instead of a Python ``autograd.Function``. ``torch.addcmul`` applies ``scale`` in float32, like
    ``nn.Dropout``, for half-precision ``x``.
    """
    mask = dropout_mask(x.shape, seed, p, x.dtype)
    outer = _compat.top_saved_tensors_hooks(False)
    outer_pack, outer_unpack = (None, None) if outer is None else outer

    def pack(saved: torch.Tensor) -> _SavedMask | torch.Tensor:
        if saved is not mask:  # not reached: the product saves the mask only (x needs a gradient, mask not)
            return saved
        return _SavedMask(seed if outer_pack is None else outer_pack(seed), outer_unpack, mask, p)

    _compat.push_saved_tensors_hooks(pack, _rebuild_mask)
    try:
        if scale == 1.0:
            return x * mask
        return torch.addcmul(_zero(x.dtype, x.device), x, mask, value=scale)
    finally:
        _compat.pop_saved_tensors_hooks()


_zeros: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _zero(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A cached 0-d zero of ``dtype`` on ``device`` (the ``addcmul`` base)."""
    zero = _zeros.get((dtype, device))
    if zero is None:
        zero = _zeros[(dtype, device)] = torch.zeros((), dtype=dtype, device=device)
    return zero


#: Triton-path tensors of at least this many entries take the fused kernel (``_SeededDropout``): one pass over
#: x each way instead of mask kernel + product, which also writes and reads a bool mask. By arithmetic (an
#: H100/H200 moves 2 bytes per entry more in about the host time of a Python autograd node at ~2**24 entries);
#: not yet measured on a GPU. Smaller ones, where a step is host-bound, take the ``_mask_multiply`` path.
FUSED_MIN_NUMEL = 2**24
#: CPU tensors of at least this many entries take ``_SeededDropout`` too (its CPU ``dropout_mul``: mask, product,
#: in-place scale): there the extra pass and allocation of the product's backward (``grad * (mask * scale)``)
#: outweigh a Python node. The threshold comes from ``benchmarks/dropout_paths.py`` (its table is in
#: benchmarks/README.md).
CPU_FUSED_MIN_NUMEL = 2**18


def apply_seeded_mask(x: torch.Tensor, p: float, scale: float) -> torch.Tensor:
    """``x * mask * scale`` for a fresh dropout mask (drop probability ``p``), keeping a seed, not the mask.

    ``scale`` is ``keep_scale(p)`` for unbiased dropout, or 1.0 where the caller folds ``1 / (1 - p)`` into
    a later scale (the LoRA-FA branch does). Eager: ``_mask_multiply``; under ``torch.compile``, where
    saved-tensor hooks are disabled, or for a large ``x`` (``FUSED_MIN_NUMEL`` on the Triton path,
    ``CPU_FUSED_MIN_NUMEL`` on CPU), the ``_SeededDropout`` function around ``dropout_mul``. All draw the same
    mask and give the same values.
    """
    seed = draw_seed(x.device)
    if (
        torch.compiler.is_compiling()
        or not _compat.saved_tensors_hooks_enabled()
        or x.numel() >= (FUSED_MIN_NUMEL if uses_triton(x) else CPU_FUSED_MIN_NUMEL)
    ):
        return _SeededDropout.apply(x, seed, p, scale)
    return _mask_multiply(x, seed, p, scale)


def seeded_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout of ``x`` (*) -> (*) with ``0 < p < 1`` that keeps a seed, not a mask, for backward.

    Draws one seed from the RNG of ``x``'s device; the mask is ``dropout_masks.dropout_mask``'s for that seed.
    """
    return apply_seeded_mask(x, p, keep_scale(p))


class RecomputedDropout(nn.Module):
    """Drop-in ``nn.Dropout``: (*) -> (*), same semantics in train and eval mode, but keeps a seed, not a mask.

    Each training forward with ``0 < p < 1`` draws one seed (``seeded_dropout``); the mask is regenerated
    in backward. Raises ``ValueError`` unless 0 <= p <= 1.
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.p == 1.0:
            return x * 0.0
        return seeded_dropout(x, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"
