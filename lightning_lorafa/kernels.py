"""The dropout-mask kernel: ``x * mask / (1 - p)`` with the mask rebuilt from a seed tensor, never stored.

``dropout_mul(x, seed, p)`` multiplies ``x`` by a dropout mask that is a pure function of
``(seed, position, p)``: calling it again with the same seed gives the same mask, so backward can
rebuild the mask of forward instead of keeping it. ``seed`` is a 0-d int64 tensor on ``x``'s device
(drawn with ``draw_seed``), so nothing waits for the device and nothing is read on the host.

- CUDA (and CPU under ``TRITON_INTERPRET=1``): one Triton kernel. Each element takes 16 bits of a
  counter-based Philox draw at (seed, element index // 8) (one draw gives 128 bits: eight elements) and is
  kept when they reach ``p * 2**16``.
- CPU: PyTorch ops, four 16-bit slices of each 64-bit draw of a generator seeded with ``seed``.

Both resolve ``p`` in steps of ``2**-16`` (``effective_p``) and scale kept entries by ``1 / (1 - p_eff)``,
so the dropout is unbiased; the two devices draw different masks. ``torch.ops.lightning_lorafa.dropout_mul``
is the same function as a ``torch.library`` custom op, so ``torch.compile`` traces through callers.
"""

from __future__ import annotations

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
_generators: dict[torch.device, torch.Generator] = {}


def dropped_levels(p: float) -> int:
    """How many of the 2**16 values of a 16-bit draw drop an entry: ``p * 2**16`` rounded, at most 2**16 - 1."""
    return min(round(p * LEVELS), LEVELS - 1)


def effective_p(p: float) -> float:
    """The drop probability the kernels realise for ``p``: ``p`` rounded to a multiple of 1 / 2**16."""
    return dropped_levels(p) / LEVELS


def keep_scale(p: float) -> float:
    """The factor kept entries are multiplied by: ``1 / (1 - effective_p(p))``."""
    return 1.0 / (1.0 - effective_p(p))


def uses_triton(x: torch.Tensor) -> bool:
    """Whether ``dropout_mul`` runs the Triton kernel for ``x``."""
    return triton is not None and (x.is_cuda or (TRITON_ON_CPU and x.device.type == "cpu"))


def keep_mask(shape: torch.Size, p: float, seed: int, device: torch.device) -> torch.Tensor:
    """The CPU path's boolean mask of kept entries for ``shape``; the same ``(shape, p, seed, device)`` gives
    the same mask. Each entry takes 16 uniform random bits (four per 64-bit draw) and is dropped when they fall
    below ``p * 2**16``: about five times faster on CPU than ``bernoulli_``. The generator is reused per device
    and re-seeded on every call.
    """
    generator = _generators.get(device)
    if generator is None:
        generator = _generators.setdefault(device, torch.Generator(device=device))
    generator.manual_seed(seed)
    if shape and shape[-1] % 4 == 0:  # the usual case: four 16-bit slices of each word fill the last dimension
        words = torch.randint(-(2**63), 2**63 - 1, (*shape[:-1], shape[-1] // 4), generator=generator, device=device)
        bits = words.view(torch.int16)  # (*shape), uniform over [-2**15, 2**15)
    else:
        numel = shape.numel()
        words = torch.randint(-(2**63), 2**63 - 1, ((numel + 3) // 4,), generator=generator, device=device)
        bits = words.view(torch.int16)[:numel].view(shape)
    return bits >= dropped_levels(p) - LEVELS // 2


if triton is not None:

    @triton.jit(do_not_specialize=["dropped", "scale"])
    def _dropout_mul_kernel(x_ptr, out_ptr, seed_ptr, numel, dropped, scale, BLOCK: tl.constexpr):
        """out[i] = x[i] * scale if bits(i) >= dropped else 0, for a flat contiguous x.

        One Philox call (four 32-bit words) at counter g gives the 16-bit draws of elements 8g .. 8g + 7:
        element 8g + j takes the high (j even) or low (j odd) half of word j // 2.
        """
        groups = tl.program_id(0).to(tl.int64) * (BLOCK // 8) + tl.arange(0, BLOCK // 8)  # (G,)
        r0, r1, r2, r3 = tl.randint4x(tl.load(seed_ptr), groups)  # (G,) uint32 each
        lane = tl.arange(0, 8)[None, :]  # (1, 8)
        word = tl.where(
            lane < 4, tl.where(lane < 2, r0[:, None], r1[:, None]), tl.where(lane < 6, r2[:, None], r3[:, None])
        )
        bits = tl.where(lane % 2 == 0, word >> 16, word & 0xFFFF)  # (G, 8), uniform over [0, 2**16)
        offsets = groups[:, None] * 8 + lane  # (G, 8)
        inside = offsets < numel
        x = tl.load(x_ptr + offsets, mask=inside)
        out = tl.where(bits >= dropped, x.to(tl.float32) * scale, 0.0)
        tl.store(out_ptr + offsets, out.to(x.dtype), mask=inside)


def _triton_dropout_mul(x: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    numel = x.numel()
    if numel:
        grid = (triton.cdiv(numel, _BLOCK),)
        _dropout_mul_kernel[grid](x, out, seed, numel, dropped_levels(p), keep_scale(p), BLOCK=_BLOCK)
    return out


def dropout_mul_eager(x: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """``x * mask / (1 - p)`` (same shape and dtype as ``x``), the mask a function of ``seed`` (0-d int64)."""
    if uses_triton(x):
        return _triton_dropout_mul(x, seed, p)
    return (x.contiguous() * keep_mask(x.shape, p, int(seed), x.device)).mul_(keep_scale(p))


@torch.library.custom_op("lightning_lorafa::dropout_mul", mutates_args=())
def _dropout_mul_op(x: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    return dropout_mul_eager(x, seed, p)


@_dropout_mul_op.register_fake
def _(x: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def dropout_mul(x: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """``x * mask / (1 - p)`` with the mask a pure function of ``(seed, p, x.shape, device)``; not differentiable.

    Eager calls run the kernel directly (no dispatcher round trip); under ``torch.compile`` this is the
    custom op ``torch.ops.lightning_lorafa.dropout_mul``, which the compiler keeps as one opaque kernel.
    """
    if torch.compiler.is_compiling():
        return _dropout_mul_op(x, seed, p)
    return dropout_mul_eager(x, seed, p)


def draw_seed(device: torch.device) -> torch.Tensor:
    """A 0-d int64 seed tensor on ``device``, drawn from that device's default RNG (reproducible under
    ``seed_everything``; restored with the RNG state by ``torch.utils.checkpoint``). Never read on the host."""
    return torch.randint(2**62, (), device=device)
