"""Selective recomputation: keep a transformer block's MLP input, recompute the MLP's inner activations in backward.

With LoRA-FA the LoRA branches keep only ``h = dropout(x) A^T`` (tokens, r). What a step still keeps is what the
frozen model's non-linear ops save, and the MLP saves the most: a LLaMA MLP keeps three (tokens, d_ff) tensors
(gate output, SiLU output, up output), a RoBERTa/T5 MLP its (tokens, d_ff) activation input. Like Megatron-LM's
selective recomputation (``--recompute-modules mlp``), ``recompute="mlp"`` keeps only the MLP's input (tokens, d)
and runs the MLP's forward again in backward; its projections are frozen, so the cost is one more forward of
the MLP (of a gated MLP only its gate and up projections). ``recompute="block"`` checkpoints whole transformer
blocks (transformers' activation checkpointing).

Both use ``torch.utils.checkpoint`` without re-entrance, which restores the RNG state before recomputing: the
seed-keeping dropouts (``RecomputedDropout``, the LoRA-FA branch) draw the same seeds, hence the same masks, so
losses and gradients equal those of a run without recomputation.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.overrides import handle_torch_function, has_torch_function
from torch.utils.checkpoint import checkpoint

from lightning_lorafa.adapters.linear import LoraFALinear, is_linear
from lightning_lorafa.model.in_place import InPlaceSubclass
from lightning_lorafa.model.select import pretrained_models
from lightning_lorafa.settings import RECOMPUTE_MODES, Recompute


def check_recompute(mode: str) -> None:
    """Raise ``ValueError`` unless ``mode`` is ``"none"``, ``"mlp"`` or ``"block"``."""
    if mode not in RECOMPUTE_MODES:
        raise ValueError(
            f"recompute must be one of {RECOMPUTE_MODES}, got {mode!r}: 'mlp' recomputes each block's MLP from its "
            "input in backward, 'block' checkpoints whole transformer blocks, 'none' keeps every activation."
        )


def _is_linear(module: object) -> bool:
    """A linear layer, adapted or not (``nn.Linear``, bitsandbytes' subclasses, transformers' ``Conv1D``)."""
    return isinstance(module, LoraFALinear) or (isinstance(module, nn.Module) and is_linear(module))


def _has_linears(module: nn.Module, *names: str) -> bool:
    return all(_is_linear(getattr(module, name, None)) for name in names)


def _is_gated(module: nn.Module) -> bool:
    """A gated MLP ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` (LLaMA, Mistral, Qwen2, Gemma)."""
    return _has_linears(module, "gate_proj", "up_proj", "down_proj") and callable(getattr(module, "act_fn", None))


def _mlp_method(module: nn.Module) -> str | None:
    """The method of ``module`` that computes a whole MLP from its input, if ``module`` is one (by structure).

    - gated MLP (LLaMA, Mistral, Qwen2, ...): ``gate_proj``, ``up_proj``, ``down_proj`` -> ``forward``
      (with ``act_fn``, only the product before ``down_proj`` is recomputed: see ``_recomputed_gated``);
    - T5 ``DenseReluDense``: ``wi``, ``wo`` or ``wi_0``, ``wi_1``, ``wo`` -> ``forward``;
    - GPT-2 ``GPT2MLP``: ``c_fc``, ``c_proj`` (transformers' ``Conv1D``) and ``act`` -> ``forward``;
    - BERT/RoBERTa layer: ``intermediate.dense`` (d -> d_ff, with the activation) and ``output.dense``
      (d_ff -> d, dropout, residual LayerNorm), both called by ``feed_forward_chunk`` -> ``feed_forward_chunk``.
    """
    if _has_linears(module, "gate_proj", "up_proj", "down_proj"):
        return "forward"
    if _has_linears(module, "wo") and (_has_linears(module, "wi") or _has_linears(module, "wi_0", "wi_1")):
        return "forward"
    if _has_linears(module, "c_fc", "c_proj") and callable(getattr(module, "act", None)):  # GPT-2's MLP (Conv1D)
        return "forward"
    intermediate, output = getattr(module, "intermediate", None), getattr(module, "output", None)
    if (
        isinstance(intermediate, nn.Module)
        and isinstance(output, nn.Module)
        and _has_linears(intermediate, "dense")
        and _has_linears(output, "dense")
        and callable(getattr(type(module), "feed_forward_chunk", None))
    ):
        return "feed_forward_chunk"
    return None


def find_mlps(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Every MLP of ``model`` recognised by structure: ``{dotted module name: (module, method recomputed)}``.

    See ``_mlp_method`` for the structures recognised. An MLP found is not searched further inside.
    """
    found: dict[str, tuple[nn.Module, str]] = {}
    for name, module in model.named_modules():
        if any(name.startswith(f"{outer}.") for outer in found):
            continue
        method = _mlp_method(module)
        if method is not None:
            found[name] = (module, method)
    return found


def _gated_product(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``act_fn(gate_proj(x)) * up_proj(x)``: (..., d) -> (..., d_ff), a gated MLP up to its output projection."""
    return module.act_fn(module.gate_proj(x)) * module.up_proj(x)


class RecomputedMLP(InPlaceSubclass):
    """Marks a module whose class ``recompute_mlps`` swapped for a subclass that recomputes its MLP in backward.

    The subclass (``Recomputed<Class>``) inherits everything from the model's own class and overrides one
    method, ``forward`` or ``feed_forward_chunk`` (``recomputed_method``); see ``in_place``.
    """

    recomputed_method: str = "forward"
    recomputes_gated_product: bool = False


@functools.cache
def _recomputed_class(cls: type, method: str, gated: bool) -> type:
    """``Recomputed<cls>``: ``cls`` with ``method`` run under ``checkpoint_mlp`` when gradients are on.

    For a gated MLP (``gated``), ``forward`` recomputes only ``act_fn(gate_proj(x)) * up_proj(x)``:
    ``down_proj`` stays outside the checkpoint: with its weight frozen it keeps only its LoRA-FA ``h``, never
    its (..., d_ff) input, so recomputing it would buy nothing; backward runs gate and up once more, not down.
    Otherwise the whole method is recomputed. The override carries the original's signature
    (``functools.wraps``): transformers' ``apply_chunking_to_forward`` counts the parameters of
    ``feed_forward_chunk``. One class per (``cls``, ``method``, ``gated``), made once.
    """
    original = getattr(cls, method)
    if gated:

        @functools.wraps(original)
        def recomputed(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
            if not torch.is_grad_enabled():
                return original(self, x)
            return self.down_proj(checkpoint_mlp(_gated_product, self, x))

    else:

        @functools.wraps(original)
        def recomputed(self: nn.Module, *args, **kwargs):
            if not torch.is_grad_enabled():
                return original(self, *args, **kwargs)
            return checkpoint_mlp(original, self, *args, **kwargs)

    namespace = {method: recomputed, "recomputed_method": method, "recomputes_gated_product": gated}
    namespace |= {"made_by": (_recomputed_class, (cls, method, gated)), "__module__": __name__}
    return type(f"Recomputed{cls.__name__}", (RecomputedMLP, cls), namespace)


def checkpoint_mlp(function, module: nn.Module, *args, **kwargs):
    """``function(module, *args, **kwargs)`` under non-reentrant ``torch.utils.checkpoint``: keeps the tensors
    in ``args`` (the MLP input, (..., d)) and recomputes everything else in backward, with the RNG state restored.

    Dispatched like a torch function, so ``SavedActivationRecorder`` reports the inputs it keeps as
    ``checkpoint_mlp``.
    """
    tensors = tuple(a for a in args if isinstance(a, torch.Tensor))
    if has_torch_function(tensors):
        return handle_torch_function(checkpoint_mlp, tensors, function, module, *args, **kwargs)
    return checkpoint(function, module, *args, use_reentrant=False, **kwargs)


def _is_recomputed(module: nn.Module) -> bool:
    return isinstance(module, RecomputedMLP)


def recompute_mlps(model: nn.Module) -> list[str]:
    """Recompute each MLP of ``model`` from its input in backward; return the dotted names of the regions.

    Each region keeps its input (tokens, d) through the checkpoint and nothing inside: no activation input,
    no LoRA-FA ``h``, no LayerNorm input. Regions: a gated MLP up to ``down_proj`` (which keeps only its ``h``);
    T5's ``DenseReluDense`` whole; a BERT/RoBERTa layer's ``intermediate`` and ``output`` (dense, dropout and the
    residual LayerNorm). Each region's module gets a subclass of its class overriding the one method
    (``RecomputedMLP``): its parameters, state-dict keys and ``isinstance`` checks are unchanged. Applying it
    twice changes nothing more.

    Raises:
        ValueError: no MLP is recognised in ``model``, or its blocks already use activation checkpointing.
    """
    mlps = find_mlps(model)
    if not mlps:
        raise ValueError(
            f"recompute='mlp' found no MLP in {type(model).__name__}. It recognises gated MLPs with gate_proj/up_proj/"
            "down_proj (LLaMA, Mistral, Qwen2), T5's DenseReluDense (wi, wo) and DenseGatedActDense (wi_0, wi_1, wo), "
            "and BERT/RoBERTa layers (intermediate.dense and output.dense called by feed_forward_chunk). Use "
            "recompute='block' (transformers' activation checkpointing) or 'none', or wrap the MLP's forward in "
            "torch.utils.checkpoint.checkpoint(..., use_reentrant=False) yourself."
        )
    if checkpointed_blocks(model):
        raise ValueError(
            "recompute='mlp': the model already checkpoints whole blocks (transformers' activation checkpointing), "
            "which recomputes the MLPs too. Use one of the two: call model.activation_checkpointing_disable() first, "
            "or keep recompute='block'."
        )
    names = []
    for name, (module, method) in mlps.items():
        if not _is_recomputed(module):
            if method in vars(module):
                raise ValueError(
                    f"recompute='mlp': {name}.{method} is already replaced on the instance "
                    f"({vars(module)[method]!r}); remove that wrapper first."
                )
            gated = method == "forward" and _is_gated(module)
            module.__class__ = _recomputed_class(type(module), method, gated)
        names.append(f"{name}.{method}" if method != "forward" else name)
    return names


def checkpointed_blocks(model: nn.Module) -> list[str]:
    """Dotted names of the transformers blocks of ``model`` whose activation checkpointing is on."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing
    ]


def recompute_blocks(model: nn.Module) -> list[str]:
    """Checkpoint every transformer block of ``model`` (transformers' activation checkpointing, non-reentrant).

    Each block keeps its input hidden states and recomputes everything inside in backward. Inputs need not
    require gradients (non-reentrant checkpointing), so transformers' input-embedding hook is removed again.
    Returns the dotted names of the checkpointed blocks.

    Raises:
        ValueError: ``model`` contains no transformers model that supports activation checkpointing, or its
            MLPs are recomputed already (``recompute_mlps``).
    """
    tops = {name: m for name, m in pretrained_models(model).items() if m.supports_gradient_checkpointing}
    if not tops:
        raise ValueError(
            f"recompute='block' needs a transformers model that supports activation checkpointing; "
            f"{type(model).__name__} contains none. Use recompute='mlp', or wrap your blocks' forward in "
            "torch.utils.checkpoint.checkpoint(..., use_reentrant=False) yourself."
        )
    if any(_is_recomputed(m) for m in model.modules()):
        raise ValueError(
            "recompute='block': the model's MLPs are recomputed already (recompute='mlp'); a block checkpoint "
            "recomputes them too. Use one of the two on a freshly loaded model."
        )
    for top in tops.values():
        kwargs = {"use_reentrant": False}
        if hasattr(top, "activation_checkpointing_enable"):
            top.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            top.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        top.disable_input_require_grads()
    names = checkpointed_blocks(model)
    if not names:
        raise ValueError(
            f"recompute='block': {type(model).__name__} has no transformer blocks that transformers checkpoints "
            "(GradientCheckpointingLayer). Use recompute='mlp'."
        )
    return names


def apply_recompute(model: nn.Module, recompute: Recompute) -> list[str]:
    """Trade compute for activation memory in ``model``'s backward; return the recomputed regions' names.

    Args:
        model: a model (LoRA-FA converted or not; the order does not matter).
        recompute: ``"none"`` (nothing changes), ``"mlp"`` (``recompute_mlps``: each block's MLP is recomputed
            from its input) or ``"block"`` (``recompute_blocks``: whole transformer blocks are checkpointed).

    Raises:
        ValueError: an unknown ``recompute``, or a model where the mode finds nothing to recompute.
    """
    check_recompute(recompute)
    if recompute == "mlp":
        return recompute_mlps(model)
    if recompute == "block":
        return recompute_blocks(model)
    return []


def check_recompute_strategy(recompute: Recompute, strategy: object) -> None:
    """Raise ``ValueError`` when ``strategy`` checkpoints blocks itself and ``recompute`` asks for more.

    Lightning's ``FSDPStrategy(activation_checkpointing_policy=...)`` wraps blocks in torch's
    ``checkpoint_wrapper``; recomputing MLPs or blocks on top would run their forward a third time.
    """
    from lightning.pytorch.strategies import FSDPStrategy

    from lightning_lorafa._compat import strategy_checkpoints_activations

    if recompute != "none" and isinstance(strategy, FSDPStrategy) and strategy_checkpoints_activations(strategy):
        raise ValueError(
            f"LoraFA(recompute={recompute!r}) with FSDPStrategy(activation_checkpointing_policy=...): the strategy "
            "checkpoints whole blocks already. Keep one: LoraFA(recompute='none') with the strategy's policy, or drop "
            "the policy and use recompute='block' (the same blocks, through transformers) or 'mlp'."
        )
