"""Dropout that keeps a seed instead of a mask.

A dropout mask is as large as its input. Backward needs it, so ordinary dropout keeps it alive
from forward to backward. Here forward draws a seed tensor from the device's RNG (so runs stay
reproducible under ``seed_everything``), multiplies by the mask that seed determines
(``kernels.dropout_mul``: one Triton kernel on CUDA), and backward rebuilds the identical mask from
the same seed: only the 8-byte seed is kept, and nothing waits for the device.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.overrides import handle_torch_function, has_torch_function_unary
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from lightning_lorafa.kernels import draw_seed, dropout_mul

RECOMPUTED_DROPOUT_SDPA = "sdpa_recomputed_dropout"


class _SeededDropout(torch.autograd.Function):
    """``dropout_mul(x, seed, p)``, keeping the seed instead of the mask."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
        ctx.save_for_backward(seed)
        ctx.p = p
        return dropout_mul(x, seed, p)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (seed,) = ctx.saved_tensors
        return dropout_mul(grad_out, seed, ctx.p), None, None


def seeded_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout of ``x`` (*) -> (*) with ``0 < p < 1`` that keeps a seed, not a mask, for backward.

    Draws one seed from the RNG of ``x``'s device; the mask is ``kernels.dropout_mul``'s for that seed.
    """
    if has_torch_function_unary(x):  # lets TorchFunctionMode (the saved-activation recorder) see this call
        return handle_torch_function(seeded_dropout, (x,), x, p)
    return _SeededDropout.apply(x, draw_seed(x.device), p)


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
    """``dropout(softmax(q k^T * scaling + bias + mask)) v`` keeping q, k, v, bias, mask and a seed tensor only."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
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
        probs = _probabilities(query, key, bias, mask, scaling)  # (B, H, Sq, Sk)
        ctx.save_for_backward(query, key, value, bias, mask, seed)
        ctx.scaling, ctx.p = scaling, p
        return torch.matmul(dropout_mul(probs, seed, p), value)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad_out: torch.Tensor):
        query, key, value, bias, mask, seed = ctx.saved_tensors
        probs = _probabilities(query, key, bias, mask, ctx.scaling)
        grad_value = torch.matmul(dropout_mul(probs, seed, ctx.p).transpose(-2, -1), grad_out)
        # Under autocast the matmul gives the autocast dtype while probs may be float32 (a float32 bias).
        grad_probs = dropout_mul(torch.matmul(grad_out, value.transpose(-2, -1)).to(probs.dtype), seed, ctx.p)
        grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
        grad_bias = grad_scores.sum_to_size(bias.shape) if ctx.needs_input_grad[3] else None
        grad_scores = grad_scores * ctx.scaling
        grad_query = torch.matmul(grad_scores, key)
        # (q^T g)^T, the order autograd uses for ``q @ k^T``: the same rounding as a stored-mask reference.
        grad_key = torch.matmul(query.transpose(-2, -1), grad_scores).transpose(-2, -1)
        return grad_query, grad_key, grad_value, grad_bias, None, None, None, None


def _probabilities(
    query: torch.Tensor, key: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """``softmax(q k^T * scaling + bias + mask)`` in the order eager attention uses; bool masks: True attends."""
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if bias is not None:
        scores = scores + bias
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    elif mask is not None:
        scores = scores + mask
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
