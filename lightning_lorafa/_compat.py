"""Every private API of torch, Lightning and transformers that lightning-lorafa uses, in one place.

Each one is looked up here, inside a ``try`` block and behind a version check where its signature changed.
When an upgrade moves or removes one, ``import lightning_lorafa`` still works: only the feature that needs it
is disabled, with one warning naming the feature and what was missing (``missing_features``). The rest of the
package imports these names from here, never from the other libraries directly (``tests/test_compat.py``
checks that).

Features, the private API each needs, and what happens without it:

- ``saved_tensors_hooks`` (``torch._C._autograd``'s default-hooks stack): seed-kept dropout runs as a Python
  ``autograd.Function`` instead of an ATen product under hooks (the same masks and values).
- ``softmax_backward`` (``torch._softmax_backward_data``): the CPU attention's backward uses public ops.
- ``sdpa_attention`` (``transformers.integrations.sdpa_attention``, ``masking_utils.sdpa_mask``): attention
  dropout keeps its mask (the model's own attention runs).
- ``sharded_checkpoints`` (``lightning.fabric.strategies.model_parallel``'s loaders):
  ``LoraFAModelParallelStrategy`` cannot load checkpoints.
- ``ddp_ignore_buffers`` (``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model``): DDP
  broadcasts the frozen A at every step (correct, slower).
- a model's own eager attention (``eager_attention_forward`` of its modeling file): softcapped models (Gemma2)
  keep their own attention, and its dropout mask.
- the experts' gate (``_apply_gate``, which transformers' experts interface adds to an experts class): without it,
  ``act(gate) * up`` of the two halves of the gate/up output, the interface's documented default.
- ``save_pretrained_merged`` (``PreTrainedModel.save_pretrained`` asking the model for its ``state_dict()`` itself,
  found on the call stack): ``save_pretrained`` of a converted model writes the adapters' own layout, which
  ``from_pretrained`` does not load (a warning says so at conversion; ``lorafa export`` still works).
- ``compiled_modules`` (``torch.compile``'s wrapper class ``OptimizedModule`` and its ``_orig_mod``): functions given a
  compiled model see the wrapper's ``_orig_mod.`` names (export and checkpoints of compiled models break).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

#: Feature name -> why it is disabled, for every feature whose private API could not be found.
missing_features: dict[str, str] = {}
_warned: set[str] = set()


def _disable(feature: str, error: BaseException) -> None:
    missing_features[feature] = f"{type(error).__name__}: {error}"


def warn_missing(feature: str) -> None:
    """Warn once that ``feature`` is off because its private API is missing (no-op when it is there)."""
    if feature in missing_features and feature not in _warned:
        _warned.add(feature)
        warnings.warn(
            f"lightning_lorafa: feature {feature!r} is disabled: {missing_features[feature]} "
            "(a private API of an installed library moved; see lightning_lorafa/_compat.py). "
            "Training still works; install the versions in pyproject.toml to get it back.",
            RuntimeWarning,
            stacklevel=3,
        )


# ---------------------------------------------------------------- torch: default saved-tensor hooks
try:
    from torch._C._autograd import _pop_saved_tensors_default_hooks as pop_saved_tensors_hooks
    from torch._C._autograd import _push_saved_tensors_default_hooks as push_saved_tensors_hooks
    from torch._C._autograd import _saved_tensors_hooks_is_enabled as saved_tensors_hooks_enabled
    from torch._C._autograd import _top_saved_tensors_default_hooks as top_saved_tensors_hooks

    top_saved_tensors_hooks(False)  # the signature (ignore_is_tracing) of torch >= 2.1
    HAS_SAVED_TENSORS_HOOKS = True
except (ImportError, TypeError) as error:
    _disable("saved_tensors_hooks", error)
    HAS_SAVED_TENSORS_HOOKS = False
    push_saved_tensors_hooks = pop_saved_tensors_hooks = top_saved_tensors_hooks = None

    def saved_tensors_hooks_enabled() -> bool:
        return False


# ---------------------------------------------------------------- torch: softmax backward
def _softmax_backward_from_public_ops(
    grad: torch.Tensor, probs: torch.Tensor, dim: int, dtype: torch.dtype
) -> torch.Tensor:
    """``probs * (grad - sum(grad * probs, dim))``: the gradient of ``softmax`` with respect to its input."""
    return (probs * (grad - (grad * probs).sum(dim, keepdim=True))).to(dtype)


try:
    softmax_backward: Callable[..., torch.Tensor] = torch._softmax_backward_data
except AttributeError as error:
    _disable("softmax_backward", error)
    softmax_backward = _softmax_backward_from_public_ops


# ---------------------------------------------------------------- transformers: the SDPA attention function
try:
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    HAS_SDPA_ATTENTION = True
except ImportError as error:
    _disable("sdpa_attention", error)
    HAS_SDPA_ATTENTION = False
    repeat_kv = sdpa_attention_forward = sdpa_mask = None


def attn_implementation(model: Any) -> str | None:
    """The attention implementation a transformers model runs (``config._attn_implementation``)."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def no_split_modules(model: Any) -> list[str]:
    """The transformer block class names a transformers model declares (``_no_split_modules``, the attribute
    accelerate's device maps read); ``[]`` where it declares none."""
    return list(getattr(model, "_no_split_modules", None) or [])


def supports_attention(model: Any, implementation: str) -> bool:
    """Whether a transformers model class declares support for ``"sdpa"`` or ``"flash_attention_2"``."""
    flag = {"sdpa": "_supports_sdpa", "flash_attention_2": "_supports_flash_attn"}[implementation]
    return bool(getattr(model, flag, False))


# ---------------------------------------------------------------- Lightning: distributed checkpoint loading
try:
    from lightning.fabric.strategies.model_parallel import _is_sharded_checkpoint as is_sharded_checkpoint
    from lightning.fabric.strategies.model_parallel import (
        _rekey_optimizer_state_if_needed as rekey_optimizer_state_if_needed,
    )
    from lightning.fabric.utilities.load import _METADATA_FILENAME as CHECKPOINT_METADATA_FILENAME

    HAS_SHARDED_CHECKPOINTS = True
except ImportError as error:
    _disable("sharded_checkpoints", error)
    HAS_SHARDED_CHECKPOINTS = False
    is_sharded_checkpoint = rekey_optimizer_state_if_needed = None
    CHECKPOINT_METADATA_FILENAME = "meta.pt"


def is_placeholder_optimizer(optimizer: Any) -> bool:
    """Whether ``optimizer`` is the stand-in Lightning uses when ``configure_optimizers`` returns None."""
    try:
        from lightning.pytorch.core.optimizer import _MockOptimizer
    except ImportError:
        return type(optimizer).__name__ == "_MockOptimizer"
    return isinstance(optimizer, _MockOptimizer)


def strategy_checkpoints_activations(strategy: Any) -> bool:
    """Whether a Lightning ``FSDPStrategy`` was given an ``activation_checkpointing_policy``."""
    return bool(getattr(strategy, "_activation_checkpointing_kwargs", None))


# ---------------------------------------------------------------- torch: DDP buffers to ignore
def ddp_ignore_params_and_buffers(module: torch.nn.Module, names: list[str]) -> bool:
    """Have DDP skip ``names`` (parameters or buffers of ``module``) in its syncs; False where torch lacks the API."""
    setter = getattr(torch.nn.parallel.DistributedDataParallel, "_set_params_and_buffers_to_ignore_for_model", None)
    if setter is None:
        _disable("ddp_ignore_buffers", AttributeError("DistributedDataParallel has no _set_params_and_buffers_..."))
        warn_missing("ddp_ignore_buffers")
        return False
    ignored = list(getattr(module, "_ddp_params_and_buffers_to_ignore", []))
    setter(module, ignored + [name for name in names if name not in ignored])
    return True


# ---------------------------------------------------------------- transformers: the gate of fused experts
def experts_gate(experts: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The gate of a fused experts module: (T_e, 2I) gate/up output -> (T_e, I).

    transformers' experts interface gives every experts class ``_apply_gate`` (``act(gate) * up`` of the two
    halves, or the model's own gating); where it is missing, that default.

    Raises:
        TypeError: it is missing and the gate and up rows are interleaved (``is_concatenated=False``).
    """
    gate = getattr(experts, "_apply_gate", None)
    if callable(gate):
        return gate
    if not getattr(experts, "is_concatenated", True):
        raise TypeError(
            f"{type(experts).__name__} interleaves its gate and up rows and has no _apply_gate: this transformers "
            "version is not supported for its experts; leave them out (exclude=['experts'])."
        )

    def concatenated_gate(gate_up: torch.Tensor) -> torch.Tensor:
        gate_half, up = gate_up.chunk(2, dim=-1)
        return experts.act_fn(gate_half) * up

    return concatenated_gate


# ---------------------------------------------------------------- transformers: a model's own eager attention
def model_eager_attention(module_class: type) -> Callable | None:
    """``eager_attention_forward`` of the modeling file that defines ``module_class`` (not an exported name: each
    modeling file defines its own, the function its attention runs on ``"eager"``); None where it has none, and the
    softcapped models then keep their own attention."""
    import sys

    return getattr(sys.modules.get(module_class.__module__), "eager_attention_forward", None)


# ---------------------------------------------------------------- transformers: save_pretrained's own state_dict call
try:
    import inspect as _inspect

    from transformers import PreTrainedModel as _PreTrainedModel

    _SAVE_PRETRAINED_CODE = _inspect.unwrap(_PreTrainedModel.save_pretrained).__code__
    HAS_SAVE_PRETRAINED_CHECK = True
except (ImportError, AttributeError) as error:
    _disable("save_pretrained_merged", error)
    _SAVE_PRETRAINED_CODE = None
    HAS_SAVE_PRETRAINED_CHECK = False


def called_from_save_pretrained(depth: int = 32) -> bool:
    """Whether transformers' ``PreTrainedModel.save_pretrained`` is among the ``depth`` innermost callers (it asks
    the model for ``state_dict()`` itself, directly or through its quantizer)."""
    if _SAVE_PRETRAINED_CODE is None:
        return False
    frame = _inspect.currentframe()
    for _ in range(depth):
        if frame is None:
            return False
        if frame.f_code is _SAVE_PRETRAINED_CODE:
            return True
        frame = frame.f_back
    return False


# ---------------------------------------------------------------- torch: the module torch.compile returns
try:
    from torch._dynamo.eval_frame import OptimizedModule as _OptimizedModule

    HAS_COMPILED_MODULES = True
except ImportError as error:
    _disable("compiled_modules", error)
    _OptimizedModule = None
    HAS_COMPILED_MODULES = False


def uncompiled(module: torch.nn.Module) -> torch.nn.Module:
    """The module ``torch.compile(module)`` wrapped (``_orig_mod``, through nested wrappers), or ``module``."""
    while _OptimizedModule is not None and isinstance(module, _OptimizedModule):
        module = module._orig_mod
    return module


# ---------------------------------------------------------------- torch: a tensor's version counter and base
def tensor_version(tensor: torch.Tensor) -> int:
    """The counter torch bumps at each in-place change of ``tensor`` (``tensor._version``): caches of values
    derived from a frozen tensor (a scaled copy of A, its Gram inverse) compare it to know they are still good."""
    return tensor._version


def tensor_base(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor ``tensor`` is a view of (``tensor._base``), or ``tensor`` itself."""
    base = tensor._base
    return tensor if base is None else base


def parser_option_strings(parser: object) -> list[str]:
    """Every option string an ``argparse`` parser knows (``parser._actions``), for suggestions on a typo."""
    return [option for action in getattr(parser, "_actions", []) for option in action.option_strings]


def ddp_ignored_names(module: torch.nn.Module) -> list[str]:
    """The parameter and buffer names DDP is told to skip on ``module``."""
    return list(getattr(module, "_ddp_params_and_buffers_to_ignore", []))


for _feature in list(missing_features):
    warn_missing(_feature)
