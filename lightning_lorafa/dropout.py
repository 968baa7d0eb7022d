"""Dropout that keeps a seed instead of a mask.

A dropout mask is as large as its input. Backward needs it, so ordinary dropout keeps it alive
from forward to backward. Here forward draws a seed tensor from the device's RNG (so runs stay
reproducible under ``seed_everything``), multiplies by the mask that seed determines
(``kernels.dropout_mask``: one Triton kernel on CUDA), and backward rebuilds the identical mask from
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
from torch._C._autograd import _pop_saved_tensors_default_hooks as _pop_saved_tensors_hooks
from torch._C._autograd import _push_saved_tensors_default_hooks as _push_saved_tensors_hooks
from torch._C._autograd import _saved_tensors_hooks_is_enabled as _saved_tensors_hooks_enabled
from torch._C._autograd import _top_saved_tensors_default_hooks as _top_saved_tensors_hooks
from torch.overrides import handle_torch_function, has_torch_function_unary
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from lightning_lorafa.kernels import draw_seed, dropout_mask, dropout_mul, keep_scale, uses_triton

RECOMPUTED_DROPOUT_SDPA = "sdpa_recomputed_dropout"


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
    outer = _top_saved_tensors_hooks(False)
    outer_pack, outer_unpack = (None, None) if outer is None else outer

    def pack(saved: torch.Tensor) -> _SavedMask | torch.Tensor:
        if saved is not mask:  # not reached: the product saves the mask only (x needs a gradient, mask not)
            return saved
        return _SavedMask(seed if outer_pack is None else outer_pack(seed), outer_unpack, mask, p)

    _push_saved_tensors_hooks(pack, _rebuild_mask)
    try:
        if scale == 1.0:
            return x * mask
        return torch.addcmul(_zero(x.dtype, x.device), x, mask, value=scale)
    finally:
        _pop_saved_tensors_hooks()


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
#: outweigh a Python node; measured with ``benchmarks/dropout_paths.py`` (on a 2-core EPYC the fused path's fwd + bwd
#: is 1.1-1.5x faster from 2**18 entries in the committed table, 1.0-2.6x across runs; level at 2**17).
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
        or not _saved_tensors_hooks_enabled()
        or x.numel() >= (FUSED_MIN_NUMEL if uses_triton(x) else CPU_FUSED_MIN_NUMEL)
    ):
        return _SeededDropout.apply(x, seed, p, scale)
    return _mask_multiply(x, seed, p, scale)


def seeded_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout of ``x`` (*) -> (*) with ``0 < p < 1`` that keeps a seed, not a mask, for backward.

    Draws one seed from the RNG of ``x``'s device; the mask is ``kernels.dropout_mask``'s for that seed.
    """
    if has_torch_function_unary(x):  # lets TorchFunctionMode (the saved-activation recorder) see this call
        return handle_torch_function(seeded_dropout, (x,), x, p)
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


class _RecomputedDropoutAttention(torch.autograd.Function):
    """``dropout(softmax(q k^T * scaling + bias + mask)) v`` keeping q, k, v, bias, mask and a seed tensor only.

    q (B, H, Sq, D), k/v (B, H, Sk, D) -> (B, H, Sq, D). The products are ``bmm`` on (B * H, S, D) views
    (what ``matmul`` runs underneath, so the values are the same bits, with less dispatch per call); q, k and v
    are kept in that layout. Under CPU autocast, backward recomputes under the forward's autocast state.
    """

    @staticmethod
    def forward(
        ctx,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        bias: torch.Tensor | None,
        mask: torch.Tensor | None,
        scaling: float,
        p: float,
        seed: torch.Tensor,
    ) -> torch.Tensor:
        batch, heads, q_length, head_dim = query.shape
        kv_length = key.shape[2]
        query = query.reshape(batch * heads, q_length, head_dim)
        key = key.reshape(batch * heads, kv_length, head_dim)
        value = value.reshape(batch * heads, kv_length, value.shape[-1])
        shape = (batch, heads, q_length, kv_length)
        probs = _probabilities(query, key, bias, mask, scaling, shape)
        ctx.save_for_backward(query, key, value, bias, mask, seed)
        ctx.scaling, ctx.p, ctx.shape = scaling, p, shape
        ctx.autocast_dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        dropped = _apply_masks(seed, p, probs)[0].view(batch * heads, q_length, kv_length)
        return torch.bmm(dropped, value).view(batch, heads, q_length, -1)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if ctx.autocast_dtype is None:
            return _attention_backward(ctx, grad_out)
        with torch.autocast("cpu", dtype=ctx.autocast_dtype):
            return _attention_backward(ctx, grad_out)


def _attention_backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """Gradients of ``_RecomputedDropoutAttention`` for q, k, v and the bias; the same op order as autograd's
    for the eager composition (``matmul``, ``* scaling``, ``+ bias``, softmax, dropout, ``matmul``)."""
    query, key, value, bias, mask, seed = ctx.saved_tensors
    batch, heads, q_length, kv_length = shape = ctx.shape
    probs = _probabilities(query, key, bias, mask, ctx.scaling, shape)
    grad_out = grad_out.reshape(batch * heads, q_length, -1)
    grad_probs = torch.bmm(grad_out, value.transpose(1, 2)).view(shape)
    if grad_probs.dtype != probs.dtype:  # autocast: bf16 products, float32 probs (a float32 bias)
        grad_probs = grad_probs.to(probs.dtype)
    dropped, grad_probs = _apply_masks(seed, ctx.p, probs, grad_probs)
    grad_value = torch.bmm(dropped.view(batch * heads, q_length, kv_length).transpose(1, 2), grad_out)
    grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
    grad_bias = grad_scores.sum_to_size(bias.shape) if ctx.needs_input_grad[3] else None
    grad_scores = grad_scores.mul_(ctx.scaling) if grad_bias is None else grad_scores * ctx.scaling
    grad_scores = grad_scores.view(batch * heads, q_length, kv_length)
    grad_query = torch.bmm(grad_scores, key).view(batch, heads, q_length, -1)
    # (q^T g)^T, the order autograd uses for ``q @ k^T``: the same rounding as a stored-mask reference.
    grad_key = torch.bmm(query.transpose(1, 2), grad_scores).transpose(1, 2).view(batch, heads, kv_length, -1)
    return grad_query, grad_key, grad_value.view(batch, heads, kv_length, -1), grad_bias, None, None, None, None


def _apply_masks(seed: torch.Tensor, p: float, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """``dropout_mul(t, seed, p)`` for each of ``tensors`` (one shape and dtype): in eager mode the mask is
    built once and applied to all, scaled in float32 as ``dropout_mul`` does (``addcmul``); under
    ``torch.compile``, the ``dropout_mul`` custom op each."""
    if torch.compiler.is_compiling():
        return [dropout_mul(t, seed, p) for t in tensors]
    first = tensors[0]
    kept, zero, scale = dropout_mask(first.shape, seed, p, first.dtype), _zero(first.dtype, first.device), keep_scale(p)
    return [torch.addcmul(zero, t, kept, value=scale) for t in tensors]


def _probabilities(
    query: torch.Tensor,
    key: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    scaling: float,
    shape: tuple[int, int, int, int],
) -> torch.Tensor:
    """``softmax(q k^T * scaling + bias + mask)``: q (B * H, Sq, D), k (B * H, Sk, D) -> (B, H, Sq, Sk), in the
    order eager attention uses; bool masks: True attends. In place on the fresh scores where dtypes agree
    (the same rounding); a bias or mask of another dtype promotes, as ``+`` does."""
    scores = torch.bmm(query, key.transpose(1, 2)).view(shape).mul_(scaling)
    if bias is not None:
        scores = scores.add_(bias) if bias.dtype == scores.dtype else scores + bias
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill_(~mask, torch.finfo(scores.dtype).min)
    elif mask is not None:
        scores = scores.add_(mask) if mask.dtype == scores.dtype else scores + mask
    return torch.softmax(scores, dim=-1)


def recomputed_dropout_sdpa(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    position_bias: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention function for ``AttentionInterface``: q (B, H, Sq, D), k/v (B, Hkv, Sk, D) -> (B, Sq, H, D).

    transformers' SDPA, unless the step trains with attention dropout on CPU, where SDPA's math fallback
    would keep the mask and two (B, H, Sq, Sk) probability tensors: there ``_RecomputedDropoutAttention``
    keeps q, k, v, the bias/mask inputs and a seed. (On CUDA, SDPA's flash and memory-efficient kernels
    already keep RNG state instead of a mask.) Raises ``ValueError`` for ``softcap``, like SDPA.
    """
    if dropout == 0.0 or query.device.type != "cpu":
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            position_bias=position_bias,
            **kwargs,
        )
    if kwargs.get("softcap") is not None:
        raise ValueError(f"`{RECOMPUTED_DROPOUT_SDPA}` attention does not support `softcap`.")
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    q_length, kv_length = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is None and causal and q_length > 1:
        ones = torch.ones(q_length, kv_length, dtype=torch.bool, device=query.device)
        attention_mask = ones.tril(kv_length - q_length)  # (Sq, Sk), True attends
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    seed = draw_seed(query.device)
    out = _RecomputedDropoutAttention.apply(query, key, value, position_bias, attention_mask, scaling, dropout, seed)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(RECOMPUTED_DROPOUT_SDPA, recomputed_dropout_sdpa)
AttentionMaskInterface.register(RECOMPUTED_DROPOUT_SDPA, sdpa_mask)


def replace_dropout(model: nn.Module) -> list[str]:
    """Make every dropout in ``model`` keep a seed instead of a mask; return the dotted names changed.

    Each ``nn.Dropout`` becomes a ``RecomputedDropout`` with the same ``p`` and train/eval mode.
    Attention-probability dropout, which transformers applies inside the attention function, is
    handled by switching each transformers model on ``"eager"`` or ``"sdpa"`` attention to
    ``RECOMPUTED_DROPOUT_SDPA`` (reported as ``"<model name>.attn_implementation"``; attention weights
    are then not returned, as with SDPA). FlashAttention already regenerates its dropout mask.
    """
    changed = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Dropout:
                replacement = RecomputedDropout(child.p).train(child.training)
                setattr(module, child_name, replacement)
                changed.append(f"{name}.{child_name}" if name else child_name)
    for name, module in model.named_modules():
        if isinstance(module, PreTrainedModel) and module.config._attn_implementation in ("eager", "sdpa"):
            module.set_attn_implementation(RECOMPUTED_DROPOUT_SDPA)
            changed.append(f"{name}.attn_implementation" if name else "attn_implementation")
    return changed
