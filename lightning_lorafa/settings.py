"""The settings of LoRA-FA training, once: a dataclass whose every field has a help string and a check.

- ``AdapterSettings``: what ``apply_lorafa`` needs to convert a model (rank, scale, targets, A's draw).
- ``LoraFASettings``: those, plus how ``prepare_model`` prepares the converted model (gradient correction,
  seed-kept dropout, attention implementation, recomputation).

The ``LoraFA`` callback is a ``LoraFASettings`` with a few callback-only fields, so its arguments (and the
``lorafa`` CLI's ``init_args``) are these fields; ``apply_lorafa(model, r=4, ...)`` takes the fields of
``AdapterSettings`` as keyword arguments. Every field is checked for type and range when the object is built,
and the error names the field, what it got and what it accepts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

Targets = str | list[str] | None
Recompute = Literal["none", "mlp", "block"]

INIT_A = ("kaiming", "orthogonal")
RECOMPUTE_MODES = ("none", "mlp", "block")
ATTN_IMPLEMENTATIONS = ("auto", "flash_attention_2", "sdpa", "eager")


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass(kw_only=True, eq=False)
class AdapterSettings:
    """How ``apply_lorafa`` converts a model. Each field's help is in ``dataclasses.fields(...)[i].metadata``."""

    r: int = _help("Rank of each adapter: A is (r, d_in), B is (d_out, r). A positive integer.", default=8)
    alpha: float = _help(
        "Scale numerator: the branch is scaled by alpha / r (alpha / sqrt(r) with use_rslora).", default=32
    )
    dropout: float = _help("Dropout on the adapter's input, in [0, 1). Keeps a seed, not a mask.", default=0.0)
    target_modules: Targets = _help(
        "Which layers get an adapter: 'all-linear' (every linear but output heads), a regex over module names "
        "(full match), or a list of module names or dotted suffixes (e.g. ['query', 'value']).",
        default="all-linear",
    )
    exclude: Targets = _help(
        "Layers to leave out of target_modules: a regex or a list of names/suffixes.", default=None
    )
    modules_to_save: list[str] | None = _help(
        "Modules trained fully and saved with the adapter (names or suffixes). None: the model's new task head "
        "(a classifier or score layer that is not tied to the embeddings), found from its structure; []: none.",
        default=None,
    )
    seed: int = _help("Seed of A's draws (each layer draws from seed and its own name).", default=0)
    use_rslora: bool = _help("Rank-stabilised scaling alpha / sqrt(r) instead of alpha / r.", default=False)
    init_a: str = _help("How the frozen A is drawn: 'kaiming' (PEFT's LoRA A) or 'orthogonal'.", default="kaiming")

    def __post_init__(self) -> None:
        self._check()

    def _check(self) -> None:
        name = type(self).__name__
        _check_int(name, "r", self.r, minimum=1)
        _check_number(name, "alpha", self.alpha)
        if not self.alpha > 0:
            raise ValueError(f"{name}(alpha={self.alpha!r}): alpha must be > 0 (the branch is scaled by alpha / r).")
        _check_number(name, "dropout", self.dropout)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{name}(dropout={self.dropout!r}): dropout must be in [0, 1).")
        self.target_modules = _check_targets(name, "target_modules", self.target_modules, allow_none=False)
        self.exclude = _check_targets(name, "exclude", self.exclude, allow_none=True)
        if self.modules_to_save is not None:
            self.modules_to_save = _check_names(name, "modules_to_save", self.modules_to_save)
        _check_int(name, "seed", self.seed, minimum=0)
        _check_bool(name, "use_rslora", self.use_rslora)
        _check_choice(name, "init_a", self.init_a, INIT_A)

    def adapter_kwargs(self) -> dict[str, Any]:
        """The fields of ``AdapterSettings`` as keyword arguments for ``apply_lorafa``."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(AdapterSettings)}

    def differences(self, other: AdapterSettings) -> dict[str, tuple[Any, Any]]:
        """``{field: (self's value, other's value)}`` for the ``AdapterSettings`` fields that differ."""
        mine, theirs = self.adapter_kwargs(), other.adapter_kwargs()
        return {key: (mine[key], theirs[key]) for key in mine if mine[key] != theirs[key]}


@dataclass(kw_only=True, eq=False)
class LoraFASettings(AdapterSettings):
    """``AdapterSettings`` plus how ``prepare_model`` prepares the converted model for training."""

    gradient_correction: bool = _help(
        "Correct B's gradient to g_B (A A^T)^-1 / s^2 before each optimizer step (the follow-up paper's closed "
        "form), whatever the optimizer.",
        default=True,
    )
    recompute_dropout: bool = _help(
        "Make the model's own dropouts (hidden, and attention probabilities where the attention can switch) keep a "
        "seed instead of a mask, as the adapters do.",
        default=True,
    )
    attn_implementation: str | None = _help(
        "'auto' (FlashAttention-2 where installed and supported, else SDPA, else eager), 'flash_attention_2', "
        "'sdpa', 'eager', or None to leave the model's attention alone.",
        default="auto",
    )
    recompute: Recompute = _help(
        "Activation recomputation: 'none', 'mlp' (each block's MLP keeps only its input and runs again in "
        "backward) or 'block' (whole transformer blocks are checkpointed).",
        default="none",
    )

    def _check(self) -> None:
        super()._check()
        name = type(self).__name__
        _check_bool(name, "gradient_correction", self.gradient_correction)
        _check_bool(name, "recompute_dropout", self.recompute_dropout)
        if self.attn_implementation is not None:
            _check_choice(name, "attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS, none=True)
        _check_choice(name, "recompute", self.recompute, RECOMPUTE_MODES)

    def settings_kwargs(self) -> dict[str, Any]:
        """The fields of ``LoraFASettings`` as keyword arguments."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(LoraFASettings)}


def adapter_settings(settings: AdapterSettings | None, overrides: dict[str, Any], caller: str) -> AdapterSettings:
    """``settings`` (default ``AdapterSettings()``) with ``overrides`` applied, checked.

    Raises:
        TypeError: an override that is not an ``AdapterSettings`` field (the message lists the fields).
    """
    known = [f.name for f in dataclasses.fields(AdapterSettings)]
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise TypeError(f"{caller}() got unexpected keyword arguments {unknown}; its settings are {known}.")
    base = settings.adapter_kwargs() if settings is not None else {}
    return AdapterSettings(**(base | overrides))


def _type_error(owner: str, field_name: str, value: Any, expected: str) -> TypeError:
    return TypeError(f"{owner}({field_name}={value!r}): {field_name} must be {expected}, got {type(value).__name__}.")


def _check_int(owner: str, field_name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error(owner, field_name, value, "an integer")
    if value < minimum:
        raise ValueError(f"{owner}({field_name}={value!r}): {field_name} must be >= {minimum}.")


def _check_number(owner: str, field_name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _type_error(owner, field_name, value, "a number")
    if not math.isfinite(value):
        raise ValueError(f"{owner}({field_name}={value!r}): {field_name} must be finite.")


def _check_bool(owner: str, field_name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise _type_error(owner, field_name, value, "True or False")


def _check_choice(owner: str, field_name: str, value: Any, choices: tuple[str, ...], none: bool = False) -> None:
    if value not in choices:
        accepted = list(choices) + ([None] if none else [])
        raise ValueError(f"{owner}({field_name}={value!r}): {field_name} must be one of {accepted}.")


def _check_names(owner: str, field_name: str, value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, Iterable) or not all(isinstance(item, str) and item for item in value):
        raise _type_error(owner, field_name, value, "a list of module names (non-empty strings)")
    return list(value)


def _check_targets(owner: str, field_name: str, value: Any, allow_none: bool) -> Targets:
    """A string (a regex, or 'all-linear'), a list of names (a tuple or set becomes a list), or None."""
    if value is None:
        if allow_none:
            return None
        raise ValueError(
            f"{owner}({field_name}=None): pass 'all-linear', a regex over module names, or a list of names/suffixes."
        )
    if isinstance(value, str):
        if not value:
            raise ValueError(f"{owner}({field_name}=''): an empty string matches nothing.")
        return value
    return _check_names(owner, field_name, value)
