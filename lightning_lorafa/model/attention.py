"""The attention of transformers models: which implementation runs, and attention dropout that keeps a seed.

``set_attention_implementation(model, "auto")`` picks FlashAttention-2 where flash-attn, the model and the
device allow it, otherwise PyTorch SDPA (whose own flash and memory-efficient kernels run on CUDA),
otherwise eager, and switches already-built models with ``PreTrainedModel.set_attn_implementation``.

``use_seeded_dropout_attention(model)`` switches models on ``"eager"`` or ``"sdpa"`` attention to one of two
implementations that, where a CPU training step drops attention probabilities, run ``_RecomputedDropoutAttention``:
it keeps q, k, v, the bias/mask and a seed instead of the mask and the probabilities. Elsewhere (no dropout, eval,
CUDA) each runs what the model would:

- ``RECOMPUTED_DROPOUT_SDPA``: transformers' SDPA (and its boolean masks), for models that support SDPA;
- ``RECOMPUTED_DROPOUT_EAGER``: the model's own eager attention (and eager's additive masks), for models that
  softcap their attention scores (Gemma2, ``config.attn_logit_softcapping``), which SDPA cannot do. transformers
  refuses any name containing ``"sdpa"`` on a model without SDPA support, hence the second name.

Models without SDPA support that do not softcap keep their own attention: their eager attention may not be
``softmax(q k^T * scaling + mask)`` (attention sinks), and neither may attention outside transformers' attention
interface (DeBERTa-v2, BLOOM; Falcon before transformers 5.25). The functions are registered with transformers'
``AttentionInterface`` when first asked for, not at import.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface
from transformers.utils import is_flash_attn_2_available

from lightning_lorafa import _compat
from lightning_lorafa.adapters.dropout_masks import draw_seed
from lightning_lorafa.adapters.seeded_attention import _RecomputedDropoutAttention
from lightning_lorafa.model.select import pretrained_models
from lightning_lorafa.settings import ATTN_IMPLEMENTATIONS

log = logging.getLogger(__name__)

IMPLEMENTATIONS = ATTN_IMPLEMENTATIONS
RECOMPUTED_DROPOUT_SDPA = "sdpa_recomputed_dropout"
RECOMPUTED_DROPOUT_EAGER = "eager_recomputed_dropout"
SEEDED_IMPLEMENTATIONS = (RECOMPUTED_DROPOUT_SDPA, RECOMPUTED_DROPOUT_EAGER)
_registered = False


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
        return _compat.sdpa_attention_forward(
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
    q_length, kv_length = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is None and causal and q_length > 1:
        ones = torch.ones(q_length, kv_length, dtype=torch.bool, device=query.device)
        attention_mask = ones.tril(kv_length - q_length)  # (Sq, Sk), True attends
    return _seeded_attention(module, query, key, value, position_bias, attention_mask, scaling, dropout, None), None


def recomputed_dropout_eager(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention function for ``AttentionInterface``: q (B, H, Sq, D), k/v (B, Hkv, Sk, D) -> (B, Sq, H, D).

    The eager attention function of ``module``'s modeling file (what the model runs on ``"eager"``, softcap
    included), unless the step trains with attention dropout on CPU: there ``_RecomputedDropoutAttention``
    computes it (``softcap * tanh(q k^T * scaling / softcap) + mask``) keeping q, k, v, the mask and a seed, and
    returns no attention weights. ``attention_mask``: eager's additive (B, 1, Sq, Sk) mask, or None (no mask).
    """
    if dropout == 0.0 or not module.training or query.device.type != "cpu":
        eager = _compat.model_eager_attention(type(module))
        return eager(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, softcap=softcap, **kwargs
        )
    return _seeded_attention(module, query, key, value, None, attention_mask, scaling, dropout, softcap), None


def _seeded_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    scaling: float | None,
    p: float,
    softcap: float | None,
) -> torch.Tensor:
    """``_RecomputedDropoutAttention`` with a fresh seed: q (B, H, Sq, D), k/v (B, Hkv, Sk, D) -> (B, Sq, H, D)."""
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = _compat.repeat_kv(key, groups), _compat.repeat_kv(value, groups)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    seed = draw_seed(query.device)
    out = _RecomputedDropoutAttention.apply(query, key, value, bias, mask, scaling, p, seed, softcap)
    return out.transpose(1, 2).contiguous()


def register_seeded_dropout_attention() -> bool:
    """Register ``recomputed_dropout_sdpa`` (with SDPA's mask builder) as ``RECOMPUTED_DROPOUT_SDPA`` and
    ``recomputed_dropout_eager`` (with eager's) as ``RECOMPUTED_DROPOUT_EAGER`` with transformers, once; False
    when transformers' SDPA function could not be imported (``_compat``)."""
    if not _compat.HAS_SDPA_ATTENTION:
        _compat.warn_missing("sdpa_attention")
        return False
    global _registered
    if not _registered:
        AttentionInterface.register(RECOMPUTED_DROPOUT_SDPA, recomputed_dropout_sdpa)
        AttentionMaskInterface.register(RECOMPUTED_DROPOUT_SDPA, _compat.sdpa_mask)
        AttentionInterface.register(RECOMPUTED_DROPOUT_EAGER, recomputed_dropout_eager)
        AttentionMaskInterface.register(RECOMPUTED_DROPOUT_EAGER, AttentionMaskInterface()["eager"])
        _registered = True
    return True


def use_seeded_dropout_attention(model: nn.Module) -> tuple[list[str], dict[str, str]]:
    """Switch every transformers model in ``model`` that runs ``"eager"`` or ``"sdpa"`` attention to
    ``RECOMPUTED_DROPOUT_EAGER`` if it softcaps its attention scores, else to ``RECOMPUTED_DROPOUT_SDPA``
    (attention weights are then not returned while attention dropout runs on CPU; with SDPA, never).

    Returns ``(switched, kept)``: the names switched (``"<module name>.attn_implementation"``), and the models
    left on their own attention by name with the reason (no SDPA support and no softcap, an implementation
    such as FlashAttention that regenerates its dropout mask itself, or a model that refused, e.g. one whose
    attention is not on transformers' attention interface).
    """
    switched: list[str] = []
    kept: dict[str, str] = {}
    configs: set[int] = set()  # a base model inside a task model shares its config: one decision, one log line
    for name, module in model.named_modules():
        if not isinstance(module, PreTrainedModel) or id(module.config) in configs:
            continue
        configs.add(id(module.config))
        label = f"{name}.attn_implementation" if name else "attn_implementation"
        current = _compat.attn_implementation(module)
        if current in SEEDED_IMPLEMENTATIONS:
            continue
        reason = _why_not_seeded(module, current)
        if reason is None and not register_seeded_dropout_attention():
            reason = f"transformers' SDPA attention function is missing ({_compat.missing_features['sdpa_attention']})"
        if reason is None:
            seeded = RECOMPUTED_DROPOUT_EAGER if _softcaps(module) else RECOMPUTED_DROPOUT_SDPA
            try:
                module.set_attn_implementation(seeded)
            except (ValueError, ImportError, NotImplementedError) as error:
                reason = f"it refused: {error}"
            else:
                if _compat.attn_implementation(module) == seeded:
                    switched.append(label)
                    continue
                reason = "it kept its attention implementation"
        kept[name or type(module).__name__] = f"{type(module).__name__} ({current}): {reason}"
    return switched, kept


def _why_not_seeded(model: PreTrainedModel, current: str | None) -> str | None:
    """Why ``model``'s attention cannot become ``RECOMPUTED_DROPOUT_EAGER`` (softcapping models) or
    ``RECOMPUTED_DROPOUT_SDPA`` (the others), or None when it can."""
    if current not in ("eager", "sdpa"):
        return f"runs {current!r} attention, which is left alone"
    if _softcaps(model):
        if _compat.model_eager_attention(type(model)) is None:
            return "softcaps its attention scores and its modeling file has no eager_attention_forward"
        return None
    if not _compat.supports_attention(model, "sdpa"):
        return "does not support SDPA attention"
    return None


def _softcaps(model: PreTrainedModel) -> bool:
    """Whether ``model`` softcaps its attention scores (``config.attn_logit_softcapping``, e.g. Gemma2)."""
    return getattr(model.config, "attn_logit_softcapping", None) is not None


def set_attention_implementation(
    model: nn.Module, implementation: str = "auto", device: torch.device | str | None = None
) -> str:
    """Switch every transformers model inside ``model`` to an attention implementation; return and log it.

    ``"auto"``: ``"flash_attention_2"`` when flash-attn is installed, the model supports it and ``device`` is
    a CUDA GPU of compute capability 8.0 or newer; otherwise ``"sdpa"`` when the model supports it; otherwise
    ``"eager"``. ``device`` is where the model will run (default: where its first parameter is; pass the
    trainer's root device when the model has not been moved yet). A model already switched to
    ``RECOMPUTED_DROPOUT_SDPA`` or ``RECOMPUTED_DROPOUT_EAGER`` by ``use_seeded_dropout_attention`` keeps it when
    the choice is ``"sdpa"`` or ``"eager"``.

    Returns ``"unchanged"`` for ``"auto"`` when ``model`` holds no transformers model.
    Raises ``ValueError`` for an unknown value, for an explicit value on a model without a transformers
    model, or for one the model, the device or the installed packages cannot run (e.g. T5 with
    ``"flash_attention_2"``: its relative position bias is added to the attention scores, which FlashAttention
    does not take).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation={implementation!r} is not one of {IMPLEMENTATIONS}.")
    targets = list(pretrained_models(model).values())
    if not targets:
        if implementation != "auto":
            raise ValueError(
                f"attn_implementation={implementation!r} needs a transformers PreTrainedModel, and "
                f"{type(model).__name__} holds none; use 'auto' to leave its attention unchanged."
            )
        log.info("attention implementation: unchanged (%s holds no transformers model)", type(model).__name__)
        return "unchanged"
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    chosen = [_choose(target, implementation, device) for target in targets]
    for target, name in zip(targets, chosen, strict=True):
        current = _compat.attn_implementation(target)
        if current in SEEDED_IMPLEMENTATIONS and name in ("sdpa", "eager"):
            name = current
            register_seeded_dropout_attention()
        target.set_attn_implementation(name)
        if _compat.attn_implementation(target) != name:
            raise ValueError(f"{type(target).__name__} cannot switch its attention implementation to {name!r}.")
    result = _compat.attn_implementation(targets[0])
    log.info("attention implementation: %s (requested %r, device %s)", result, implementation, device)
    return result


def _choose(model: PreTrainedModel, implementation: str, device: torch.device) -> str:
    """The implementation ``set_attention_implementation`` gives ``model``; raises ``ValueError`` if unusable."""
    name = type(model).__name__
    flash_device = device.type == "cuda" and torch.cuda.is_available()
    flash_device = flash_device and torch.cuda.get_device_capability(device)[0] >= 8
    if implementation == "auto":
        if _compat.supports_attention(model, "flash_attention_2") and flash_device and is_flash_attn_2_available():
            return "flash_attention_2"
        return "sdpa" if _compat.supports_attention(model, "sdpa") else "eager"
    if implementation == "flash_attention_2":
        if not _compat.supports_attention(model, "flash_attention_2"):
            raise ValueError(f"{name} does not support flash_attention_2; use 'sdpa' or 'auto'.")
        if not is_flash_attn_2_available():
            raise ValueError("flash_attention_2 needs flash-attn (`pip install lightning-lorafa[flash]`); use 'sdpa'.")
        if not flash_device:
            raise ValueError(f"flash_attention_2 needs a CUDA GPU of compute capability 8.0+, not {device}.")
    if implementation == "sdpa" and not _compat.supports_attention(model, "sdpa"):
        raise ValueError(f"{name} does not support sdpa; use 'eager' or 'auto'.")
    return implementation
