"""Cross-entropy over a language model's head without the (tokens x vocabulary) logits.

    logits = x W^T + b + h B^T          x: (n, H), W: (V, H), b: (V,), h: (n, r), B: (V, r)
    logits = c * tanh(logits / c)        with Gemma 2/3's final softcap c
    loss   = sum_i (logsumexp(logits_i) - logits_i[t_i]) / normalizer

``h B^T`` is a LoRA-FA-adapted head's branch (``h = dropout(x) A'^T``, computed by the caller so that its own
backward reaches the adapter's input). The tokens run in chunks of ``chunk`` rows; for each chunk the logits exist
for a moment, in float32 for the log-sum-exp, and their gradient ``(softmax - onehot) / normalizer`` is turned at
once into the gradients of x, h, B and (when they train) W and b. Backward only scales those by the loss's
gradient, so nothing of size (n, V) is kept, and no logits are computed twice.

Under autocast the products run in the autocast dtype, as the head's own ``nn.Linear`` would. On CUDA, with
liger-kernel installed and no LoRA-FA branch on the head, Liger's fused linear cross-entropy (Triton) computes the
same sum instead (``fused_kernel``).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable

import torch
from torch.nn import functional as F

#: Tokens per chunk at least (fewer rows make the head's matmuls memory-bound: on 2 CPU cores, 1,024 tokens of a
#: 128k-vocabulary head took 12.7 s in chunks of 64 rows, 9.6 s in chunks of 256, 11.2 s unchunked) and at most.
MIN_CHUNK_ROWS, MAX_CHUNK_ROWS = 256, 4096


def chunk_rows(num_tokens: int, hidden: int, vocabulary: int) -> int:
    """Tokens per chunk: ``num_tokens / ceil(V / H)`` rounded up to a power of two (one chunk's float32 logits
    about the size of the hidden states), within [``MIN_CHUNK_ROWS``, ``MAX_CHUNK_ROWS``] and at most
    ``num_tokens``."""
    rows = math.ceil(num_tokens / max(1, math.ceil(vocabulary / hidden)))
    rows = 1 << max(0, rows - 1).bit_length()
    return max(1, min(max(rows, MIN_CHUNK_ROWS), MAX_CHUNK_ROWS, num_tokens))


class LinearCrossEntropy(torch.autograd.Function):
    """The loss above; gradients computed chunk by chunk in forward, scaled in backward."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        h: torch.Tensor | None,
        lora_B: torch.Tensor | None,
        targets: torch.Tensor,
        counted: torch.Tensor | None,
        normalizer: torch.Tensor,
        softcap: float | None,
        chunk: int,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        needs = ctx.needs_input_grad
        W = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        B = None if lora_B is None else lora_B.to(dtype)
        grad_x = torch.empty_like(x) if needs[0] else None
        grad_h = torch.empty_like(h) if h is not None and needs[3] else None
        float32 = {"dtype": torch.float32, "device": x.device}
        grad_W = torch.zeros(weight.shape, **float32) if needs[1] else None
        grad_b = torch.zeros(bias.shape, **float32) if bias is not None and needs[2] else None
        grad_B = torch.zeros(lora_B.shape, **float32) if B is not None and needs[4] else None
        wants_grad = any(g is not None for g in (grad_x, grad_h, grad_W, grad_b, grad_B))
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        weights = None if counted is None else counted.to(torch.float32)
        if counted is not None:
            targets = targets.masked_fill(~counted, 0)  # any class: the row's weight is 0
        for start in range(0, x.shape[0], chunk):
            rows = slice(start, start + chunk)
            xc = x[rows].to(dtype)
            logits = F.linear(xc, W, b)
            if B is not None:
                hc = h[rows].to(dtype)
                logits = logits + F.linear(hc, B)
            logits = logits.float()
            if softcap is not None:
                capped = torch.tanh(logits / softcap)
                logits = capped * softcap
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, targets[rows, None]).squeeze(1)
            losses = lse - picked
            total += (losses if weights is None else losses * weights[rows]).sum()
            if not wants_grad:
                continue
            grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            grad.scatter_add_(1, targets[rows, None], torch.full_like(picked[:, None], -1.0))
            if softcap is not None:
                grad.mul_(1.0 - capped.square_())
            scale = 1.0 / normalizer if weights is None else (weights[rows] / normalizer)[:, None]
            grad = grad.mul_(scale).to(dtype)
            if grad_x is not None:
                grad_x[rows] = grad @ W
            if grad_h is not None:
                grad_h[rows] = grad @ B
            if grad_W is not None:
                grad_W.addmm_(grad.t(), xc, beta=1.0)
            if grad_b is not None:
                grad_b += grad.sum(0).float()
            if grad_B is not None:
                grad_B.addmm_(grad.t(), hc, beta=1.0)
        ctx.save_for_backward(  # kept as saved tensors, so that saved-tensor hooks see (and may offload) them
            grad_x,
            None if grad_W is None else grad_W.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            grad_h,
            None if grad_B is None else grad_B.to(lora_B.dtype),
        )
        return total / normalizer

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grads = tuple(None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors)
        return (*grads, None, None, None, None, None, None)


def fused_kernel(x: torch.Tensor, h: torch.Tensor | None) -> Callable | None:
    """Liger's ``liger_fused_linear_cross_entropy`` where it applies (x on CUDA, no LoRA-FA branch, liger-kernel
    installed), imported at first use; None elsewhere (the pure-PyTorch chunks run)."""
    if x.device.type != "cuda" or h is not None or importlib.util.find_spec("liger_kernel") is None:
        return None
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    counted: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    h: torch.Tensor | None = None,
    lora_B: torch.Tensor | None = None,
    normalizer: torch.Tensor | float | None = None,
    softcap: float | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """``sum_i CE(x_i W^T + b + h_i B^T, t_i) / normalizer`` (float32), never keeping (n, V) for backward.

    x (n, H), targets (n,); ``counted`` (n,) bool: the tokens that count (default: all; the others add nothing and
    get a zero gradient); ``normalizer`` defaults to the number of tokens that count (a mean).
    ``h`` (n, r) and ``lora_B`` (V, r) add a LoRA-FA branch; ``softcap`` Gemma's final logit softcapping; ``chunk``
    tokens per chunk (default ``chunk_rows``; passing it also rules out ``fused_kernel``). Products run in the
    autocast dtype under autocast, else in x's.
    """
    if (h is None) != (lora_B is None):
        raise ValueError("linear_cross_entropy: pass both h and lora_B (a LoRA-FA branch), or neither.")
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    if normalizer is None:
        normalizer = x.shape[0] if counted is None else counted.sum()
    normalizer = torch.as_tensor(normalizer, dtype=torch.float32, device=x.device)
    kernel = fused_kernel(x, h) if chunk is None and counted is None else None
    if kernel is not None:
        with torch.autocast(device, enabled=False):
            b = None if bias is None else bias.to(dtype)
            total = kernel(x.to(dtype), weight.to(dtype), targets, bias=b, reduction="sum", softcap=softcap)
        return total.float() / normalizer
    chunk = chunk or chunk_rows(x.shape[0], x.shape[1], weight.shape[0])
    with torch.autocast(device, enabled=False):
        return LinearCrossEntropy.apply(x, weight, bias, h, lora_B, targets, counted, normalizer, softcap, chunk, dtype)
