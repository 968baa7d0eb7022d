"""Which modules of a model LoRA-FA adapts, trains fully, or leaves alone: decided here, once per conversion.

- ``ModuleKinds``: what each module is (a linear layer, fused MoE experts, an ``nn.MultiheadAttention``, a MoE router,
  or nothing to adapt), found once per module and kept for the conversion;
- ``find_target_modules``: the modules a target spec selects (``"all-linear"``, a regex, names or suffixes);
- ``find_heads``: the heads trained fully by default (a transformers task head, a wrapper's own layers beside its
  pretrained model, a plain torch model's output layer);
- ``vocabulary_rows``: the token embeddings and the rows of the pretrained vocabulary (resized ones travel with the
  adapter);
- ``pretrained_models``: the outermost transformers models inside a model.

What is left out is said by name: in the library's log, or as a warning where it changes what trains.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Collection, Iterable

from torch import nn

from lightning_lorafa.adapters.experts import (
    LoraFAExperts,
    expert_features,
    expert_projections,
    fused_expert_like_parameters,
    is_fused_experts,
)
from lightning_lorafa.adapters.linear import LoraFALinear, is_linear, linear_features
from lightning_lorafa.adapters.multihead import LoraFAMultiheadAttention, unsupported_reason
from lightning_lorafa.adapters.router import LoraFARouter, is_router
from lightning_lorafa.settings import Targets

log = logging.getLogger(__name__)

LINEAR, EXPERTS, ROUTER, ATTENTION = "linear", "experts", "router", "attention"
#: The adapter class of each kind of module.
ADAPTER_CLASSES = {
    LINEAR: LoraFALinear,
    EXPERTS: LoraFAExperts,
    ROUTER: LoraFARouter,
    ATTENTION: LoraFAMultiheadAttention,
}


class ModuleKinds:
    """What each module of a model is for LoRA-FA (``LINEAR``, ``EXPERTS``, ``ROUTER``, ``ATTENTION``, or None),
    decided once per module: ``is_router`` runs a candidate router on a probe token, so it is asked once.

    ``modules``: the model's modules by name, as ``named_modules`` lists them.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modules = dict(model.named_modules())
        self._kinds: dict[str, str | None] = {}

    def kind(self, name: str) -> str | None:
        """The kind of module ``name`` (None: nothing LoRA-FA adapts, or an ``nn.MultiheadAttention`` it cannot)."""
        if name not in self._kinds:
            module = self.modules[name]
            if is_fused_experts(module):
                kind = EXPERTS
            elif isinstance(module, nn.MultiheadAttention):
                kind = ATTENTION if unsupported_reason(module) is None else None
            elif is_linear(module):
                kind = LINEAR
            else:
                kind = ROUTER if is_router(module) else None
            self._kinds[name] = kind
        return self._kinds[name]

    def adapter_class(self, name: str) -> type[nn.Module] | None:
        """The class that adapts module ``name``, or None when LoRA-FA cannot adapt it."""
        kind = self.kind(name)
        return None if kind is None else ADAPTER_CLASSES[kind]

    def features(self, name: str) -> list[tuple[int, int]]:
        """``(d_in, d_out)`` of each projection an adapter of module ``name`` adds to."""
        module, kind = self.modules[name], self.kind(name)
        if kind == EXPERTS:
            return [expert_features(module, projection) for projection in expert_projections(module)]
        if kind == ATTENTION:
            return [LoraFAMultiheadAttention.base_features(module), linear_features(module.out_proj)]
        if kind == LINEAR:
            return [linear_features(module)]
        return [LoraFARouter.base_features(module)]


#: Module names treated as output heads: "all-linear" leaves them alone (train them with ``modules_to_save``).
OUTPUT_HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "cls")


#: Names of the fresh task heads of transformers' task models (sequence/token classification, QA).
TASK_HEAD_NAMES = ("classifier", "score", "qa_outputs", "classification_head")


def _as_patterns(spec: Targets) -> tuple[str | None, list[str]]:
    """Split a target spec into (regex, names). A string is a full-match regex; a list holds names/suffixes."""
    if spec is None:
        return None, []
    if isinstance(spec, str):
        return spec, []
    return None, list(spec)


def name_matches(name: str, spec: Targets, names: Collection[str] = ()) -> bool:
    """PEFT's matching rule: a string spec is a regex that must match the whole name; a list entry matches the name
    itself or any name ending in ``"." + entry`` -- except that an entry which is the full name of one of the
    model's modules (``names``) matches that module only (``["decoder"]`` is the top-level ``decoder``, not also
    ``transformer.decoder``; what ``apply_lorafa`` stores are full names)."""
    regex, entries = _as_patterns(spec)
    if regex is not None:
        return re.fullmatch(regex, name) is not None
    return any(name == n or (n not in names and name.endswith("." + n)) for n in entries)


def is_under(name: str, roots: Iterable[str]) -> bool:
    return any(name == root or name.startswith(root + ".") for root in roots)


def _output_head_names(model: nn.Module) -> set[str]:
    """Modules named like output heads, and the output embeddings: what "all-linear" leaves alone."""
    heads = {name for name, _ in model.named_modules() if name_matches(name, list(OUTPUT_HEAD_NAMES))}
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    output = get_output_embeddings() if callable(get_output_embeddings) else None
    if output is not None:
        heads |= {name for name, module in model.named_modules() if module is output}
    return heads


def find_target_modules(
    model: nn.Module,
    target_modules: Targets = "all-linear",
    exclude: Targets = None,
    r: int | None = None,
    modules_to_save: list[str] | None = None,
    kinds: ModuleKinds | None = None,
) -> list[str]:
    """Names of the modules ``apply_lorafa`` would convert, in ``named_modules`` order.

    ``"all-linear"`` selects every ``nn.Linear``, transformers ``Conv1D`` (GPT-2's linears, weight stored
    (d_in, d_out)), ``nn.MultiheadAttention`` (its packed q, k, v and its out_proj), fused MoE experts module
    (transformers' experts interface) and router beside one (``is_router``: Mixtral's, Qwen2-MoE's and Qwen3-MoE's
    ``mlp.gate``), except output heads (``lm_head``, ``classifier``, ``score``, ..., the output embeddings), the
    modules trained fully (``modules_to_save``; None: the heads ``find_heads`` finds) and, when ``r`` is given,
    gates narrower than ``r`` (e.g. Qwen2-MoE's ``shared_expert_gate``, hidden -> 1), which it logs by name;
    a string is a full-match regex over module names; a list holds names or dotted suffixes (``"q_proj"``).

    Raises:
        ValueError: nothing matches (the message lists the linear layers that exist), or the targets name the
            ``out_proj`` of an ``nn.MultiheadAttention`` without the module.
        TypeError: a matched module is none of those LoRA-FA adapts (named, with why).
    """
    kinds = kinds or ModuleKinds(model)
    modules = kinds.modules
    linears = [name for name, module in modules.items() if is_linear(module)]
    attentions = {name for name, module in modules.items() if isinstance(module, nn.MultiheadAttention)}
    if target_modules == "all-linear":
        trained = find_heads(model) if modules_to_save is None else modules_to_save
        heads = _output_head_names(model) | set(trained)
        routers = set(moe_routers(kinds))
        adaptable = [
            name
            for name, module in modules.items()
            if name in attentions or name in routers or is_linear(module) or is_fused_experts(module)
        ]
        selected = [name for name in adaptable if not is_under(name, heads)]
        selected = _through_attention_modules(modules, selected, attentions, explicit=False)
        if r is not None:
            selected = _skip_narrow_layers(kinds, selected, r)
        candidates = dict.fromkeys(selected)
    else:
        matched = [name for name in modules if name and name_matches(name, target_modules, modules)]
        candidates = dict.fromkeys(_through_attention_modules(modules, matched, attentions, explicit=True))
    names = [name for name in candidates if not (exclude is not None and name_matches(name, exclude, modules))]
    if not names:
        raise ValueError(_no_match_message(model, linears, target_modules, exclude))
    wrong = [
        f"{module_path(name)} ({type(modules[name]).__name__}"
        + (f": {unsupported_reason(modules[name])})" if name in attentions else ")")
        for name in names
        if kinds.adapter_class(name) is None
    ]
    if wrong:
        raise TypeError(
            f"LoRA-FA adapts nn.Linear layers, transformers' Conv1D, nn.MultiheadAttention (packed q, k, v), fused MoE "
            "experts and MoE routers only; "
            f"target_modules={target_modules!r} matched: {', '.join(wrong)}. "
            "Narrow target_modules (a list of suffixes matches whole name components) or add them to exclude."
        )
    return names


def _through_attention_modules(
    modules: dict[str, nn.Module], names: list[str], attentions: set[str], explicit: bool
) -> list[str]:
    """``names`` with ``nn.MultiheadAttention`` handled as a whole: its ``out_proj`` is adapted with the module (its
    forward reads ``out_proj.weight`` directly, so an adapter on ``out_proj`` alone would never run), and a module
    ``LoraFAMultiheadAttention`` cannot adapt is left out with its ``out_proj``, with a warning naming it.

    Raises:
        ValueError: ``explicit`` targets name an ``out_proj`` without its attention module.
    """
    unsupported = {name: unsupported_reason(modules[name]) for name in attentions}
    unsupported = {name: why for name, why in unsupported.items() if why is not None}
    kept = []
    for name in names:
        parent = name.rpartition(".")[0]
        if parent in attentions and name == f"{parent}.out_proj":
            if explicit and parent not in names:
                raise ValueError(
                    f"target_modules selects {module_path(name)}, the out_proj of nn.MultiheadAttention "
                    f"{module_path(parent)}, whose forward reads out_proj.weight directly, so an adapter there "
                    f"would never run. Target the attention module itself ({parent.rsplit('.', 1)[-1]!r}): "
                    "LoRA-FA then adapts its q, k, v and out_proj, as PEFT does."
                )
            continue
        if name in unsupported and not explicit:
            continue
        kept.append(name)
    left_out = [name for name in unsupported if name in names or f"{name}.out_proj" in names]
    if left_out and not explicit:
        warnings.warn(
            "LoRA-FA: all-linear leaves out these nn.MultiheadAttention modules (q, k, v and out_proj stay frozen): "
            + "; ".join(f"{module_path(name)}: {unsupported[name]}" for name in left_out),
            stacklevel=4,
        )
    return kept


def _skip_narrow_layers(kinds: ModuleKinds, names: list[str], r: int) -> list[str]:
    """``names`` without the gates and routers that a rank-``r`` branch does not fit, each logged with its shape:
    layers whose narrow side is below ``r`` and at most a quarter of the other (Qwen2-MoE's ``shared_expert_gate``,
    hidden -> 1; a router, hidden -> experts). "all-linear" adapts the rest instead of refusing the model; any other
    layer narrower than ``r`` (a k_proj at r above its width) is still refused by ``apply_lorafa``."""
    kept = []
    for name in names:
        if kinds.kind(name) == EXPERTS:
            kept.append(name)  # r is checked against each projection in apply_lorafa
            continue
        d_in, d_out = kinds.features(name)[0]
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
    shown = f"suffixes {suffixes}, " + ", ".join(module_path(name) for name in linears[:40]) + more
    return (
        f"{head}{hint} Its nn.Linear layers are: {shown}. Pass names or suffixes of those (e.g. {example}), "
        "a regex, or 'all-linear'."
    )


def module_path(name: str) -> str:
    """A module name as users read it: numbered children (``nn.Sequential``, ``nn.ModuleList``) as ``[i]``."""
    if not name:
        return "(the model itself)"
    parts = name.split(".")
    text = parts[0] if not parts[0].isdigit() else f"model[{parts[0]}]"
    for part in parts[1:]:
        text += f"[{part}]" if part.isdigit() else f".{part}"
    return text


def moe_routers(kinds: ModuleKinds) -> list[str]:
    """Names of the routers (``is_router``) that sit beside a fused experts module in its MoE block."""
    modules = kinds.modules
    found = []
    for name, module in modules.items():
        if not name or not is_fused_experts(module):
            continue
        parent_name = name.rpartition(".")[0]
        for child_name, _ in modules[parent_name].named_children():
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if full != name and full not in found and kinds.kind(full) == ROUTER:
                found.append(full)
    return found


def report_moe_parts_left_out(kinds: ModuleKinds, names: list[str], save_names: list[str]) -> None:
    """Log the weights beside the adapted experts that get no adapter (routers not among the targets, or that
    ``is_router`` does not accept; those in ``save_names`` train fully), and warn about 3D parameters that look like
    fused experts of an architecture this library does not recognise."""
    modules, model = kinds.modules, kinds.model
    routers = []
    for name in names:
        if kinds.kind(name) != EXPERTS:
            continue
        parent_name = name.rpartition(".")[0]
        for child_name, child in modules[parent_name].named_children():
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            adaptable = is_linear(child) or is_fused_experts(child)
            if full in names or adaptable or any(True for _ in child.children()) or full in save_names:
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


def find_task_heads(model: nn.Module) -> list[str]:
    """Names of the modules ``modules_to_save=None`` trains fully: the model's heads (``find_heads``)."""
    return list(find_heads(model))


def find_heads(model: nn.Module) -> dict[str, str]:
    """The modules of ``model`` that are new or produce its output, by name, each with why it is one.

    What ``modules_to_save=None`` trains fully (and saves with the adapter), and what ``"all-linear"`` never adapts:

    - in a transformers task model (``*ForSequenceClassification``, ``*ForTokenClassification``,
      ``*ForQuestionAnswering``), every child with parameters beside the base model (``base_model_prefix``): its
      fresh task head;
    - in a module that holds pretrained transformers models (a user's wrapper ``self.backbone = AutoModel...;
      self.linear = nn.Linear(hidden, num_labels)``), every module with parameters outside them: the user's own
      layers, built fresh (``linear``, ``fc``, ``decoder``, ``head``, ...);
    - in a model with no transformers model inside (``torch.nn`` modules only), its output layer: the linear
      reached by following the last child with parameters from the top (a Lightning demo Transformer's
      ``decoder``, an ``nn.Sequential``'s last linear), and modules called ``classifier``, ``score``,
      ``qa_outputs`` or ``classification_head``.

    A module that is or holds the output embeddings (a language-model head, pretrained) or shares a weight with the
    input embeddings (tied) is never one. An empty dict when there is none (a causal or masked LM, a seq2seq LM).
    """
    tied = _embedding_storages(model)
    output = _output_embeddings(model)

    def pretrained_or_tied(module: nn.Module) -> bool:
        return _holds(module, output) or _shares_storage(module, tied)

    heads: dict[str, str] = {}
    pretrained_models = _pretrained_models_with_prefix(model)
    for prefix, pretrained in pretrained_models:
        base = getattr(pretrained, "base_model", pretrained)
        if base is pretrained:
            continue
        for child_name, child in pretrained.named_children():
            if child is base or not any(True for _ in child.parameters()) or pretrained_or_tied(child):
                continue
            heads[f"{prefix}{child_name}"] = f"the task head of {type(pretrained).__name__}"
    if pretrained_models:
        roots = {prefix.rstrip("."): type(pretrained).__name__ for prefix, pretrained in pretrained_models}
        if "" not in roots:
            pretrained_names = ", ".join(f"{root} ({kind})" for root, kind in roots.items())
            modules = dict(model.named_modules())
            for name in _modules_outside(model, list(roots)):
                if not pretrained_or_tied(modules[name]):
                    heads[name] = f"a new layer of {type(model).__name__}, beside its pretrained {pretrained_names}"
        return heads
    modules = dict(model.named_modules())
    output_layer = _output_layer(model)
    if output_layer is not None and not pretrained_or_tied(modules[output_layer]):
        heads[output_layer] = f"the output layer of {type(model).__name__}"
    for name, module in modules.items():
        if name and name.rsplit(".", 1)[-1] in TASK_HEAD_NAMES and not is_under(name, heads):
            if not pretrained_or_tied(module):
                heads[name] = f"named like a task head ({name.rsplit('.', 1)[-1]})"
    return heads


def warn_of_frozen_parameters_of_wrappers(model: nn.Module) -> None:
    """Warn by name about parameters held directly by the modules around the pretrained models of ``model`` (a
    wrapper's own ``nn.Parameter``, a logit scale, say): they are new, not in any module ``modules_to_save`` can
    name, and stay frozen."""
    roots = [prefix.rstrip(".") for prefix, _ in _pretrained_models_with_prefix(model)]
    if not roots or "" in roots:
        return
    around = {""} | {root.rsplit(".", depth)[0] for root in roots for depth in range(1, root.count(".") + 1)}
    modules = dict(model.named_modules())
    loose = [
        f"{owner}.{name}" if owner else name
        for owner in sorted(around)
        for name, _ in modules[owner].named_parameters(recurse=False)
    ]
    if loose:
        warnings.warn(
            f"LoRA-FA: {', '.join(loose[:8])} are parameters of {type(model).__name__} itself, outside its pretrained "
            "model and outside any module modules_to_save could name, so they stay frozen. Keep them in a module of "
            "their own (an nn.Module attribute) to have them trained as a head.",
            stacklevel=3,
        )


def _modules_outside(model: nn.Module, roots: list[str]) -> list[str]:
    """The outermost modules with parameters of ``model`` that neither are nor hold one of the modules ``roots``."""
    found = []

    def visit(module: nn.Module, prefix: str) -> None:
        for child_name, child in module.named_children():
            name = f"{prefix}{child_name}"
            if name in roots:
                continue
            if any(is_under(root, [name]) for root in roots):
                visit(child, name + ".")
            elif any(True for _ in child.parameters()):
                found.append(name)

    visit(model, "")
    return found


def _output_layer(model: nn.Module) -> str | None:
    """The linear that produces ``model``'s output, by structure: from the top, follow the last child (in the
    order the model registered them) that has parameters, down to a module without children; its name when it is a
    linear (``nn.Linear``, ``Conv1D``), else None. None as well when a module on the way holds parameters of its own
    beside its children (its forward may use them last)."""
    name, module = "", model
    while True:
        if any(True for _ in module.parameters(recurse=False)) and any(True for _ in module.children()):
            return None
        children = [
            (child_name, child)
            for child_name, child in module.named_children()
            if any(True for _ in child.parameters())
        ]
        if not children:
            return name if name and is_linear(module) else None
        child_name, module = children[-1]
        name = f"{name}.{child_name}" if name else child_name


def pretrained_models(model: nn.Module) -> dict[str, nn.Module]:
    """The outermost transformers models (``PreTrainedModel``) in ``model``, by name (``""``: ``model`` itself)."""
    from transformers import PreTrainedModel

    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, PreTrainedModel) and not any(outer == "" or is_under(name, [outer]) for outer in found):
            found[name] = module
    return found


def _pretrained_models_with_prefix(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(prefix, model)`` for each outermost transformers model: its name with a dot, or ``""`` for ``model``."""
    return [(f"{name}." if name else "", module) for name, module in pretrained_models(model).items()]


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


def vocabulary_rows(model: nn.Module, adapted: Iterable[str] = ()) -> dict[str, int]:
    """The token embedding weights of the transformers models in ``model`` (input embeddings, and output embeddings
    that are not among the ``adapted`` modules), each with the rows of the pretrained checkpoint: the ``vocab_size``
    of the config the model was loaded from (read from the local files only), or, when that cannot be read (a model
    built from a config), the rows it has now. A weight that later has another number of rows was resized
    (``resize_token_embeddings``, before or after conversion)."""
    names = {id(module): name for name, module in model.named_modules()}
    rows: dict[str, int] = {}
    for _, pretrained in _pretrained_models_with_prefix(model):
        pretrained_rows = _checkpoint_vocab_size(pretrained)
        for getter in ("get_input_embeddings", "get_output_embeddings"):
            try:
                module = getattr(pretrained, getter)()
            except (AttributeError, NotImplementedError):
                module = None
            weight = getattr(module, "weight", None)
            name = names.get(id(module))
            if name is None or name in adapted or not isinstance(weight, nn.Parameter) or weight.ndim != 2:
                continue
            rows[f"{name}.weight"] = pretrained_rows or weight.shape[0]
    return rows


def _checkpoint_vocab_size(pretrained: nn.Module) -> int | None:
    """``vocab_size`` of the config ``pretrained`` was loaded from (``config.name_or_path``), from local files only;
    None when it was not loaded from a checkpoint or its config cannot be read."""
    source = getattr(getattr(pretrained, "config", None), "name_or_path", "")
    if not source:
        return None
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError):
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    size = getattr(text, "vocab_size", None)
    return size if isinstance(size, int) else None


def resolve_modules_to_save(model: nn.Module, modules_to_save: Iterable[str] | None) -> list[str]:
    if not modules_to_save:
        return []
    if isinstance(modules_to_save, str):
        modules_to_save = [modules_to_save]
    resolved, missing = [], []
    names = {name: None for name, _ in model.named_modules() if name}
    for entry in modules_to_save:
        found = [name for name in names if name_matches(name, [entry], names)]
        # Keep the outermost match only: "classifier" should not also list "classifier.dense".
        found = [name for name in found if not is_under(name.rpartition(".")[0], found)]
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
