"""Attention whose dropout keeps a seed instead of its mask and probabilities.

``dropout(softmax(cap(q k^T * scaling) + bias + mask)) v`` as an ``autograd.Function`` that keeps q, k, v, the bias,
the mask and an 8-byte seed, and recomputes the probabilities and rebuilds the dropout mask in backward: what the
CPU path of ``scaled_dot_product_attention`` would keep as a mask and two (B, H, Sq, Sk) probability tensors. The
model-level switching to it (transformers' attention interface) is ``lightning_lorafa.model.attention``; torch's
``nn.MultiheadAttention`` adapter calls it directly.
"""

from __future__ import annotations

import torch

from lightning_lorafa import _compat
from lightning_lorafa.adapters.dropout import _zero
from lightning_lorafa.adapters.dropout_masks import dropout_mask, dropout_mul, keep_scale


class _RecomputedDropoutAttention(torch.autograd.Function):
    """``dropout(softmax(cap(q k^T * scaling) + bias + mask)) v`` keeping q, k, v, bias, mask and a seed tensor only.

    ``cap(s) = softcap * tanh(s / softcap)`` with a ``softcap`` (Gemma2's order: before bias and mask), else
    ``s``. q (B, H, Sq, D), k/v (B, H, Sk, D) -> (B, H, Sq, D). The products are ``bmm`` on (B * H, S, D) views
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
        softcap: float | None = None,
    ) -> torch.Tensor:
        batch, heads, q_length, head_dim = query.shape
        kv_length = key.shape[2]
        query = query.reshape(batch * heads, q_length, head_dim)
        key = key.reshape(batch * heads, kv_length, head_dim)
        value = value.reshape(batch * heads, kv_length, value.shape[-1])
        shape = (batch, heads, q_length, kv_length)
        probs = _probabilities(query, key, bias, mask, scaling, shape, softcap)[0]
        ctx.save_for_backward(query, key, value, bias, mask, seed)
        ctx.scaling, ctx.p, ctx.shape, ctx.softcap = scaling, p, shape, softcap
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
    for the eager composition (``matmul``, ``* scaling``, ``/ softcap``, tanh, ``* softcap``, ``+ bias``, softmax,
    dropout, ``matmul``)."""
    query, key, value, bias, mask, seed = ctx.saved_tensors
    batch, heads, q_length, kv_length = shape = ctx.shape
    probs, tanh = _probabilities(query, key, bias, mask, ctx.scaling, shape, ctx.softcap)
    grad_out = grad_out.reshape(batch * heads, q_length, -1)
    grad_probs = torch.bmm(grad_out, value.transpose(1, 2)).view(shape)
    if grad_probs.dtype != probs.dtype:  # autocast: bf16 products, float32 probs (a float32 bias)
        grad_probs = grad_probs.to(probs.dtype)
    dropped, grad_probs = _apply_masks(seed, ctx.p, probs, grad_probs)
    grad_value = torch.bmm(dropped.view(batch * heads, q_length, kv_length).transpose(1, 2), grad_out)
    grad_scores = _compat.softmax_backward(grad_probs, probs, -1, probs.dtype)
    grad_bias = grad_scores.sum_to_size(bias.shape) if ctx.needs_input_grad[3] else None
    if tanh is not None:
        # d/ds [c tanh(s / c)] = 1 - tanh^2(s / c) in autograd's order (* c, tanh_backward, / c), in the scores'
        # dtype: under autocast, autograd casts the gradient there at ``+ mask``
        grad_scores = torch.ops.aten.tanh_backward(grad_scores.to(tanh.dtype) * ctx.softcap, tanh).div_(ctx.softcap)
    # in place unless sum_to_size returned grad_scores itself (a bias of the scores' shape)
    fresh = grad_bias is None or tanh is not None
    grad_scores = grad_scores.mul_(ctx.scaling) if fresh else grad_scores * ctx.scaling
    grad_scores = grad_scores.view(batch * heads, q_length, kv_length)
    grad_query = torch.bmm(grad_scores, key).view(batch, heads, q_length, -1)
    # (q^T g)^T, the order autograd uses for ``q @ k^T``: the same rounding as a stored-mask reference.
    grad_key = torch.bmm(query.transpose(1, 2), grad_scores).transpose(1, 2).view(batch, heads, kv_length, -1)
    grad_value = grad_value.view(batch, heads, kv_length, -1)
    return grad_query, grad_key, grad_value, grad_bias, None, None, None, None, None


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
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``softmax(cap(q k^T * scaling) + bias + mask)`` and ``tanh(q k^T * scaling / softcap)`` (None without a
    softcap; backward needs it): q (B * H, Sq, D), k (B * H, Sk, D) -> (B, H, Sq, Sk) each, in the order eager
    attention uses; bool masks: True attends. In place on the fresh scores where dtypes agree (the same
    rounding); a bias or mask of another dtype promotes, as ``+`` does."""
    scores = torch.bmm(query, key.transpose(1, 2)).view(shape).mul_(scaling)
    tanh = None
    if softcap is not None:
        tanh = scores.div_(softcap).tanh_()
        scores = tanh * softcap
    if bias is not None:
        scores = scores.add_(bias) if bias.dtype == scores.dtype else scores + bias
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill_(~mask, torch.finfo(scores.dtype).min)
    elif mask is not None:
        scores = scores.add_(mask) if mask.dtype == scores.dtype else scores + mask
    return torch.softmax(scores, dim=-1), tanh
