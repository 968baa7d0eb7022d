"""The Triton kernels of the Philox dropout masks (``dropout_masks`` imports this module at first use).

Each element i takes 16 bits of ``tl.randint4x(seed, i // 8)`` and is kept when they reach ``dropped``
(``dropout_masks.dropped_levels(p)``); ``dropout_masks.philox_keep_mask`` makes the same masks with PyTorch ops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit
def _keep_bits(seed_ptr, BLOCK: tl.constexpr):
    """The 16-bit draws of this program's BLOCK elements and their flat offsets, both (BLOCK // 8, 8).

    One Philox call (four 32-bit words) at counter g gives the draws of elements 8g .. 8g + 7:
    element 8g + j takes the high (j even) or low (j odd) half of word j // 2. ``randint4x`` splits the
    int64 counter into two uint32 words, so Philox-4x32 runs and its words are uint32; the ``& 0xFFFF`` of
    the high half keeps each draw 16 bits even if a Triton version returned wider words.
    """
    groups = tl.program_id(0).to(tl.int64) * (BLOCK // 8) + tl.arange(0, BLOCK // 8)  # (G,)
    r0, r1, r2, r3 = tl.randint4x(tl.load(seed_ptr), groups)  # (G,) uint32 each
    lane = tl.arange(0, 8)[None, :]  # (1, 8)
    word = tl.where(
        lane < 4, tl.where(lane < 2, r0[:, None], r1[:, None]), tl.where(lane < 6, r2[:, None], r3[:, None])
    )
    bits = tl.where(lane % 2 == 0, (word >> 16) & 0xFFFF, word & 0xFFFF)  # (G, 8), uniform over [0, 2**16)
    return bits, groups[:, None] * 8 + lane


@triton.jit(do_not_specialize=["dropped", "scale"])
def _dropout_mul_kernel(x_ptr, out_ptr, seed_ptr, numel, dropped, scale, BLOCK: tl.constexpr):
    """out[i] = x[i] * scale if bits(i) >= dropped else 0, for a flat contiguous x."""
    bits, offsets = _keep_bits(seed_ptr, BLOCK)
    inside = offsets < numel
    x = tl.load(x_ptr + offsets, mask=inside)
    out = tl.where(bits >= dropped, x.to(tl.float32) * scale, 0.0)
    tl.store(out_ptr + offsets, out.to(x.dtype), mask=inside)


@triton.jit(do_not_specialize=["dropped"])
def _dropout_mask_kernel(out_ptr, seed_ptr, numel, dropped, BLOCK: tl.constexpr):
    """out[i] = 1 if bits(i) >= dropped else 0, the mask ``_dropout_mul_kernel`` applies."""
    bits, offsets = _keep_bits(seed_ptr, BLOCK)
    tl.store(out_ptr + offsets, (bits >= dropped).to(out_ptr.dtype.element_ty), mask=offsets < numel)


def dropout_mul(x: torch.Tensor, seed: torch.Tensor, dropped: int, scale: float) -> torch.Tensor:
    """``x * mask * scale`` (x's shape and dtype) for the mask of ``seed`` (0-d int64 on x's device)."""
    x = x.contiguous()
    out = torch.empty_like(x)
    numel = x.numel()
    if numel:
        _dropout_mul_kernel[(triton.cdiv(numel, _BLOCK),)](x, out, seed, numel, dropped, scale, BLOCK=_BLOCK)
    return out


def keep_mask(shape: torch.Size, seed: torch.Tensor, dropped: int) -> torch.Tensor:
    """The boolean keep mask (``shape``, on ``seed``'s device) that ``dropout_mul`` applies."""
    out = torch.empty(shape, dtype=torch.bool, device=seed.device)
    numel = out.numel()
    if numel:
        _dropout_mask_kernel[(triton.cdiv(numel, _BLOCK),)](out, seed, numel, dropped, BLOCK=_BLOCK)
    return out
