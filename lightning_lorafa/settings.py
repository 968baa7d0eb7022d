"""The settings of LoRA-FA training, once: one dataclass whose every field has a help string and a check.

``LoraFASettings`` holds how a model is converted (rank, scale, targets, A's draw) and how it is prepared for
training (gradient correction, seed-kept dropout, attention implementation, recomputation). The ``LoraFA`` callback
is one (with a few callback-only fields), so its arguments, and the ``lorafa`` CLI's ``init_args``, are these fields;
``prepare_model(model, r=4, ...)`` and ``apply_lorafa(model, r=4, ...)`` take them as keyword arguments. Every field
is checked for type and range when the object is built, and the error names the field, what it got and what it
accepts; the adapters check their own arguments with the same functions (``check_adapter_arguments``).

A converted model keeps the settings it was converted with as ``model.lorafa_config``, with ``target_modules`` and
``modules_to_save`` resolved to the module names they selected; checkpoints store them as a dict (``to_dict``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Targets = str | list[str] | None
Recompute = Literal["none", "mlp", "block"]

INIT_A = ("kaiming", "orthogonal")
RECOMPUTE_MODES = ("none", "mlp", "block")
ATTN_IMPLEMENTATIONS = ("auto", "flash_attention_2", "sdpa", "eager")
CHUNKED_LOSS = ("auto", True, False)
#: The fields that decide the adapters' tensors: what a converted model, an adapter file and a checkpoint share.
ADAPTER_FIELDS = (
    "r",
    "alpha",
    "dropout",
    "target_modules",
    "exclude",
    "modules_to_save",
    "seed",
    "use_rslora",
    "init_a",
)


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass(kw_only=True)
class LoraFASettings:
    """How to convert a model to LoRA-FA and prepare it for training. Each field's help is in
    ``dataclasses.fields(LoraFASettings)[i].metadata["help"]``.

    Raises ``TypeError``/``ValueError`` naming the field, when built with a value of the wrong type or range.
    """

    r: int = _help("Rank of each adapter: A is (r, d_in), B is (d_out, r). A positive integer.", default=8)
    alpha: float = _help(
        "Scale numerator: the branch is scaled by alpha / r (alpha / sqrt(r) with use_rslora).", default=32
    )
    dropout: float = _help("Dropout on the adapter's input, in [0, 1). Keeps a seed, not a mask.", default=0.0)
    target_modules: Targets = _help(
        "Which layers get an adapter: 'all-linear' (every linear but heads), a regex over module names "
        "(full match), or a list of module names or dotted suffixes (e.g. ['query', 'value']).",
        default="all-linear",
    )
    exclude: Targets = _help(
        "Layers to leave out of target_modules: a regex or a list of names/suffixes.", default=None
    )
    modules_to_save: list[str] | None = _help(
        "Modules trained fully and saved with the adapter (names or suffixes). None: the model's heads, found from its "
        "structure (a transformers task head, a wrapper's own layers beside its pretrained model, a plain torch "
        "model's output layer; never one tied to the embeddings); []: none.",
        default=None,
    )
    seed: int = _help("Seed of A's draws (each layer draws from seed and its own name).", default=0)
    use_rslora: bool = _help("Rank-stabilised scaling alpha / sqrt(r) instead of alpha / r.", default=False)
    init_a: str = _help("How the frozen A is drawn: 'kaiming' (PEFT's LoRA A) or 'orthogonal'.", default="kaiming")
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
    chunked_loss: bool | str = _help(
        "A causal LM's training loss from its hidden states in chunks of tokens, never keeping (tokens x "
        "vocabulary) logits: 'auto' (every causal LM whose loss it knows; others keep their own, named in the log), "
        "True (refuse a model it does not know) or False. In training, outputs.logits then holds no logits.",
        default="auto",
    )
    offload_activations: bool = _help(
        "Move what the model's forward saves for backward (tensors of 1 MiB or more on a GPU, not parameters) to "
        "pinned CPU memory, and back in backward. Pairs with recompute='block'; costs transfer time.",
        default=False,
    )
    vocabulary_rows: dict[str, int] = field(
        default_factory=dict,
        init=False,
        repr=False,
        metadata={
            "help": "Recorded at conversion, not set: the token embedding weights of the model and the rows of the "
            "pretrained checkpoint's vocabulary (a weight with other rows was resized and travels with the adapter)."
        },
    )

    def __post_init__(self) -> None:
        self._check()

    def _check(self) -> None:
        name = type(self).__name__
        check_adapter_arguments(name, self.r, self.alpha, self.dropout, self.use_rslora, self.seed, self.init_a)
        self.target_modules = _check_targets(name, "target_modules", self.target_modules, allow_none=False)
        self.exclude = _check_targets(name, "exclude", self.exclude, allow_none=True)
        if self.modules_to_save is not None:
            self.modules_to_save = _check_names(name, "modules_to_save", self.modules_to_save)
        _check_bool(name, "gradient_correction", self.gradient_correction)
        _check_bool(name, "recompute_dropout", self.recompute_dropout)
        if self.attn_implementation is not None:
            _check_choice(name, "attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS, none=True)
        _check_choice(name, "recompute", self.recompute, RECOMPUTE_MODES)
        _check_bool(name, "offload_activations", self.offload_activations)
        if (
            self.chunked_loss not in CHUNKED_LOSS
            or isinstance(self.chunked_loss, int | float)
            and not isinstance(self.chunked_loss, bool)
        ):
            raise ValueError(f"{name}(chunked_loss={self.chunked_loss!r}): chunked_loss must be one of {CHUNKED_LOSS}.")

    def settings_kwargs(self) -> dict[str, Any]:
        """Every setting of ``LoraFASettings`` as keyword arguments (``vocabulary_rows``, recorded, is not one)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(LoraFASettings) if f.init}

    def adapter_kwargs(self) -> dict[str, Any]:
        """The settings that decide the adapters' tensors (``ADAPTER_FIELDS``), as keyword arguments."""
        return {name: getattr(self, name) for name in ADAPTER_FIELDS}

    def to_dict(self) -> dict[str, Any]:
        """The settings and the recorded ``vocabulary_rows``, as plain data (what checkpoints store)."""
        return self.settings_kwargs() | {"vocabulary_rows": dict(self.vocabulary_rows)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> LoraFASettings:
        """The settings ``to_dict`` wrote (or the adapter settings of an earlier version's checkpoint), checked.

        Raises:
            TypeError: a key that is no field (the message names it), or a value of the wrong type.
        """
        values = dict(values)
        rows = values.pop("vocabulary_rows", None) or {}
        known = {f.name for f in dataclasses.fields(LoraFASettings) if f.init}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TypeError(f"{unknown} are not LoRA-FA settings; the settings are {sorted(known)}")
        settings = LoraFASettings(**values)
        settings.vocabulary_rows = {str(key): int(rows[key]) for key in rows}
        return settings


def settings_with(settings: LoraFASettings | None, overrides: Mapping[str, Any], caller: str) -> LoraFASettings:
    """``settings`` (default: ``LoraFASettings()``) with ``overrides`` applied, as a plain ``LoraFASettings`` (a
    ``LoraFA`` callback passed as ``settings`` gives its settings, not itself), checked.

    Raises:
        TypeError: an override that is no setting (the message lists them), or a value of the wrong type.
    """
    known = [f.name for f in dataclasses.fields(LoraFASettings) if f.init]
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise TypeError(f"{caller}() got unexpected keyword arguments {unknown}; its settings are {known}.")
    if settings is not None and not isinstance(settings, LoraFASettings):
        raise TypeError(f"{caller}() takes a LoraFASettings (or a LoraFA callback), got {type(settings).__name__}.")
    if settings is not None and not overrides and type(settings) is LoraFASettings:
        return settings
    base = settings.settings_kwargs() if settings is not None else {}
    return LoraFASettings(**(base | dict(overrides)))


def check_adapter_arguments(
    owner: str, r: Any, alpha: Any, dropout: Any, use_rslora: Any, seed: Any, init_a: Any
) -> None:
    """Check the arguments of an adapter (rank, scale, dropout, rsLoRA, seed, A's draw), naming the one that is
    wrong: what ``LoraFASettings`` and every adapter class check.

    Raises:
        TypeError: a value of the wrong type. ValueError: a value out of range.
    """
    _check_int(owner, "r", r, minimum=1)
    _check_number(owner, "alpha", alpha)
    if not alpha > 0:
        raise ValueError(f"{owner}(alpha={alpha!r}): alpha must be > 0 (the branch is scaled by alpha / r).")
    _check_number(owner, "dropout", dropout)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{owner}(dropout={dropout!r}): dropout must be in [0, 1).")
    _check_bool(owner, "use_rslora", use_rslora)
    _check_int(owner, "seed", seed, minimum=0)
    _check_choice(owner, "init_a", init_a, INIT_A)


def scaling(alpha: float, r: int, use_rslora: bool) -> float:
    """The branch's scale ``s``: ``alpha / r``, or ``alpha / sqrt(r)`` with rank-stabilised scaling."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


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
