"""Finding the linear layers of a model and replacing them by LoRA-FA layers (and back)."""

from __future__ import annotations

import logging
import re
import zlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from torch import nn

from lightning_lorafa.init import check_init_a
from lightning_lorafa.layer import LoraFALinear, check_lora_arguments, is_linear, linear_features

log = logging.getLogger(__name__)

#: Module names treated as output heads: "all-linear" leaves them alone (train them with ``modules_to_save``).
OUTPUT_HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "cls")

Targets = str | Iterable[str] | None


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

    ``"all-linear"`` selects every ``nn.Linear`` and transformers ``Conv1D`` (GPT-2's linears, weight stored
    (d_in, d_out)) except output heads (``lm_head``, ``classifier``, ``score``, ...) and, when ``r`` is given,
    gates narrower than ``r`` (e.g. Qwen2-MoE's ``shared_expert_gate``, hidden -> 1), which it logs by name;
    a string is a full-match regex over module names; a list holds names or dotted suffixes (``"q_proj"``).

    Raises:
        ValueError: nothing matches (the message lists the linear layers that exist).
        TypeError: a matched module is not an ``nn.Linear`` or ``Conv1D``.
    """
    linears = [name for name, module in model.named_modules() if is_linear(module)]
    if target_modules == "all-linear":
        heads = _output_head_names(model)
        selected = [name for name in linears if not _is_under(name, heads)]
        if r is not None:
            selected = _skip_narrow_layers(model, selected, r)
        candidates = dict.fromkeys(selected)
    else:
        candidates = {
            name: module for name, module in model.named_modules() if name and name_matches(name, target_modules)
        }
    names = [name for name in candidates if not (exclude is not None and name_matches(name, exclude))]
    if not names:
        shown = ", ".join(_shorten(linears)) or "none"
        raise ValueError(
            f"target_modules={target_modules!r} (exclude={exclude!r}) matches no module of "
            f"{type(model).__name__}. Its nn.Linear layers are: {shown}. Pass names or suffixes of those "
            "(e.g. ['query', 'value']), a regex, or 'all-linear'."
        )
    modules = dict(model.named_modules())
    wrong = [f"{name} ({type(modules[name]).__name__})" for name in names if not is_linear(modules[name])]
    if wrong:
        raise TypeError(
            f"LoRA-FA adapts nn.Linear layers only; target_modules={target_modules!r} matched: {', '.join(wrong)}. "
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
        d_in, d_out = linear_features(modules[name])
        narrow, wide = min(d_in, d_out), max(d_in, d_out)
        if narrow < r and 4 * narrow <= wide:
            log.info("LoRA-FA: all-linear leaves %s (%d -> %d) out: a gate narrower than r=%d.", name, d_in, d_out, r)
        else:
            kept.append(name)
    return kept


def _shorten(names: list[str], limit: int = 40) -> list[str]:
    """Distinct last name components first (what users pass as suffixes), then a sample of full names."""
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in names})
    return (
        [f"suffixes {suffixes}"] + names[:limit] + ([f"... ({len(names) - limit} more)"] if len(names) > limit else [])
    )


def layer_seed(seed: int, name: str) -> int:
    """Seed of the A matrix of the layer called ``name``: distinct per layer, reproducible from ``seed``."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63


def lorafa_layers(model: nn.Module) -> dict[str, LoraFALinear]:
    """The LoRA-FA layers of ``model`` by module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraFALinear)}


def apply_lorafa(
    model: nn.Module,
    r: int = 8,
    alpha: float = 32,
    dropout: float = 0.0,
    target_modules: Targets = "all-linear",
    exclude: Targets = None,
    modules_to_save: Iterable[str] | None = None,
    seed: int = 0,
    use_rslora: bool = False,
    init_a: str = "kaiming",
) -> list[str]:
    """Replace the target ``nn.Linear`` layers of ``model`` (in place) by ``LoraFALinear`` layers.

    Every parameter is frozen except each layer's ``lora_B`` and the parameters of ``modules_to_save``
    (names or suffixes, e.g. ``["classifier"]``), which train fully. A of the layer called ``name`` is
    drawn from ``layer_seed(seed, name)`` as ``init_a`` says (``"kaiming"`` or ``"orthogonal"``, see
    ``lightning_lorafa.init``). The applied settings are stored as ``model.lorafa_config``.

    Returns:
        The converted module names.

    Raises:
        ValueError: bad ``r``/``alpha``/``dropout``, ``r`` larger than a target's ``min(d_in, d_out)``,
            no module matches, a ``modules_to_save`` entry matches nothing, or the model is already converted.
        TypeError: a target is not an ``nn.Linear``.

    Nothing is changed when an error is raised.
    """
    check_lora_arguments(r, alpha, dropout)
    check_init_a(init_a)
    existing = lorafa_layers(model)
    if existing:
        raise ValueError(
            f"{type(model).__name__} already has {len(existing)} LoRA-FA layers (e.g. {next(iter(existing))}). "
            "Convert a fresh model, or call merge_lorafa(model) first to fold the adapters into plain linears."
        )
    save_names = _resolve_modules_to_save(model, modules_to_save)
    names = [name for name in find_target_modules(model, target_modules, exclude, r) if not _is_under(name, save_names)]
    if not names:
        raise ValueError(f"Every module matched by target_modules={target_modules!r} lies inside modules_to_save.")
    modules = dict(model.named_modules())
    too_small = [
        f"{name} ({' -> '.join(map(str, linear_features(modules[name])))})"
        for name in names
        if r > min(linear_features(modules[name]))
    ]
    if too_small:
        raise ValueError(
            f"r={r} exceeds min(in_features, out_features) of: {', '.join(too_small)}. Choose a smaller r."
        )

    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        layer = LoraFALinear(
            modules[name], r, alpha, dropout=dropout, use_rslora=use_rslora, seed=layer_seed(seed, name), init_a=init_a
        )
        setattr(parent, child, layer.train(modules[name].training))  # an eval model stays in eval mode

    for param_name, param in model.named_parameters():
        param.requires_grad_(param_name.endswith("lora_B") or _is_under(param_name, save_names))
    model.lorafa_config = LoraFAConfig(
        r=r,
        alpha=alpha,
        dropout=float(dropout),
        use_rslora=use_rslora,
        seed=seed,
        init_a=init_a,
        target_modules=names,
        modules_to_save=save_names,
    )
    return names


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
    for name, layer in lorafa_layers(model).items():
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, layer.base)
    if hasattr(model, "lorafa_config"):
        del model.lorafa_config
    return model
