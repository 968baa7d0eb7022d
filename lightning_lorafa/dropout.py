"""Dropout that keeps a seed instead of a mask.

A dropout mask is as large as its input. Backward needs it, so ordinary dropout keeps it alive
from forward to backward. Here forward draws one integer seed from the global RNG (so runs stay
reproducible under ``seed_everything``), builds the mask from a private generator seeded with it,
and backward rebuilds the identical mask from the same seed: only the seed is kept.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

_SEED_HIGH = 2**62
RECOMPUTED_DROPOUT_SDPA = "sdpa_recomputed_dropout"


def draw_seed() -> int:
    """Draw a seed for one dropout call from the global CPU RNG (advances it by one draw)."""
    return int(torch.randint(_SEED_HIGH, (1,)).item())


#: Dropout probabilities are resolved in steps of 1 / 2**16 (FlashAttention's kernels use 1 / 2**8).
_LEVELS = 2**16


def _dropped_levels(p: float) -> int:
    """How many of the 2**16 values of a 16-bit draw drop an entry: ``p * 2**16`` rounded, at most 2**16 - 1."""
    return min(round(p * _LEVELS), _LEVELS - 1)


def effective_p(p: float) -> float:
    """The drop probability ``dropout_scale`` realises for ``p``: ``p`` rounded to a multiple of 1 / 2**16."""
    return _dropped_levels(p) / _LEVELS


def dropout_scale(shape: torch.Size, p: float, seed: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The dropout multiplier ``mask / (1 - p)`` for ``shape``: zeros where dropped, ``1/(1-p)`` elsewhere.

    The same ``(shape, p, seed, device, dtype)`` always gives the same tensor, on CPU and CUDA. Each entry
    takes 16 uniform random bits (four per 64-bit draw) and is dropped when they fall below ``p * 2**16``,
    so ``p`` is used as ``effective_p(p)`` (within 8e-6 of ``p``). On CPU this draws the mask about five
    times faster than ``bernoulli_``, which matters because the mask is drawn twice (forward and backward).
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    shape = torch.Size(shape)
    words = torch.randint(-(2**63), 2**63 - 1, ((shape.numel() + 3) // 4,), generator=generator, device=device)
    bits = words.view(torch.int16)[: shape.numel()].view(shape)  # uniform over [-2**15, 2**15)
    dropped = _dropped_levels(p)
    keep = bits >= dropped - _LEVELS // 2
    return keep.to(dtype).mul_(1.0 / (1.0 - dropped / _LEVELS))


class _RecomputedDropout(torch.autograd.Function):
    """``x * dropout_scale(x.shape, p, seed)``, keeping the seed instead of the mask."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
        ctx.p, ctx.seed = p, seed
        return x * dropout_scale(x.shape, p, seed, x.device, x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return grad_out * dropout_scale(grad_out.shape, ctx.p, ctx.seed, grad_out.device, grad_out.dtype), None, None


class RecomputedDropout(nn.Module):
    """Drop-in ``nn.Dropout``: (*) -> (*), same semantics in train and eval mode, but keeps a seed, not a mask.

    Each training forward with ``0 < p < 1`` draws one seed with ``draw_seed()``; the mask is
    ``dropout_scale(x.shape, p, seed, ...)``, regenerated in backward. Raises ``ValueError`` unless 0 <= p <= 1.
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
        return _RecomputedDropout.apply(x, self.p, draw_seed())

    def extra_repr(self) -> str:
        return f"p={self.p}"


class _RecomputedDropoutAttention(torch.autograd.Function):
    """``dropout(softmax(q k^T * scaling + bias + mask)) v`` keeping q, k, v, bias, mask and a seed only."""

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
        seed: int,
    ) -> torch.Tensor:
        probs = _probabilities(query, key, bias, mask, scaling)  # (B, H, Sq, Sk)
        ctx.save_for_backward(query, key, value, bias, mask)
        ctx.scaling, ctx.p, ctx.seed = scaling, p, seed
        return torch.matmul(probs.mul_(dropout_scale(probs.shape, p, seed, probs.device, probs.dtype)), value)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad_out: torch.Tensor):
        query, key, value, bias, mask = ctx.saved_tensors
        probs = _probabilities(query, key, bias, mask, ctx.scaling)
        keep = dropout_scale(probs.shape, ctx.p, ctx.seed, probs.device, probs.dtype)
        grad_value = torch.matmul((probs * keep).transpose(-2, -1), grad_out)
        # Under autocast the matmul gives the autocast dtype while probs may be float32 (a float32 bias).
        grad_probs = torch.matmul(grad_out, value.transpose(-2, -1)).to(probs.dtype).mul_(keep)
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
    seed = draw_seed()
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
