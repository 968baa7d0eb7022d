"""Finding the linear layers of a model and replacing them by LoRA-FA layers (and back)."""

from __future__ import annotations

import logging
import re
import warnings
import zlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from lightning_lorafa.experts import (
    LoraFAExperts,
    expert_features,
    expert_projections,
    fused_expert_like_parameters,
    is_fused_experts,
)
from lightning_lorafa.layer import LoraFALinear, is_linear, linear_features
from lightning_lorafa.router import LoraFARouter, is_router
from lightning_lorafa.settings import AdapterSettings, Targets, adapter_settings

log = logging.getLogger(__name__)

#: Module names treated as output heads: "all-linear" leaves them alone (train them with ``modules_to_save``).
OUTPUT_HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "cls")
#: Names of the fresh task heads of transformers' task models (sequence/token classification, QA).
TASK_HEAD_NAMES = ("classifier", "score", "qa_outputs", "classification_head")


@dataclass
class LoraFAConfig:
    """What ``apply_lorafa`` did to a model; stored on it as ``model.lorafa_config``."""

    r: int
    alpha: float
    dropout: float = 0.0
    use_rslora: bool = False
    seed: int = 0
    init_a: str = "kaiming"  # how A was drawn (lightning_lorafa.init)
    target_modules: list[str] = field(default_factory=list)  # converted module names, in model order
    modules_to_save: list[str] = field(default_factory=list)  # fully trained module names

    def to_dict(self) -> dict:
        return asdict(self)

    def adapter_kwargs(self) -> dict:
        """``apply_lorafa`` keywords that convert a fresh model exactly like this one (its resolved layer names)."""
        fields = ("r", "alpha", "dropout", "target_modules", "modules_to_save", "seed", "use_rslora", "init_a")
        return {name: getattr(self, name) for name in fields}


def _as_patterns(spec: Targets) -> tuple[str | None, list[str]]:
    """Split a target spec into (regex, names). A string is a full-match regex; a list holds names/suffixes."""
    if spec is None:
        return None, []
    if isinstance(spec, str):
        return spec, []
    return None, list(spec)


def name_matches(name: str, spec: Targets) -> bool:
    """PEFT's matching rule: a string spec is a regex that must match the whole name; a list entry
    matches the name itself or any name ending in ``"." + entry``."""
    regex, names = _as_patterns(spec)
    if regex is not None:
        return re.fullmatch(regex, name) is not None
    return any(name == n or name.endswith("." + n) for n in names)


def _is_under(name: str, roots: Iterable[str]) -> bool:
    return any(name == root or name.startswith(root + ".") for root in roots)


def _output_head_names(model: nn.Module) -> set[str]:
    heads = {name for name, _ in model.named_modules() if name_matches(name, list(OUTPUT_HEAD_NAMES))}
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    output = get_output_embeddings() if callable(get_output_embeddings) else None
    if output is not None:
        heads |= {name for name, module in model.named_modules() if module is output}
    return heads


def find_target_modules(
    model: nn.Module, target_modules: Targets = "all-linear", exclude: Targets = None, r: int | None = None
) -> list[str]:
    """Names of the modules ``apply_lorafa`` would convert, in ``named_modules`` order.

    ``"all-linear"`` selects every ``nn.Linear``, transformers ``Conv1D`` (GPT-2's linears, weight stored
    (d_in, d_out)), fused MoE experts module (transformers' experts interface) and router beside one
    (``is_router``: Mixtral's, Qwen2-MoE's and Qwen3-MoE's ``mlp.gate``), except output heads
    (``lm_head``, ``classifier``, ``score``, ...) and, when ``r`` is given,
    gates narrower than ``r`` (e.g. Qwen2-MoE's ``shared_expert_gate``, hidden -> 1), which it logs by name;
    a string is a full-match regex over module names; a list holds names or dotted suffixes (``"q_proj"``).

    Raises:
        ValueError: nothing matches (the message lists the linear layers that exist).
        TypeError: a matched module is not an ``nn.Linear``, ``Conv1D``, fused experts module or router.
    """
    linears = [name for name, module in model.named_modules() if is_linear(module)]
    if target_modules == "all-linear":
        heads = _output_head_names(model)
        routers = set(moe_routers(model))
        adaptable = [name for name, module in model.named_modules() if _is_target(module) or name in routers]
        selected = [name for name in adaptable if not _is_under(name, heads)]
        if r is not None:
            selected = _skip_narrow_layers(model, selected, r)
        candidates = dict.fromkeys(selected)
    else:
        candidates = {
            name: module for name, module in model.named_modules() if name and name_matches(name, target_modules)
        }
    names = [name for name in candidates if not (exclude is not None and name_matches(name, exclude))]
    if not names:
        raise ValueError(_no_match_message(model, linears, target_modules, exclude))
    modules = dict(model.named_modules())
    wrong = [
        f"{_path(name)} ({type(modules[name]).__name__})" for name in names if _adapter_class(modules[name]) is None
    ]
    if wrong:
        raise TypeError(
            f"LoRA-FA adapts nn.Linear layers, transformers' Conv1D, fused MoE experts and MoE routers only; "
            f"target_modules={target_modules!r} matched: {', '.join(wrong)}. "
            "Narrow target_modules (a list of suffixes matches whole name components) or add them to exclude."
        )
    return names


def _skip_narrow_layers(model: nn.Module, names: list[str], r: int) -> list[str]:
    """``names`` without the gates and routers that a rank-``r`` branch does not fit, each logged with its shape:
    layers whose narrow side is below ``r`` and at most a quarter of the other (Qwen2-MoE's ``shared_expert_gate``,
    hidden -> 1; a router, hidden -> experts). "all-linear" adapts the rest instead of refusing the model; any other
    layer narrower than ``r`` (a k_proj at r above its width) is still refused by ``apply_lorafa``."""
    modules = dict(model.named_modules())
    kept = []
    for name in names:
        if is_fused_experts(modules[name]):
            kept.append(name)  # r is checked against each projection in apply_lorafa
            continue
        d_in, d_out = _target_features(modules[name])[0]
        narrow, wide = min(d_in, d_out), max(d_in, d_out)
        if narrow < r and 4 * narrow <= wide:
            log.info("LoRA-FA: all-linear leaves %s (%d -> %d) out: a gate narrower than r=%d.", name, d_in, d_out, r)
        else:
            kept.append(name)
    return kept


def _no_match_message(model: nn.Module, linears: list[str], target_modules: Targets, exclude: Targets) -> str:
    """Why nothing matched, with suggestions drawn from the model's own linear layers."""
    head = f"target_modules={target_modules!r} (exclude={exclude!r}) matches no module of {type(model).__name__}."
    if not linears:
        return f"{head} It has no nn.Linear layers, so there is nothing LoRA-FA can adapt."
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in linears})
    hint = ""
    if isinstance(target_modules, str) and target_modules != "all-linear":
        by_suffix = [name for name in linears if name_matches(name, [target_modules])]
        if by_suffix:
            hint = (
                f" A string is a regex that must match whole module names; {len(by_suffix)} layers end in "
                f"{target_modules!r}: to match them by suffix pass a list, target_modules=[{target_modules!r}]."
            )
    example = suffixes[:2] if len(suffixes) >= 2 else suffixes
    more = f" ... ({len(linears) - 40} more)" if len(linears) > 40 else ""
    shown = f"suffixes {suffixes}, " + ", ".join(_path(name) for name in linears[:40]) + more
    return (
        f"{head}{hint} Its nn.Linear layers are: {shown}. Pass names or suffixes of those (e.g. {example}), "
        "a regex, or 'all-linear'."
    )


def _path(name: str) -> str:
    """A module name as users read it: numbered children (``nn.Sequential``, ``nn.ModuleList``) as ``[i]``."""
    if not name:
        return "(the model itself)"
    parts = name.split(".")
    text = parts[0] if not parts[0].isdigit() else f"model[{parts[0]}]"
    for part in parts[1:]:
        text += f"[{part}]" if part.isdigit() else f".{part}"
    return text


def _is_target(module: nn.Module) -> bool:
    """Whether "all-linear" adapts ``module`` wherever it is: a linear (``nn.Linear``, ``Conv1D``) or a fused experts
    module (routers only beside experts: ``moe_routers``)."""
    return is_linear(module) or is_fused_experts(module)


def _adapter_class(module: nn.Module) -> type[LoraFALinear] | type[LoraFAExperts] | None:
    """The class that adapts ``module``, or None when LoRA-FA cannot adapt it."""
    if is_fused_experts(module):
        return LoraFAExperts
    if is_linear(module):
        return LoraFALinear
    return LoraFARouter if is_router(module) else None


def moe_routers(model: nn.Module) -> list[str]:
    """Names of the routers (``is_router``) that sit beside a fused experts module in its MoE block."""
    modules = dict(model.named_modules())
    found = []
    for name, module in modules.items():
        if not is_fused_experts(module):
            continue
        parent_name = name.rpartition(".")[0]
        for child_name, child in (modules[parent_name] if parent_name else model).named_children():
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if full != name and full not in found and is_router(child):
                found.append(full)
    return found


def _target_features(module: nn.Module) -> list[tuple[int, int]]:
    """``(d_in, d_out)`` of each projection an adapter is added to."""
    if is_fused_experts(module):
        return [expert_features(module, name) for name in expert_projections(module)]
    if is_linear(module):
        return [linear_features(module)]
    return [LoraFARouter.base_features(module)]


def _report_moe_parts_left_out(model: nn.Module, names: list[str], save_names: list[str]) -> None:
    """Log the weights beside the adapted experts that get no adapter (routers not among the targets, or that
    ``is_router`` does not accept; those in ``save_names`` train fully), and warn about 3D parameters that look like
    fused experts of an architecture this library does not recognise."""
    modules = dict(model.named_modules())
    routers = []
    for name in names:
        if not is_fused_experts(modules[name]):
            continue
        parent_name = name.rpartition(".")[0]
        parent = modules[parent_name] if parent_name else model
        for child_name, child in parent.named_children():
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if full in names or _is_target(child) or any(True for _ in child.children()) or full in save_names:
                continue
            if isinstance(getattr(child, "weight", None), nn.Parameter):
                routers.append(full)
    if routers:
        log.info(
            "LoRA-FA: the MoE routers %s get no adapter and stay frozen (not among the targets, or their forward does "
            "not compute F.linear(hidden, weight)); modules_to_save=[...] trains them fully.",
            ", ".join(routers),
        )
    unknown = fused_expert_like_parameters(model)
    if unknown:
        warnings.warn(
            f"LoRA-FA: {type(model).__name__} holds 3D parameters that look like fused MoE experts but are not "
            f"transformers' experts interface, so they get no adapter and stay frozen: {', '.join(unknown[:8])}"
            + (f" ... ({len(unknown) - 8} more)" if len(unknown) > 8 else "")
            + ". Adapt them with PEFT's target_parameters, or ask for the architecture to be supported.",
            stacklevel=3,
        )


def layer_seed(seed: int, name: str) -> int:
    """Seed of the A matrix of the layer called ``name``: distinct per layer, reproducible from ``seed``."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63


def lorafa_layers(model: nn.Module) -> dict[str, LoraFALinear]:
    """The LoRA-FA linear layers of ``model`` by module name, MoE routers (``LoraFARouter``) included (fused experts:
    ``lorafa_experts``)."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraFALinear)}


def lorafa_experts(model: nn.Module) -> dict[str, LoraFAExperts]:
    """The LoRA-FA fused experts modules of ``model`` by module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraFAExperts)}


def lorafa_modules(model: nn.Module) -> dict[str, LoraFALinear | LoraFAExperts]:
    """Every module of ``model`` with a LoRA-FA adapter (linear layers and fused experts), by name, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (LoraFALinear, LoraFAExperts))}


def apply_lorafa(model: nn.Module, settings: AdapterSettings | None = None, /, **overrides: Any) -> list[str]:
    """Replace the target ``nn.Linear`` layers of ``model`` (in place) by ``LoraFALinear`` layers, its fused MoE
    experts modules by ``LoraFAExperts`` (a frozen A_e and a trainable B_e per expert and projection) and its MoE
    routers by ``LoraFARouter`` (the branch on the router's logits).

    ``apply_lorafa(model, r=8, alpha=32, dropout=0.0, target_modules="all-linear", exclude=None,
    modules_to_save=None, seed=0, use_rslora=False, init_a="kaiming")``: the keyword arguments are the fields of
    ``AdapterSettings`` (``lightning_lorafa.settings``, with a help string each); an ``AdapterSettings`` (or a
    ``LoraFA`` callback) may be passed instead, and keywords override its fields.

    Routers beside adapted experts that get no adapter are logged by name and stay frozen; 3D parameters that look
    like fused experts of an architecture not recognised get a warning naming them.

    Every parameter is frozen except each layer's ``lora_B`` and the parameters of ``modules_to_save``, which
    train fully. ``modules_to_save=None`` (the default) trains the model's fresh task head, found from its
    structure (``find_task_heads``: a sequence/token-classification or QA head that ``all-linear`` leaves out and
    that is not tied to the input embeddings), and logs it; ``[]`` trains none. A of the layer called ``name`` is
    drawn from ``layer_seed(seed, name)`` as ``init_a`` says (``lightning_lorafa.init``). The applied settings are
    stored as ``model.lorafa_config``. A model built on the meta device converts too: ``to_empty`` and each
    layer's ``reset_parameters()`` then give exactly the adapters of a model built on CPU.

    Returns:
        The converted module names.

    Raises:
        TypeError: an argument of the wrong type (named), an unknown keyword, or a target that is not an
            ``nn.Linear``.
        ValueError: an argument out of range (named), ``r`` larger than a target's ``min(d_in, d_out)``, no
            module matches, a ``modules_to_save`` entry matches nothing, or the model is already converted.

    Nothing is changed when an error is raised.
    """
    settings = adapter_settings(settings, overrides, "apply_lorafa")
    r = settings.r
    existing = lorafa_modules(model)
    if existing:
        config = getattr(model, "lorafa_config", None)
        with_what = f" with r={config.r}, alpha={config.alpha}" if isinstance(config, LoraFAConfig) else ""
        raise ValueError(
            f"{type(model).__name__} already has {len(existing)} LoRA-FA layers{with_what} (e.g. "
            f"{_path(next(iter(existing)))}). Convert a fresh model, or call merge_lorafa(model) first to fold the "
            "adapters into plain linears."
        )
    if settings.modules_to_save is None:
        save_names = find_task_heads(model)
        if save_names:
            log.info(
                "LoRA-FA: training the task head %s fully (found from the model's structure; modules_to_save=[] "
                "freezes it).",
                ", ".join(save_names),
            )
    else:
        save_names = _resolve_modules_to_save(model, settings.modules_to_save)
    target_modules = settings.target_modules
    names = [n for n in find_target_modules(model, target_modules, settings.exclude, r) if not _is_under(n, save_names)]
    if not names:
        raise ValueError(
            f"Every module matched by target_modules={target_modules!r} lies inside modules_to_save={save_names}."
        )
    modules = dict(model.named_modules())
    too_small = [
        f"{_path(name)} ({' -> '.join(map(str, features))})"
        for name in names
        for features in _target_features(modules[name])
        if r > min(features)
    ]
    if too_small:
        raise ValueError(
            f"r={r} exceeds min(in_features, out_features) of: {', '.join(too_small)}. Choose a smaller r, or leave "
            "those layers out (exclude=[...])."
        )

    _report_moe_parts_left_out(model, names, save_names)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        layer = _adapter_class(modules[name])(
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
        param.requires_grad_(param_name.endswith("lora_B") or _is_under(param_name, save_names))
    model.lorafa_config = LoraFAConfig(
        r=r,
        alpha=settings.alpha,
        dropout=float(settings.dropout),
        use_rslora=settings.use_rslora,
        seed=settings.seed,
        init_a=settings.init_a,
        target_modules=names,
        modules_to_save=save_names,
    )
    return names


def find_task_heads(model: nn.Module) -> list[str]:
    """Names of the fresh task heads of ``model``: what ``modules_to_save=None`` trains fully.

    In a transformers task model (e.g. ``*ForSequenceClassification``, ``*ForTokenClassification``,
    ``*ForQuestionAnswering``), every child module with parameters beside the base model (``base_model_prefix``)
    that neither is nor holds the output embeddings (a language-model head, pretrained and usually tied to the
    input embeddings) nor shares a weight with the input embeddings. Elsewhere (a plain torch model, a model
    whose base is itself), modules called ``classifier``, ``score``, ``qa_outputs`` or ``classification_head``,
    under the same two conditions. An empty list when there is none (a causal or masked LM, a seq2seq LM).
    """
    tied = _embedding_storages(model)
    output = _output_embeddings(model)
    heads: list[str] = []
    for prefix, pretrained in _outermost_pretrained_models(model):
        base = getattr(pretrained, "base_model", pretrained)
        if base is pretrained:
            continue
        for child_name, child in pretrained.named_children():
            if child is base or not any(True for _ in child.parameters()):
                continue
            if _holds(child, output) or _shares_storage(child, tied):
                continue
            heads.append(f"{prefix}{child_name}")
    if heads:
        return heads
    for name, module in model.named_modules():
        if name and name.rsplit(".", 1)[-1] in TASK_HEAD_NAMES and not _is_under(name, heads):
            if not (_holds(module, output) or _shares_storage(module, tied)):
                heads.append(name)
    return heads


def _outermost_pretrained_models(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(prefix, model)`` for each outermost transformers model (a module with ``base_model_prefix``)."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if any(outer == "" or name.startswith(outer) for outer, _ in found):
            continue
        if isinstance(getattr(type(module), "base_model_prefix", None), str) and hasattr(module, "base_model"):
            found.append((f"{name}." if name else "", module))
    return found


def _transformers_getter(model: nn.Module, getter: str) -> list[nn.Module]:
    """What ``getter`` (``get_input_embeddings``/``get_output_embeddings``) returns for each transformers model
    inside ``model``, where it returns a module."""
    found = []
    for module in model.modules():
        get = getattr(module, getter, None)
        if callable(get) and hasattr(module, "base_model_prefix"):
            try:
                result = get()
            except (AttributeError, NotImplementedError):
                result = None
            if isinstance(result, nn.Module):
                found.append(result)
    return found


def _output_embeddings(model: nn.Module) -> list[nn.Module]:
    return _transformers_getter(model, "get_output_embeddings")


def _embedding_storages(model: nn.Module) -> set[int]:
    """Storages (ids on the meta device) of the input embeddings' weights: a head sharing one is tied."""
    storages = set()
    for embeddings in _transformers_getter(model, "get_input_embeddings"):
        weight = getattr(embeddings, "weight", None)
        if weight is not None:
            storages.add(id(weight) if weight.device.type == "meta" else weight.untyped_storage().data_ptr())
    return storages


def _holds(module: nn.Module, outputs: list[nn.Module]) -> bool:
    return any(output is inner for inner in module.modules() for output in outputs)


def _shares_storage(module: nn.Module, storages: set[int]) -> bool:
    for p in module.parameters():
        key = id(p) if p.device.type == "meta" else p.untyped_storage().data_ptr()
        if key in storages:
            return True
    return False


def get_lorafa_config(model: nn.Module) -> LoraFAConfig:
    """The ``LoraFAConfig`` that ``apply_lorafa`` stored on ``model``.

    Raises:
        ValueError: the model was not converted.
    """
    config = getattr(model, "lorafa_config", None)
    if not isinstance(config, LoraFAConfig):
        raise ValueError(f"{type(model).__name__} has no LoRA-FA layers: call apply_lorafa(model, ...) first.")
    return config


def _resolve_modules_to_save(model: nn.Module, modules_to_save: Iterable[str] | None) -> list[str]:
    if not modules_to_save:
        return []
    if isinstance(modules_to_save, str):
        modules_to_save = [modules_to_save]
    resolved, missing = [], []
    for entry in modules_to_save:
        found = [name for name, _ in model.named_modules() if name and name_matches(name, [entry])]
        # Keep the outermost match only: "classifier" should not also list "classifier.dense".
        found = [name for name in found if not _is_under(name.rpartition(".")[0], found)]
        if found:
            resolved.extend(found)
        else:
            missing.append(entry)
    if missing:
        top = [name for name, _ in model.named_children()]
        raise ValueError(
            f"modules_to_save entries {missing} match no module of {type(model).__name__} "
            f"(its top-level modules are {top}). Pass module names or suffixes, e.g. ['classifier']."
        )
    return list(dict.fromkeys(resolved))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts. For LoRA-FA, trainable = r * sum(d_out) + modules_to_save."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def merge_lorafa(model: nn.Module) -> nn.Module:
    """Fold every LoRA-FA layer into its base linear and put the plain ``nn.Linear`` back in its place.

    Returns ``model`` (changed in place), ready for inference or export as a plain model.
    """
    modules = dict(model.named_modules())
    for name, layer in lorafa_modules(model).items():
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, layer.base)
    if hasattr(model, "lorafa_config"):
        del model.lorafa_config
    return model
