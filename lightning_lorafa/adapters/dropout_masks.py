"""Dropout masks rebuilt from a seed tensor, never stored: ``dropout_mask`` and ``dropout_mul``.

``dropout_mask(shape, seed, p, dtype)`` is a 0/1 mask that is a pure function of ``(seed, shape, p)``:
calling it again with the same seed gives the same mask, so backward can rebuild the mask of forward
instead of keeping it. ``dropout_mul(x, seed, p)`` is ``x * mask / (1 - p)`` for that mask in one call.
``seed`` is a 0-d int64 tensor on ``x``'s device (drawn with ``draw_seed``), so on CUDA nothing waits for the
device and nothing is read on the host.

- CUDA (and CPU under ``TRITON_INTERPRET=1``): Philox masks. Each element takes 16 bits of a counter-based
  Philox-4x32-10 draw at (seed, element index // 8) (one draw gives 128 bits: eight elements) and is kept when
  they reach ``p * 2**16``. One Triton kernel per call makes them (the mask, or the masked product; ``triton_dropout``);
  ``philox_keep_mask`` makes the same masks with PyTorch integer ops.
- CPU: PyTorch ops on a generator seeded with ``seed`` (``keep_mask``): one ``bernoulli`` for small masks,
  four 16-bit slices of each 64-bit ``randint`` word for large ones.

All resolve ``p`` in steps of ``2**-16`` (``effective_p``) and scale kept entries by ``1 / (1 - p_eff)``,
so the dropout is unbiased; CUDA and CPU draw different masks. ``torch.ops.lightning_lorafa.dropout_mul``
is the same function as a ``torch.library`` custom op, so ``torch.compile`` traces through callers.

Which code makes the Philox masks is set by the environment variable ``LIGHTNING_LORAFA_DROPOUT_BACKEND``,
read once, at the first mask on a CUDA device:

- ``auto`` (default): that first mask runs both Triton kernels on a small tensor and compares them with
  ``philox_keep_mask``. If that raises (no Triton, no working compiler, an unsupported GPU) or differs, or a
  later launch raises (a dtype the compiler rejects), one ``RuntimeWarning`` says why and the process takes the
  PyTorch path from there on: the same masks, slower.
- ``triton``: the Triton kernels, unchecked; their errors propagate.
- ``torch``: ``philox_keep_mask``; Triton is not used.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Callable

import torch

#: Dropout probabilities are resolved in steps of 1 / 2**16 (FlashAttention's kernels use 1 / 2**8).
LEVELS = 2**16
#: Whether Triton is installed; it is imported at the first Triton mask (``triton_dropout``), not with this module.
HAS_TRITON = importlib.util.find_spec("triton") is not None
#: Run the Triton kernel on CPU tensors too (Triton's interpreter, for testing the CUDA kernel without a GPU).
TRITON_ON_CPU = HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"
#: The environment variable that selects the Philox masks' backend, and its values (the first is the default).
BACKEND_VARIABLE = "LIGHTNING_LORAFA_DROPOUT_BACKEND"
BACKENDS = ("auto", "triton", "torch")
_M32 = 0xFFFFFFFF
#: ``tl.randint4x``'s Philox-4x32-10: round multipliers (A, B), key increments (A, B), rounds.
_PHILOX_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
_PHILOX_KEY_STEPS = (0x9E3779B9, 0xBB67AE85)
_PHILOX_ROUNDS = 10
#: The first-use check: 3,003 entries (three blocks, the last partly used, not a multiple of 8), a seed with
#: both 32-bit halves set.
_CHECK_SHAPE, _CHECK_SEED, _CHECK_P = torch.Size((3, 1001)), 2**62 - 2**31 + 12345, 0.3
#: The backend setting, and whether the Philox masks come from Triton: None until the first mask on a CUDA device.
_backend_setting: str | None = None
_triton_selected: bool | None = None
#: CPU masks of at most this many entries are drawn with ``bernoulli`` (where its per-call cost wins).
SMALL_MASK = 1024
_generators: dict[torch.device, torch.Generator] = {}
_templates: dict[tuple[torch.Size, torch.dtype, torch.device], torch.Tensor] = {}


def dropped_levels(p: float) -> int:
    """How many of the 2**16 values of a 16-bit draw drop an entry: ``p * 2**16`` rounded, at most 2**16 - 1."""
    return min(round(p * LEVELS), LEVELS - 1)


def effective_p(p: float) -> float:
    """The drop probability the kernels realise for ``p``: ``p`` rounded to a multiple of 1 / 2**16."""
    return min(round(p * LEVELS), LEVELS - 1) / LEVELS  # dropped_levels(p) / LEVELS: called for every mask


def keep_scale(p: float) -> float:
    """The factor kept entries are multiplied by: ``1 / (1 - effective_p(p))``."""
    return 1.0 / (1.0 - min(round(p * LEVELS), LEVELS - 1) / LEVELS)  # called for every branch and mask


def uses_triton(x: torch.Tensor) -> bool:
    """Whether ``dropout_mul`` runs the Triton kernel for ``x`` (on the first CUDA tensor this decides the
    backend: see the module docstring)."""
    return philox_device(x.device) and _triton_backend(x.device)


def philox_device(device: torch.device) -> bool:
    """Whether masks on ``device`` are the Philox masks: CUDA, or CPU under ``TRITON_INTERPRET=1``."""
    return device.type == "cuda" or (TRITON_ON_CPU and device.type == "cpu")


def dropout_backend() -> str:
    """The value of ``LIGHTNING_LORAFA_DROPOUT_BACKEND`` (``"auto"`` when unset); ``ValueError`` for others."""
    value = os.environ.get(BACKEND_VARIABLE, "auto")
    if value not in BACKENDS:
        raise ValueError(
            f"{BACKEND_VARIABLE}={value!r} is not a dropout backend: use one of {', '.join(map(repr, BACKENDS))} "
            "('auto', the default, checks the Triton kernel at first use; 'torch' never uses Triton)"
        )
    return value


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


def _triton_dropout_mul(x: torch.Tensor, seed: torch.Tensor, p: float, scale: float) -> torch.Tensor:
    from lightning_lorafa.adapters import triton_dropout  # imports Triton: first use only

    return triton_dropout.dropout_mul(x, seed, dropped_levels(p), scale)


def _triton_mask(shape: torch.Size, seed: torch.Tensor, p: float) -> torch.Tensor:
    from lightning_lorafa.adapters import triton_dropout  # imports Triton: first use only

    return triton_dropout.keep_mask(shape, seed, dropped_levels(p))


def _mul32(a: int, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The high and low 32 bits of ``a * c``, for a 32-bit constant ``a`` and an int64 ``c`` of 32-bit values
    (the 64-bit product, split so that no int64 overflows)."""
    low_part, high_part = a * (c & 0xFFFF), a * (c >> 16)  # each < 2**48
    low = low_part + ((high_part & 0xFFFF) << 16)
    return (high_part >> 16) + (low >> 32), low & _M32


def philox4x32(counter: tuple[torch.Tensor, ...], key: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Philox-4x32-10 (Random123's; ``tl.randint4x``'s) of four int64 counter words (*) and two key words (0-d
    or broadcastable), each holding a 32-bit value; returns the four 32-bit output words (*)."""
    (c0, c1, c2, c3), (k0, k1) = counter, key
    (mul_a, mul_b), (step_a, step_b) = _PHILOX_MULTIPLIERS, _PHILOX_KEY_STEPS
    for _ in range(_PHILOX_ROUNDS):
        (high_b, low_b), (high_a, low_a) = _mul32(mul_b, c2), _mul32(mul_a, c0)
        c0, c1, c2, c3 = high_b ^ c1 ^ k0, low_b, high_a ^ c3 ^ k1, low_a
        k0, k1 = (k0 + step_a) & _M32, (k1 + step_b) & _M32
    return c0, c1, c2, c3


def philox_bits(numel: int, seed: torch.Tensor) -> torch.Tensor:
    """The 16-bit draws (numel,) int64 in [0, 2**16) that the Triton kernel gives elements 0 .. numel - 1 for
    ``seed`` (0-d int64), with PyTorch integer ops on ``seed``'s device (uint32 as int64 masked to 32 bits).

    ``tl.randint4x(seed, g)`` for group g = i // 8: Philox-4x32-10 with key (seed's low, high 32 bits) and
    counter (g's low, high 32 bits, 0, 0); element 8g + j takes the high (j even) or low (j odd) 16 bits of
    word j // 2. (Triton versions agree on this counter for g < 2**32, i.e. below 2**35 entries.)
    """
    groups = torch.arange((numel + 7) // 8, device=seed.device)  # (G,)
    zeros = torch.zeros_like(groups)
    key = (seed & _M32, (seed >> 32) & _M32)
    words = torch.stack(philox4x32((groups & _M32, groups >> 32, zeros, zeros), key), dim=1)  # (G, 4)
    return torch.stack((words >> 16, words & 0xFFFF), dim=2).view(-1)[:numel]  # (G, 4, 2) -> (numel,)


def philox_keep_mask(shape: torch.Size, seed: torch.Tensor, p: float) -> torch.Tensor:
    """The Triton kernel's bool mask of kept entries (``shape``, on ``seed``'s device), made without Triton."""
    return (philox_bits(torch.Size(shape).numel(), seed) >= dropped_levels(p)).view(shape)


def _triton_backend(device: torch.device) -> bool:
    """Whether the Philox masks on ``device`` come from Triton; the first call decides for the process.

    While a CUDA graph is captured before that decision, masks come from the PyTorch path (the same masks):
    the check waits for the device, which capture forbids.
    """
    global _backend_setting, _triton_selected
    if _triton_selected is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return False
        _backend_setting = dropout_backend()
        if _backend_setting == "triton" and not HAS_TRITON:
            raise RuntimeError(f"{BACKEND_VARIABLE}=triton, but Triton cannot be imported: install it, or use 'auto'")
        _triton_selected = _backend_setting == "triton" or (_backend_setting == "auto" and _triton_passes_check(device))
    return _triton_selected


def _triton_passes_check(device: torch.device) -> bool:
    """Run both Triton kernels once on ``device`` and compare with ``philox_keep_mask``; warn if they fail."""
    debug_mode = torch.cuda.get_sync_debug_mode() if device.type == "cuda" else 0
    try:
        if debug_mode:  # the comparison waits for the device once
            torch.cuda.set_sync_debug_mode(0)
        _check_triton_kernels(device)
    except Exception as error:  # any failure of the kernels selects the PyTorch path
        _fall_back(device, error, " its first-use check")
        return False
    finally:
        if debug_mode:
            torch.cuda.set_sync_debug_mode(debug_mode)
    return True


def _launch(kernel: Callable[..., torch.Tensor], device: torch.device, *args) -> torch.Tensor | None:
    """``kernel(*args)``. Where ``auto`` chose Triton, an error (a dtype the GPU's compiler rejects, say) warns
    and gives None: the PyTorch path makes this mask and all later ones (the same masks)."""
    try:
        return kernel(*args)
    except Exception as error:
        if _backend_setting != "auto":
            raise
        _fall_back(device, error, "")
        return None


def _fall_back(device: torch.device, error: Exception, during: str) -> None:
    global _triton_selected
    _triton_selected = False
    warnings.warn(
        f"The Triton dropout kernel failed{during} on {device} ({type(error).__name__}: {error}); dropout masks "
        f"now come from the PyTorch path (the same masks, slower). Set {BACKEND_VARIABLE}=torch to skip the "
        "Triton kernel, or =triton to raise its errors.",
        RuntimeWarning,
        stacklevel=2,
    )


def _check_triton_kernels(device: torch.device) -> None:
    """Raise unless the mask and product kernels compile, run and give ``philox_keep_mask``'s mask."""
    if not HAS_TRITON:
        raise ImportError("Triton is not installed")
    seed = torch.tensor(_CHECK_SEED, device=device)
    expected = philox_keep_mask(_CHECK_SHAPE, seed, _CHECK_P)
    mask = _triton_mask(_CHECK_SHAPE, seed, _CHECK_P)
    product = _triton_dropout_mul(torch.ones(_CHECK_SHAPE, device=device), seed, _CHECK_P, 2.0)
    wrong = int(torch.count_nonzero(mask != expected)), int(torch.count_nonzero(product != 2.0 * expected))
    if any(wrong):
        raise RuntimeError(
            f"its mask differs from the reference in {wrong[0]} of {expected.numel()} entries "
            f"(the masked product in {wrong[1]})"
        )


def dropout_mask(shape: torch.Size, seed: torch.Tensor, p: float, dtype: torch.dtype) -> torch.Tensor:
    """The 0/1 mask (``shape``, on ``seed``'s device) that ``dropout_mul(x, seed, p, scale)`` applies to an ``x``
    of ``shape`` and ``dtype``: ``dropout_mul(x, seed, p, scale) == x * dropout_mask(...) * scale``.

    Its dtype is bool, or ``dtype`` (float32 or float64 only) for the CPU masks, which ``keep_mask`` makes
    directly in it (a float mask multiplies faster there); either multiplies ``x`` without changing its dtype,
    and ``mask * scale`` stays exact (a half-precision mask would round ``scale``).
    """
    device = seed.device
    if not philox_device(device):
        return keep_mask(shape, p, int(seed), device, dtype if dtype in (torch.float32, torch.float64) else torch.bool)
    mask = _launch(_triton_mask, device, shape, seed, p) if _triton_backend(device) else None
    return philox_keep_mask(shape, seed, p) if mask is None else mask


def dropout_mul_eager(x: torch.Tensor, seed: torch.Tensor, p: float, scale: float | None = None) -> torch.Tensor:
    """``x * mask * scale`` (same shape and dtype as ``x``), the mask a function of ``seed`` (0-d int64);
    ``scale`` defaults to ``keep_scale(p)``."""
    scale = keep_scale(p) if scale is None else scale
    out = _launch(_triton_dropout_mul, x.device, x, seed, p, scale) if uses_triton(x) else None
    if out is not None:
        return out
    out = x.contiguous() * dropout_mask(x.shape, seed, p, x.dtype)  # the PyTorch paths of dropout_mask
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
