"""Converting a model to LoRA-FA and preparing it for training, and back (merging).

``prepare_model(model, settings)`` is what the ``LoraFA`` callback runs on ``setup``, and what Lightning Fabric and
plain PyTorch users call themselves:

1. convert the target modules (``apply_lorafa``; a model converted already must have the same settings): each
   becomes its adapter (``lightning_lorafa.adapters``), chosen by what the module is (``model.select``);
2. make a quantized (bitsandbytes) base keep no inputs for backward;
3. choose the attention implementation;
4. make the model's dropouts keep a seed instead of a mask;
5. recompute what ``recompute`` asks for in backward;
6. compute a causal LM's training loss without its logits (``chunked_loss``: ``lightning_lorafa.model.chunked_loss``);
7. offload saved activations to CPU memory (``offload_activations``: ``lightning_lorafa.model.offload``).

Each step logs what it did, by name, and what it left out. Then build any optimizer over the trainable
parameters and call ``attach_gradient_correction(optimizer, model)`` (the callback does both for Lightning).
``merge_lorafa`` folds the adapters back into plain layers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_lorafa import _compat
from lightning_lorafa.adapters.find import lorafa_adapters, lorafa_experts, lorafa_layers, lorafa_modules
from lightning_lorafa.adapters.initialization import layer_seed
from lightning_lorafa.adapters.linear import is_quantized
from lightning_lorafa.adapters.multihead import LoraFAMultiheadAttention, allow_the_fast_path, keep_off_the_fast_path
from lightning_lorafa.adapters.router import LoraFARouter
from lightning_lorafa.model.attention import set_attention_implementation
from lightning_lorafa.model.chunked_loss import apply_chunked_loss, check_chunked_loss
from lightning_lorafa.model.dropouts import keep_dropout_seeds
from lightning_lorafa.model.merge import fold_on_save_pretrained, stop_folding_on_save_pretrained
from lightning_lorafa.model.offload import MIN_OFFLOAD_BYTES, disable_offload, enable_offload
from lightning_lorafa.model.quantization import keep_no_quantized_inputs
from lightning_lorafa.model.recompute import apply_recompute
from lightning_lorafa.model.select import (
    ModuleKinds,
    find_heads,
    find_target_modules,
    is_under,
    module_path,
    report_moe_parts_left_out,
    resolve_modules_to_save,
    vocabulary_rows,
    warn_of_frozen_parameters_of_wrappers,
)
from lightning_lorafa.settings import LoraFASettings, settings_with

log = logging.getLogger(__name__)


def apply_lorafa(model: nn.Module, settings: LoraFASettings | None = None, /, **overrides: Any) -> list[str]:
    """Replace the target ``nn.Linear`` layers of ``model`` (in place) by ``LoraFALinear`` layers, its fused MoE
    experts modules by ``LoraFAExperts`` (a frozen A_e and a trainable B_e per expert and projection) and its MoE
    routers by ``LoraFARouter`` (the branch on the router's logits).

    ``apply_lorafa(model, r=8, alpha=32, dropout=0.0, target_modules="all-linear", exclude=None,
    modules_to_save=None, seed=0, use_rslora=False, init_a="kaiming")``: the keyword arguments are the fields of
    ``LoraFASettings`` (``lightning_lorafa.settings``, with a help string each); a ``LoraFASettings`` (or a
    ``LoraFA`` callback) may be passed instead, and keywords override its fields.

    Routers beside adapted experts that get no adapter are logged by name and stay frozen; 3D parameters that look
    like fused experts of an architecture not recognised get a warning naming them.

    Every parameter is frozen except each layer's ``lora_B`` and the parameters of ``modules_to_save``, which
    train fully. ``modules_to_save=None`` (the default) trains the model's heads, found from its structure
    (``find_heads``: a transformers task head, the layers of a wrapper outside its pretrained models, the output
    linear of a plain torch model; never one tied to the input embeddings), and logs each with why; ``[]`` trains
    none. A of the layer called ``name`` is drawn from ``layer_seed(seed, name)`` as ``init_a`` says
    (``adapters.initialization``). The applied settings are stored as ``model.lorafa_config``, with the module names
    they resolved to. A model built on the meta device converts too: ``to_empty`` and each layer's
    ``reset_parameters()`` then give exactly the adapters of a model built on CPU.

    Returns:
        The converted module names.

    Raises:
        TypeError: an argument of the wrong type (named), an unknown keyword, or a target that is not an
            ``nn.Linear``.
        ValueError: an argument out of range (named), ``r`` larger than a target's ``min(d_in, d_out)``, no
            module matches, a ``modules_to_save`` entry matches nothing, or the model is already converted.

    Nothing is changed when an error is raised.
    """
    settings = settings_with(settings, overrides, "apply_lorafa")
    model = _compat.uncompiled(model)  # a torch.compile'd model: the model it compiled, converted in place
    r = settings.r
    existing = lorafa_modules(model)
    if existing:
        config = getattr(model, "lorafa_config", None)
        with_what = f" with r={config.r}, alpha={config.alpha}" if isinstance(config, LoraFASettings) else ""
        raise ValueError(
            f"{type(model).__name__} already has {len(existing)} LoRA-FA layers{with_what} (e.g. "
            f"{module_path(next(iter(existing)))}). Convert a fresh model, or call merge_lorafa(model) first to fold "
            "the adapters into plain linears."
        )
    if settings.modules_to_save is None:
        heads = find_heads(model)
        save_names = list(heads)
        for name, why in heads.items():
            log.info(
                "LoRA-FA: training %s fully and saving it with the adapter: %s (modules_to_save=[...] chooses "
                "otherwise).",
                name,
                why,
            )
    else:
        save_names = resolve_modules_to_save(model, settings.modules_to_save)
    target_modules = settings.target_modules
    kinds = ModuleKinds(model)
    found = find_target_modules(model, target_modules, settings.exclude, r, save_names, kinds)
    names = [name for name in found if not is_under(name, save_names)]
    if not names:
        raise ValueError(
            f"Every module matched by target_modules={target_modules!r} lies inside modules_to_save={save_names}."
        )
    modules = kinds.modules
    too_small = [
        f"{module_path(name)} ({' -> '.join(map(str, features))})"
        for name in names
        for features in kinds.features(name)
        if r > min(features)
    ]
    if too_small:
        raise ValueError(
            f"r={r} exceeds min(in_features, out_features) of: {', '.join(too_small)}. Choose a smaller r, or leave "
            "those layers out (exclude=[...])."
        )

    report_moe_parts_left_out(kinds, names, save_names)
    rows = vocabulary_rows(model, names)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        layer = kinds.adapter_class(name)(
            modules[name],
            r,
            settings.alpha,
            dropout=settings.dropout,
            use_rslora=settings.use_rslora,
            seed=layer_seed(settings.seed, name),
            init_a=settings.init_a,
        )
        setattr(parent, child, layer.train(modules[name].training))  # an eval model stays in eval mode

    for param_name, param in model.named_parameters():
        param.requires_grad_(is_under(param_name, save_names))
    for adapter in lorafa_adapters(model).values():
        adapter.lora_B.requires_grad_(True)
    warn_of_frozen_parameters_of_wrappers(model)
    keep_off_the_fast_path(model)
    fold_on_save_pretrained(model)
    config = LoraFASettings(**(settings.settings_kwargs() | {"target_modules": names, "exclude": None}))
    config.modules_to_save, config.vocabulary_rows = save_names, rows
    model.lorafa_config = config
    return names


def get_lorafa_config(model: nn.Module) -> LoraFASettings:
    """The settings ``apply_lorafa`` converted ``model`` with (``model.lorafa_config``), names resolved.

    Raises:
        ValueError: the model was not converted.
    """
    config = getattr(_compat.uncompiled(model), "lorafa_config", None)
    if not isinstance(config, LoraFASettings):
        raise ValueError(f"{type(model).__name__} has no LoRA-FA layers: call apply_lorafa(model, ...) first.")
    return config


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts. For LoRA-FA, trainable = r * sum(d_out) + modules_to_save."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def merge_lorafa(model: nn.Module) -> nn.Module:
    """Fold every LoRA-FA layer into its base linear and put the plain ``nn.Linear`` back in its place.

    Returns ``model`` (changed in place), ready for inference or export as a plain model.
    """
    compiled, model = model, _compat.uncompiled(model)
    modules = dict(model.named_modules())
    for name, layer in lorafa_modules(model).items():
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, layer.base)
    allow_the_fast_path(model)
    stop_folding_on_save_pretrained(model)
    if hasattr(model, "lorafa_config"):
        del model.lorafa_config
    return compiled


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
    chunked_loss: list[str] = field(default_factory=list)  # causal LMs whose training loss is chunked
    own_loss: dict[str, str] = field(default_factory=dict)  # causal LMs left with their own loss: name -> why
    offload: bool = False  # saved activations move to CPU memory during the model's forward
    adopted: bool = False  # the model was converted already (with the same settings)

    def summary(self, model: nn.Module) -> list[str]:
        """The log lines of this preparation."""
        config = get_lorafa_config(model)
        layers = lorafa_layers(model)
        experts = lorafa_experts(model)
        trainable, total = count_parameters(model)
        b_params = sum(adapter.lora_B.numel() for adapter in lorafa_adapters(model).values())
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
        lines += [
            f"LoRA-FA: {name} computes its training loss in chunks, without (tokens x vocabulary) logits "
            "(chunked_loss; outputs.logits holds none in training)."
            for name in self.chunked_loss
        ]
        lines += [
            f"LoRA-FA: {name} keeps its own loss and logits (chunked_loss): {why}."
            for name, why in self.own_loss.items()
        ]
        if self.offload:
            lines.append(
                f"LoRA-FA: the saved activations of {type(model).__name__}'s forward of at least "
                f"{MIN_OFFLOAD_BYTES >> 20} MiB on a GPU wait in CPU memory for backward (offload_activations)."
            )
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
    settings = settings_with(settings, overrides, "prepare_model")
    model = _compat.uncompiled(model)  # a torch.compile'd model: the model it compiled, prepared in place
    check_chunked_loss(model, settings.chunked_loss)
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
    done.chunked_loss, done.own_loss = apply_chunked_loss(model, settings.chunked_loss)
    if settings.offload_activations:  # after the chunked loss: its hooks run inside the offloaded forward
        done.offload = enable_offload(model) is not None
    else:
        disable_offload(model)
    return done


def check_same_settings(model: nn.Module, settings: LoraFASettings) -> None:
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
