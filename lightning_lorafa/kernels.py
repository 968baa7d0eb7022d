"""Dropout masks rebuilt from a seed tensor, never stored: ``dropout_mask`` and ``dropout_mul``.

``dropout_mask(shape, seed, p, dtype)`` is a 0/1 mask that is a pure function of ``(seed, shape, p)``:
calling it again with the same seed gives the same mask, so backward can rebuild the mask of forward
instead of keeping it. ``dropout_mul(x, seed, p)`` is ``x * mask / (1 - p)`` for that mask in one call.
``seed`` is a 0-d int64 tensor on ``x``'s device (drawn with ``draw_seed``), so on CUDA nothing waits for the
device and nothing is read on the host.

- CUDA (and CPU under ``TRITON_INTERPRET=1``): one Triton kernel per call (the mask, or the masked product).
  Each element takes 16 bits of a counter-based Philox draw at (seed, element index // 8) (one draw gives
  128 bits: eight elements) and is kept when they reach ``p * 2**16``.
- CPU: PyTorch ops on a generator seeded with ``seed`` (``keep_mask``): one ``bernoulli`` for small masks,
  four 16-bit slices of each 64-bit ``randint`` word for large ones.

All resolve ``p`` in steps of ``2**-16`` (``effective_p``) and scale kept entries by ``1 / (1 - p_eff)``,
so the dropout is unbiased; the devices draw different masks. ``torch.ops.lightning_lorafa.dropout_mul``
is the same function as a ``torch.library`` custom op, so ``torch.compile`` traces through callers.
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU path needs no Triton
    triton = None

#: Dropout probabilities are resolved in steps of 1 / 2**16 (FlashAttention's kernels use 1 / 2**8).
LEVELS = 2**16
#: Run the Triton kernel on CPU tensors too (Triton's interpreter, for testing the CUDA kernel without a GPU).
TRITON_ON_CPU = triton is not None and os.environ.get("TRITON_INTERPRET") == "1"
_BLOCK = 1024
#: CPU masks of at most this many entries are drawn with ``bernoulli`` (where its per-call cost wins).
SMALL_MASK = 1024
_generators: dict[torch.device, torch.Generator] = {}
_templates: dict[tuple[torch.Size, torch.dtype, torch.device], torch.Tensor] = {}


@functools.cache  # called for every mask; a model has a handful of distinct p
def dropped_levels(p: float) -> int:
    """How many of the 2**16 values of a 16-bit draw drop an entry: ``p * 2**16`` rounded, at most 2**16 - 1."""
    return min(round(p * LEVELS), LEVELS - 1)


@functools.cache
def effective_p(p: float) -> float:
    """The drop probability the kernels realise for ``p``: ``p`` rounded to a multiple of 1 / 2**16."""
    return dropped_levels(p) / LEVELS


@functools.cache
def keep_scale(p: float) -> float:
    """The factor kept entries are multiplied by: ``1 / (1 - effective_p(p))``."""
    return 1.0 / (1.0 - effective_p(p))


def uses_triton(x: torch.Tensor) -> bool:
    """Whether ``dropout_mul`` runs the Triton kernel for ``x``."""
    return triton is not None and (x.is_cuda or (TRITON_ON_CPU and x.device.type == "cpu"))


def keep_mask(
    shape: torch.Size, p: float, seed: int, device: torch.device, dtype: torch.dtype = torch.bool
) -> torch.Tensor:
    """The CPU path's 0/1 mask of kept entries for ``shape``: the same ``(shape, p, seed, device)`` gives the
    same mask. The generator is reused per device and re-seeded on every call.

    Masks of at most ``SMALL_MASK`` entries are one ``bernoulli`` draw (keep probability ``1 - effective_p(p)``)
    made directly in ``dtype``: the fewest ops, which is what tiny steps are bound by. In larger masks each entry
    takes 16 uniform random bits (four per 64-bit ``randint`` word) and is dropped when they fall below
    ``p * 2**16``, about four times faster per entry than ``bernoulli_``; the comparison writes ``dtype``
    directly, because on CPU a float 0/1 mask multiplies about five times faster than a bool one (which each
    product would first convert).
    """
    generator = _generators.get(device)
    if generator is None:
        generator = _generators.setdefault(device, torch.Generator(device=device))
    generator.manual_seed(seed)
    numel = shape.numel()
    if numel <= SMALL_MASK:
        return torch.bernoulli(_template(shape, dtype, device), 1.0 - effective_p(p), generator=generator)
    if shape[-1] % 4 == 0:  # the usual case: four 16-bit slices of each word fill the last dimension
        words = torch.randint(-(2**63), 2**63 - 1, (*shape[:-1], shape[-1] // 4), generator=generator, device=device)
        bits = words.view(torch.int16)  # (*shape), uniform over [-2**15, 2**15)
    else:
        words = torch.randint(-(2**63), 2**63 - 1, ((numel + 3) // 4,), generator=generator, device=device)
        bits = words.view(torch.int16)[:numel].view(shape)
    threshold = dropped_levels(p) - LEVELS // 2
    if dtype == torch.bool:
        return bits >= threshold
    return torch.ge(bits, threshold, out=torch.empty(shape, dtype=dtype, device=device))


def _template(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A kept, never written tensor of ``shape``/``dtype``: ``torch.bernoulli`` reads only its metadata, and so
    draws a small mask in one call (``torch.empty(...).bernoulli_(...)`` is two). At most ``SMALL_MASK``
    entries each; the cache is emptied when it holds 64."""
    key = (shape, dtype, device)
    template = _templates.get(key)
    if template is None:
        if len(_templates) >= 64:
            _templates.clear()
        template = _templates[key] = torch.empty(shape, dtype=dtype, device=device)
    return template


if triton is not None:

    @triton.jit
    def _keep_bits(seed_ptr, BLOCK: tl.constexpr):
        """The 16-bit draws of this program's BLOCK elements and their flat offsets, both (BLOCK // 8, 8).

        One Philox call (four 32-bit words) at counter g gives the draws of elements 8g .. 8g + 7:
        element 8g + j takes the high (j even) or low (j odd) half of word j // 2.
        """
        groups = tl.program_id(0).to(tl.int64) * (BLOCK // 8) + tl.arange(0, BLOCK // 8)  # (G,)
        r0, r1, r2, r3 = tl.randint4x(tl.load(seed_ptr), groups)  # (G,) uint32 each
        lane = tl.arange(0, 8)[None, :]  # (1, 8)
        word = tl.where(
            lane < 4, tl.where(lane < 2, r0[:, None], r1[:, None]), tl.where(lane < 6, r2[:, None], r3[:, None])
        )
        bits = tl.where(lane % 2 == 0, word >> 16, word & 0xFFFF)  # (G, 8), uniform over [0, 2**16)
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


def _triton_dropout_mul(x: torch.Tensor, seed: torch.Tensor, p: float, scale: float) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    numel = x.numel()
    if numel:
        grid = (triton.cdiv(numel, _BLOCK),)
        _dropout_mul_kernel[grid](x, out, seed, numel, dropped_levels(p), scale, BLOCK=_BLOCK)
    return out


def dropout_mask(shape: torch.Size, seed: torch.Tensor, p: float, dtype: torch.dtype) -> torch.Tensor:
    """The 0/1 mask (``shape``, on ``seed``'s device) that ``dropout_mul(x, seed, p, scale)`` applies to an ``x``
    of ``shape`` and ``dtype``: ``dropout_mul(x, seed, p, scale) == x * dropout_mask(...) * scale``.

    Its dtype is bool, or ``dtype`` (float32 or float64 only) for the CPU masks, which ``keep_mask`` makes
    directly in it (a float mask multiplies faster there); either multiplies ``x`` without changing its dtype,
    and ``mask * scale`` stays exact (a half-precision mask would round ``scale``).
    """
    device = seed.device
    if triton is not None and (device.type == "cuda" or (TRITON_ON_CPU and device.type == "cpu")):
        out = torch.empty(shape, dtype=torch.bool, device=device)
        numel = out.numel()
        if numel:
            _dropout_mask_kernel[(triton.cdiv(numel, _BLOCK),)](out, seed, numel, dropped_levels(p), BLOCK=_BLOCK)
        return out
    return keep_mask(shape, p, int(seed), device, dtype if dtype in (torch.float32, torch.float64) else torch.bool)


def dropout_mul_eager(x: torch.Tensor, seed: torch.Tensor, p: float, scale: float | None = None) -> torch.Tensor:
    """``x * mask * scale`` (same shape and dtype as ``x``), the mask a function of ``seed`` (0-d int64);
    ``scale`` defaults to ``keep_scale(p)``."""
    scale = keep_scale(p) if scale is None else scale
    if uses_triton(x):
        return _triton_dropout_mul(x, seed, p, scale)
    out = x.contiguous() * dropout_mask(x.shape, seed, p, x.dtype)  # the CPU path of dropout_mask
    return out if scale == 1.0 else out.mul_(scale)


@torch.library.custom_op("lightning_lorafa::dropout_mul", mutates_args=())
def _dropout_mul_op(x: torch.Tensor, seed: torch.Tensor, p: float, scale: float) -> torch.Tensor:
    return dropout_mul_eager(x, seed, p, scale)


@_dropout_mul_op.register_fake
def _(x: torch.Tensor, seed: torch.Tensor, p: float, scale: float) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def dropout_mul(x: torch.Tensor, seed: torch.Tensor, p: float, scale: float | None = None) -> torch.Tensor:
    """``x * mask * scale`` with the mask a pure function of ``(seed, p, x.shape, device)``; not differentiable.
    ``scale`` defaults to ``keep_scale(p)`` (unbiased dropout); 1.0 applies the bare 0/1 mask.

    Eager calls run the kernel directly (no dispatcher round trip); under ``torch.compile`` this is the
    custom op ``torch.ops.lightning_lorafa.dropout_mul``, which the compiler keeps as one opaque kernel.
    """
    scale = keep_scale(p) if scale is None else scale
    if torch.compiler.is_compiling():
        return _dropout_mul_op(x, seed, p, scale)
    return dropout_mul_eager(x, seed, p, scale)


def draw_seed(device: torch.device) -> torch.Tensor:
    """A 0-d int64 seed tensor on ``device``, drawn from that device's default RNG (reproducible under
    ``seed_everything``; restored with the RNG state by ``torch.utils.checkpoint``). Never read on the host."""
    return torch.randint(2**62, (), device=device)
