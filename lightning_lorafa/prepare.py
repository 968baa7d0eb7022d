"""Preparing a model for LoRA-FA training, the same way from every entry point.

``prepare_model(model, settings)`` is what the ``LoraFA`` callback runs on ``setup``, and what Lightning
Fabric and plain PyTorch users call themselves (``examples/fabric.py``), and what the benchmarks call:

1. convert the target linears (``apply_lorafa``; a model converted already must have the same settings),
2. make a quantized (bitsandbytes) base keep no inputs for backward,
3. choose the attention implementation (``set_attention_implementation``),
4. make the model's dropouts keep a seed instead of a mask (``keep_dropout_seeds``),
5. recompute what ``recompute`` asks for in backward (``apply_recompute``).

Each step logs what it did, by name, and what it left out. Then build any optimizer over the trainable
parameters and call ``attach_gradient_correction(optimizer, model)`` (the callback does both for Lightning).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_lorafa import _compat
from lightning_lorafa.attention import set_attention_implementation, use_seeded_dropout_attention
from lightning_lorafa.convert import (
    apply_lorafa,
    count_parameters,
    get_lorafa_config,
    lorafa_experts,
    lorafa_layers,
    lorafa_modules,
)
from lightning_lorafa.correction import GradientCorrection
from lightning_lorafa.dropout import inline_functional_dropouts, replace_dropout
from lightning_lorafa.layer import is_quantized
from lightning_lorafa.multihead import LoraFAMultiheadAttention
from lightning_lorafa.optim import LoraFAOptimizer, lora_layers_by_parameter, lora_names_by_parameter
from lightning_lorafa.quantization import keep_no_quantized_inputs
from lightning_lorafa.recompute import apply_recompute
from lightning_lorafa.router import LoraFARouter
from lightning_lorafa.settings import AdapterSettings, LoraFASettings

log = logging.getLogger(__name__)


@dataclass
class Preparation:
    """What ``prepare_model`` did: every name it changed, and what it left as it was (with the reason)."""

    converted: list[str] = field(default_factory=list)  # module names that got an adapter
    modules_to_save: list[str] = field(default_factory=list)  # fully trained modules
    attention: str | None = None  # the attention implementation chosen, None when left alone
    attention_asked: str | None = None  # what the settings asked for
    dropouts: list[str] = field(default_factory=list)  # dropouts that keep a seed now
    kept_masks: dict[str, str] = field(default_factory=dict)  # dropouts that still keep a mask: name -> why
    own_attention: dict[str, str] = field(default_factory=dict)  # models left on attention of their own: name -> why
    recomputed: list[str] = field(default_factory=list)  # regions recomputed in backward
    adopted: bool = False  # the model was converted already (with the same settings)

    def summary(self, model: nn.Module) -> list[str]:
        """The log lines of this preparation."""
        config = get_lorafa_config(model)
        layers = lorafa_layers(model)
        experts = lorafa_experts(model)
        trainable, total = count_parameters(model)
        b_params = sum(layer.lora_B.numel() for layer in layers.values())
        b_params += sum(a.lora_B.numel() for e in experts.values() for a in e.adapters.values())
        adapted = lorafa_modules(model)
        scaling = next(iter(adapted.values())).scaling
        verb = "uses the adapters already in" if self.adopted else "converted"
        suffixes = ", ".join(sorted({name.rsplit(".", 1)[-1] for name in adapted}))
        routers = sum(isinstance(layer, LoraFARouter) for layer in layers.values())
        attentions = sum(isinstance(layer, LoraFAMultiheadAttention) for layer in layers.values())
        what = f"{len(layers) - routers - attentions} linear layers" + (f", {routers} MoE routers" if routers else "")
        if attentions:
            what += f", {attentions} nn.MultiheadAttention in-projections (q, k, v)"
        if experts:
            num = next(iter(experts.values())).num_experts
            what += f" and {len(experts)} fused experts modules ({num} experts each)"
        lines = [
            f"LoRA-FA: {verb} {what} of {type(model).__name__} (r={config.r}, "
            f"alpha={config.alpha}, scaling={scaling:g}, dropout={config.dropout}): {suffixes}"
            + (f"; fully trained: {', '.join(config.modules_to_save)}" if config.modules_to_save else ""),
            f"LoRA-FA: trainable parameters {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.3f}%): "
            f"B = r * sum(d_out) = {b_params:,}, modules_to_save = {trainable - b_params:,}",
        ]
        if self.attention is not None:
            lines.append(f"LoRA-FA: attention implementation {self.attention} (asked for {self.attention_asked!r}).")
        if self.dropouts or self.kept_masks:
            lines.append(f"LoRA-FA: {len(self.dropouts)} dropouts keep a seed instead of a mask (recompute_dropout).")
        lines += [
            f"LoRA-FA: {name} keeps its own attention: {why}; its dropout modules keep a seed, and what keeps a mask "
            "is named"
            for name, why in self.own_attention.items()
        ]
        lines += [f"LoRA-FA: {name} keeps its mask: {why}" for name, why in self.kept_masks.items()]
        if self.recomputed:
            lines.append(f"LoRA-FA: {len(self.recomputed)} regions recomputed in backward.")
        return lines


def prepare_model(
    model: nn.Module,
    settings: LoraFASettings | None = None,
    /,
    device: torch.device | str | None = None,
    **overrides: Any,
) -> Preparation:
    """Convert ``model`` to LoRA-FA and prepare it for training (see the module docstring); return what was done.

    Args:
        model: a model (a transformers model, a LightningModule, any ``nn.Module``).
        settings: a ``LoraFASettings`` (or a ``LoraFA`` callback); keyword ``overrides`` replace its fields
            (``prepare_model(model, r=16, recompute="mlp")``).
        device: where the model will run (it picks the attention implementation); default: where it is.

    Raises:
        ValueError, TypeError: as ``apply_lorafa``; or the model is converted already with other settings
            (the message names both), or ``recompute`` finds nothing to recompute.
    """
    settings = _settings(settings, overrides)
    model = _compat.uncompiled(model)  # a torch.compile'd model: the model it compiled, prepared in place
    done = Preparation()
    config = getattr(model, "lorafa_config", None)
    if config is None:
        done.converted = apply_lorafa(model, settings)
    else:
        check_same_settings(model, settings)
        done.converted, done.adopted = list(config.target_modules), True
    done.modules_to_save = list(get_lorafa_config(model).modules_to_save)
    if any(is_quantized(module) for module in model.modules()):
        keep_no_quantized_inputs(model)  # bitsandbytes' int8 matmul would keep each layer's input x
    if settings.attn_implementation is not None:
        done.attention = set_attention_implementation(model, settings.attn_implementation, device)
        done.attention_asked = settings.attn_implementation
    if settings.recompute_dropout:
        done.dropouts, done.kept_masks, done.own_attention = keep_dropout_seeds(model)
    if settings.recompute != "none":
        done.recomputed = apply_recompute(model, settings.recompute)
    return done


def _settings(settings: LoraFASettings | None, overrides: dict[str, Any]) -> LoraFASettings:
    if settings is None:
        return LoraFASettings(**overrides)
    if not overrides and type(settings) is LoraFASettings:
        return settings
    base = settings.settings_kwargs() if isinstance(settings, LoraFASettings) else settings.adapter_kwargs()
    return LoraFASettings(**(base | overrides))


def check_same_settings(model: nn.Module, settings: AdapterSettings) -> None:
    """Raise ``ValueError`` when ``model`` was converted with other adapter settings than ``settings`` asks for.

    Compared: r, alpha, dropout, use_rslora, seed, init_a, and the layers ``target_modules``/``exclude`` select
    (and ``modules_to_save`` where given). The message names both settings and how to start over.
    """
    config = get_lorafa_config(model)
    asked = {
        "r": settings.r,
        "alpha": float(settings.alpha),
        "dropout": float(settings.dropout),
        "use_rslora": settings.use_rslora,
        "seed": settings.seed,
        "init_a": settings.init_a,
    }
    have = {key: getattr(config, key) for key in asked} | {"alpha": float(config.alpha)}
    differ = {key: (have[key], value) for key, value in asked.items() if have[key] != value}
    if settings.modules_to_save is not None:
        wanted = settings.modules_to_save
        if sorted(config.modules_to_save) != sorted(wanted) and not all(
            any(name == w or name.endswith("." + w) for name in config.modules_to_save) for w in wanted
        ):
            differ["modules_to_save"] = (config.modules_to_save, wanted)
    if differ:
        both = ", ".join(f"{key}: converted with {old!r}, asked for {new!r}" for key, (old, new) in differ.items())
        raise ValueError(
            f"{type(model).__name__} is already converted to LoRA-FA with other settings ({both}). A model is "
            "converted once: to train with the new settings, load a fresh model (or call merge_lorafa(model) to "
            "fold the adapter into its weights first); to continue the old adapter, pass its settings "
            f"(r={config.r}, alpha={config.alpha}, dropout={config.dropout})."
        )


def keep_dropout_seeds(model: nn.Module) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """Make every dropout of ``model`` that the library can reach keep a seed instead of a mask.

    ``nn.Dropout`` modules become ``RecomputedDropout`` (``replace_dropout``); transformers models on eager or
    SDPA attention switch to the attention that keeps a seed (``use_seeded_dropout_attention``).

    Returns ``(changed, kept_masks, own_attention)``: the dotted names changed; the dropouts that still keep a mask
    by name, with the reason: the attention of a model on transformers' attention interface that cannot switch
    (its attention function drops probabilities inline), and the inline ``torch.nn.functional.dropout`` and
    dropping ``scaled_dot_product_attention`` calls in the model's code (``inline_functional_dropouts``); and the
    models whose attention is their own code (DeBERTa-v2, BLOOM; Falcon before transformers 5.25), left as it is,
    by name with the reason (their attention dropout modules keep a seed like any other; their inline calls are in
    ``kept_masks``).
    """
    changed = replace_dropout(model)
    switched, kept = use_seeded_dropout_attention(model)
    modules = dict(model.named_modules())
    kept_masks, own_attention = {}, {}
    for name, reason in kept.items():
        pretrained = modules.get(name, model)  # a model kept by its class name is ``model`` itself
        if _compat.model_eager_attention(type(pretrained)) is None:
            own_attention[name] = reason
        else:
            kept_masks[f"{name} attention"] = reason
    return changed + switched, kept_masks | inline_functional_dropouts(model), own_attention


def attach_gradient_correction(
    optimizer: torch.optim.Optimizer, model: nn.Module, check_unused: bool = True
) -> RemovableHandle:
    """Correct the LoRA-FA B gradients of ``model`` that ``optimizer`` holds before each of its steps.

    Any ``torch.optim.Optimizer`` keeps its class, settings and LR schedulers; see
    ``GradientCorrection.attach`` for when the correction runs (after the closure, i.e. after gradient
    clipping). With ``check_unused``, its first step warns by name about adapters whose B got no gradient (they
    took no part in the forward). Returns the hook's handle (``handle.remove()`` detaches it).

    Raises:
        ValueError: ``model`` has no LoRA-FA layers, or ``optimizer`` is a ``LoraFAOptimizer`` (which corrects
            in its own ``step``: attaching would correct twice).
    """
    if isinstance(optimizer, LoraFAOptimizer):
        raise ValueError("A LoraFAOptimizer corrects B's gradient in its own step; attaching would correct twice.")
    layers = lora_layers_by_parameter(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA-FA layers: call prepare_model(model, ...) first.")
    names = lora_names_by_parameter(model) if check_unused else None
    return GradientCorrection(layers, names=names).attach(optimizer)
