"""LoRA-FA on torch's ``nn.MultiheadAttention`` (and so on ``nn.Transformer`` and its encoder and decoder layers).

``nn.MultiheadAttention`` packs its q, k and v projections into one weight ``in_proj_weight`` (3E, E) and runs
``F.multi_head_attention_forward``, which reads ``out_proj.weight`` directly: neither projection goes through a
linear module's forward, so an adapter on ``out_proj`` alone would never run. ``LoraFAMultiheadAttention`` adapts
both, as PEFT's LoRA does for this module:

    [q | k | v] = x W_in^T + b_in + s * dropout(x) A^T B^T      A (r, E) frozen, B (3E, r) trained
    out = o W_o^T + b_o + s * dropout(o) A_o^T B_o^T              out_proj: a LoraFALinear, A_o (r, E), B_o (E, r)

Its forward is ``F.multi_head_attention_forward``'s own steps written with public ops (the same ops in the same
order, so with B = 0 it returns what torch's module returns), with the projections done by the adapters: the packed
product for self-attention, row blocks of ``in_proj_weight`` (and of B) for the query and the key/value of
cross-attention. Masks, ``is_causal``, ``need_weights``, ``average_attn_weights``, ``batch_first``, unbatched inputs,
``bias_k``/``bias_v``, ``add_zero_attn`` and the attention dropout behave as in torch; in training on CPU the attention
dropout keeps a seed instead of its mask (``_RecomputedDropoutAttention``, as the library's seeded attention for
transformers models), except with ``need_weights=True``, which returns the dropped weights anyway. A module with
separate q, k, v weights (``kdim`` or ``vdim`` other than ``embed_dim``) is not adapted (``unsupported_reason``).

In eval mode ``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder`` may take a fused "fast path"
(``torch._transformer_encoder_layer_fwd``, nested tensors) that reads every weight directly and would skip all the
adapters. ``keep_off_the_fast_path`` turns it off (``torch.backends.mha.set_fastpath_enabled``, torch's documented
switch) for the duration of the forward of each such module that holds an adapter, and back as it was after.
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.hooks import RemovableHandle

from lightning_lorafa.adapters.dropout_masks import draw_seed
from lightning_lorafa.adapters.initialization import layer_seed
from lightning_lorafa.adapters.linear import LoraFALinear
from lightning_lorafa.adapters.seeded_attention import _RecomputedDropoutAttention


def unsupported_reason(attention: nn.MultiheadAttention) -> str | None:
    """Why ``LoraFAMultiheadAttention`` cannot adapt ``attention``, or None when it can."""
    if attention.in_proj_weight is None:
        return (
            f"its q, k and v weights are separate (kdim={attention.kdim}, vdim={attention.vdim}, "
            f"embed_dim={attention.embed_dim})"
        )
    if not isinstance(attention.out_proj, nn.Linear) or isinstance(attention.out_proj, LoraFALinear):
        return f"its out_proj is a {type(attention.out_proj).__name__}, not an nn.Linear"
    return None


class LoraFAMultiheadAttention(LoraFALinear):
    """A frozen ``nn.MultiheadAttention`` with LoRA-FA branches on its q, k, v in-projection and its ``out_proj``.

    Args:
        base: the attention module; its parameters are frozen, and its ``out_proj`` becomes a ``LoraFALinear``
            (A drawn from ``layer_seed(seed, "out_proj")``).
        r, alpha, dropout, use_rslora, seed, init_a: as for ``LoraFALinear``, for both branches (the in-projection:
            d_in = E, d_out = 3E).

    Called like ``nn.MultiheadAttention`` (``query, key, value, key_padding_mask=None, need_weights=True,
    attn_mask=None, average_attn_weights=True, is_causal=False``), returning what it returns.

    Attributes: those of ``LoraFALinear`` for the in-projection: lora_A (r, E), lora_B (3E, r), scaling, merged
    (``s B A`` folded into ``in_proj_weight``); ``base.out_proj`` is a ``LoraFALinear`` with its own.

    Raises:
        TypeError: ``base`` is not an ``nn.MultiheadAttention``, or one this class cannot adapt (named why).
    """

    weight_name = "in_proj_weight"

    def __init__(
        self,
        base: nn.MultiheadAttention,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        seed: int = 0,
        init_a: str = "kaiming",
    ) -> None:
        super().__init__(base, r, alpha, dropout=dropout, use_rslora=use_rslora, seed=seed, init_a=init_a)
        out_proj = base.out_proj
        base.out_proj = LoraFALinear(
            out_proj, r, alpha, dropout=dropout, use_rslora=use_rslora, seed=layer_seed(seed, "out_proj"), init_a=init_a
        ).train(out_proj.training)

    @staticmethod
    def base_features(base: nn.Module) -> tuple[int, int]:
        """``(E, 3E)`` of the packed in-projection; raises ``TypeError`` for a module this class does not adapt."""
        if not isinstance(base, nn.MultiheadAttention):
            raise TypeError(f"LoraFAMultiheadAttention adapts nn.MultiheadAttention, got {type(base).__name__}.")
        reason = unsupported_reason(base)
        if reason is not None:
            raise TypeError(f"LoraFAMultiheadAttention cannot adapt this nn.MultiheadAttention: {reason}.")
        return base.in_proj_weight.shape[1], base.in_proj_weight.shape[0]

    @staticmethod
    def base_weight(base: nn.Module) -> torch.Tensor:
        return base.in_proj_weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.in_proj_bias

    @property
    def out_proj(self) -> LoraFALinear:
        return self.base.out_proj

    @property
    def batch_first(self) -> bool:
        return self.base.batch_first

    @property
    def embed_dim(self) -> int:
        return self.base.embed_dim

    @property
    def num_heads(self) -> int:
        return self.base.num_heads

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``nn.MultiheadAttention.forward``: query (L, N, E) (``batch_first``: (N, L, E); unbatched: (L, E)), key and
        value (S, N, E) -> output like query, and the attention weights (N, L, S) (per head: (N, H, L, S)) or None."""
        is_batched = query.dim() == 3
        if self.base.batch_first and is_batched:  # keep the "is" relations between query, key and value
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (x.transpose(1, 0) for x in (query, key))
                    value = key
            else:
                query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        output, weights = self._attention(
            query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
        )
        if self.base.batch_first and is_batched:
            output = output.transpose(1, 0)
        return output, weights

    def _project(self, x: torch.Tensor, rows: slice) -> torch.Tensor:
        """x (..., E) times the rows ``rows`` of ``in_proj_weight`` (and of B), with bias and branch."""
        bias = self.base.in_proj_bias
        y = F.linear(x, self.weight[rows], None if bias is None else bias[rows])
        return y if self.merged else self.add_branch(y, x, rows)

    def _in_projection(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as torch's packed in-projection computes them: one product for self-attention, two for
        encoder-decoder attention (key is value), three otherwise."""
        E = query.size(-1)
        if key is value:
            if query is key:
                proj = self._project(query, slice(0, 3 * E))
                proj = proj.unflatten(-1, (3, E)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
                return proj[0], proj[1], proj[2]
            q = self._project(query, slice(0, E))
            kv = self._project(key, slice(E, 3 * E))
            kv = kv.unflatten(-1, (2, E)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
            return q, kv[0], kv[1]
        return (
            self._project(query, slice(0, E)),
            self._project(key, slice(E, 2 * E)),
            self._project(value, slice(2 * E, 3 * E)),
        )

    def _attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
        need_weights: bool,
        attn_mask: torch.Tensor | None,
        average_attn_weights: bool,
        is_causal: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``F.multi_head_attention_forward`` on sequence-first inputs, with the adapters' projections."""
        base = self.base
        num_heads = base.num_heads
        is_batched = query.dim() == 3
        if not is_batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, embed_dim = query.shape
        key_padding_mask = _as_additive(key_padding_mask, "key_padding_mask", query.dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer module method "
                "`generate_square_subsequent_mask` to create this mask."
            )
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # the attention applies the causal mask itself
        else:
            attn_mask = _as_additive(attn_mask, "attn_mask", query.dtype)
            if key_padding_mask is not None:
                is_causal = False
        if embed_dim != base.embed_dim:
            raise AssertionError(f"was expecting embedding dimension of {base.embed_dim}, but got {embed_dim}")
        if key.shape != value.shape:
            raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")
        head_dim = embed_dim // num_heads
        q, k, v = self._in_projection(query, key, value)
        src_len = key.shape[0]
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if attn_mask.shape != (tgt_len, src_len):
                    raise RuntimeError(
                        f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be {(tgt_len, src_len)}."
                    )
                attn_mask = attn_mask.unsqueeze(0)
            elif attn_mask.dim() == 3:
                if attn_mask.shape != (bsz * num_heads, tgt_len, src_len):
                    raise RuntimeError(
                        f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                        f"{(bsz * num_heads, tgt_len, src_len)}."
                    )
            else:
                raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
        if base.bias_k is not None and base.bias_v is not None:
            k = torch.cat([k, base.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, base.bias_v.repeat(1, bsz, 1)])
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        q = q.view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
        k = k.view(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
        v = v.view(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
        if base.add_zero_attn:
            zeros = (bsz * num_heads, 1, head_dim)
            k = torch.cat([k, torch.zeros(zeros, dtype=k.dtype, device=k.device)], dim=1)
            v = torch.cat([v, torch.zeros(zeros, dtype=v.dtype, device=v.device)], dim=1)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        src_len = k.size(1)
        if key_padding_mask is not None:
            if key_padding_mask.shape != (bsz, src_len):
                raise AssertionError(
                    f"expecting key_padding_mask shape of {(bsz, src_len)}, but got {key_padding_mask.shape}"
                )
            key_padding_mask = (
                key_padding_mask.view(bsz, 1, 1, src_len)
                .expand(-1, num_heads, -1, -1)
                .reshape(bsz * num_heads, 1, src_len)
            )
            attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
        dropout_p = base.dropout if self.training else 0.0
        if need_weights:
            q_scaled = q * math.sqrt(1.0 / float(head_dim))
            if attn_mask is not None:
                weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
            else:
                weights = torch.bmm(q_scaled, k.transpose(-2, -1))
            weights = F.softmax(weights, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            output = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
            output = base.out_proj(output).view(tgt_len, bsz, -1)
            weights = weights.view(bsz, num_heads, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not is_batched:
                output, weights = output.squeeze(1), weights.squeeze(0)
            return output, weights
        if attn_mask is not None:
            if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)
            else:
                attn_mask = attn_mask.view(bsz, num_heads, -1, src_len)
        q = q.view(bsz, num_heads, tgt_len, head_dim)
        k = k.view(bsz, num_heads, src_len, head_dim)
        v = v.view(bsz, num_heads, src_len, head_dim)
        if dropout_p > 0.0 and q.device.type == "cpu":
            output = _seeded_dropout_attention(q, k, v, attn_mask, dropout_p, is_causal)
        else:
            output = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
        output = output.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
        output = base.out_proj(output).view(tgt_len, bsz, -1)
        return (output if is_batched else output.squeeze(1)), None


def _seeded_dropout_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, p: float, is_causal: bool
) -> torch.Tensor:
    """``scaled_dot_product_attention`` with dropout ``p`` keeping a seed instead of its mask (its CPU kernel keeps
    the mask and the probabilities): q (N, H, L, D), k/v (N, H, S, D), ``attn_mask`` additive, broadcastable to
    (N, H, L, S) -> (N, H, L, D)."""
    causal = None
    if is_causal:
        length, source = q.shape[2], k.shape[2]
        causal = torch.ones(length, source, dtype=torch.bool, device=q.device).tril(source - length)  # True attends
    seed = draw_seed(q.device)
    return _RecomputedDropoutAttention.apply(q, k, v, attn_mask, causal, q.shape[-1] ** -0.5, p, seed)


def _as_additive(mask: torch.Tensor | None, name: str, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (True: not attended) as an additive float mask (0 or -inf) of ``dtype``; a float mask as is."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise AssertionError(f"only bool and floating types of {name} are supported")
    return mask


#: Modules whose forward turns the eval fast path off: module -> its hooks' handles.
_fast_path_hooks: weakref.WeakKeyDictionary[nn.Module, list[RemovableHandle]] = weakref.WeakKeyDictionary()
_fast_path_was: list[bool] = []


def _fast_path_off(module: nn.Module, args: tuple) -> None:
    if not module.training:
        _fast_path_was.append(torch.backends.mha.get_fastpath_enabled())
        torch.backends.mha.set_fastpath_enabled(False)


def _fast_path_back(module: nn.Module, args: tuple, output: object) -> None:
    if not module.training and _fast_path_was:
        torch.backends.mha.set_fastpath_enabled(_fast_path_was.pop())


def keep_off_the_fast_path(model: nn.Module) -> list[str]:
    """Make every ``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder`` of ``model`` that holds a LoRA-FA
    adapter run its Python path in eval mode too (see the module docstring); return their names."""
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerEncoder)) or module in _fast_path_hooks:
            continue
        if any(isinstance(inner, LoraFALinear) for inner in module.modules()):
            _fast_path_hooks[module] = [
                module.register_forward_pre_hook(_fast_path_off),
                module.register_forward_hook(_fast_path_back, always_call=True),
            ]
            names.append(name)
    return names


def allow_the_fast_path(model: nn.Module) -> None:
    """Undo ``keep_off_the_fast_path`` for the modules of ``model`` (after the adapters are merged away)."""
    for module in model.modules():
        for handle in _fast_path_hooks.pop(module, []):
            handle.remove()
