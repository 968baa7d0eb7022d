"""The model's own dropouts: made to keep a seed instead of a mask, or named where they cannot.

``keep_dropout_seeds(model)`` replaces every ``nn.Dropout`` by ``RecomputedDropout`` (``replace_dropout``) and
switches transformers models to the attention whose dropout keeps a seed; what still keeps a mask (an inline
``torch.nn.functional.dropout`` call in the model's code, ``inline_functional_dropouts``) is named with the reason.
"""

from __future__ import annotations

import inspect
import re
import sys
from typing import Any

from torch import nn

from lightning_lorafa import _compat
from lightning_lorafa.adapters.dropout import RecomputedDropout
from lightning_lorafa.model.attention import use_seeded_dropout_attention


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


def replace_dropout(model: nn.Module) -> list[str]:
    """Make every ``nn.Dropout`` in ``model`` keep a seed instead of a mask; return the dotted names changed.

    Each becomes a ``RecomputedDropout`` with the same ``p`` and train/eval mode. Dropout applied inside a
    transformers attention function is ``lightning_lorafa.model.attention``'s (``use_seeded_dropout_attention``).
    """
    changed = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Dropout:
                replacement = RecomputedDropout(child.p).train(child.training)
                setattr(module, child_name, replacement)
                changed.append(f"{name}.{child_name}" if name else child_name)
    return changed


#: A call of torch's functional dropout as model code writes it (``nn.functional.dropout(``, ``F.dropout(``).
_FUNCTIONAL_DROPOUT = re.compile(r"\b(?:nn\.functional|functional|F)\.dropout\s*\(")
#: A ``scaled_dot_product_attention(...)`` call whose ``dropout_p`` is not a literal 0 (Falcon's own attention before
#: transformers 5.25).
_SDPA_DROPOUT = re.compile(
    r"scaled_dot_product_attention\s*\((?:[^()]|\([^()]*\))*?\bdropout_p\s*=\s*(?!0(?:\.0*)?\s*[,)])"
)


def inline_functional_dropouts(model: nn.Module) -> dict[str, str]:
    """The modules whose own ``forward`` drops values inline, one entry per class: ``{first module name: why its
    dropout keeps a mask}``.

    Such a call is no module that ``replace_dropout`` can swap, and reaching it would take patching torch or the
    model's code, so its mask is kept: ``torch.nn.functional.dropout`` (BART's and Whisper's hidden and activation
    dropouts, Falcon's and BLOOM's residual dropouts), and ``scaled_dot_product_attention`` with a ``dropout_p``
    in an attention of the model's own (Falcon's before transformers 5.25), whose CPU path keeps the mask (CUDA's
    fused kernels keep RNG state). Found from the class's source; a class whose dropout-probability attributes are
    all 0 keeps no mask and is left out.
    """
    found: dict[type, tuple[str, list[str]]] = {}
    skipped: set[type] = set()
    for name, module in model.named_modules():
        cls = type(module)
        if cls in found:
            found[cls][1].append(name)
            continue
        if cls in skipped or cls.__module__.startswith(("torch.", "lightning_lorafa.")):
            continue
        rates = [v for k, v in vars(module).items() if "dropout" in k and isinstance(v, float)]
        call = _inline_dropout_call(cls)
        if call is not None and (not rates or any(rate > 0 for rate in rates)):
            found[cls] = (call, [name or "(the model)"])
        else:
            skipped.add(cls)
    return {
        names[0]: (
            f"{cls.__name__}.forward calls {call} inline (or through a helper of its module)"
            + (f" ({len(names)} modules of this class)" if len(names) > 1 else "")
            + "; only dropout modules and the attention can keep a seed without patching torch or the model's code"
        )
        for cls, (call, names) in found.items()
    }


def _inline_dropout_call(cls: type) -> str | None:
    """What ``cls.forward``, or a function of the class's own module that it calls (Falcon's and BLOOM's
    ``dropout_add``), calls that drops values inline: ``"torch.nn.functional.dropout"``, ``"scaled_dot_product_attention
    with dropout_p"``, or None."""
    source = _source(cls.forward)
    namespace = vars(sys.modules.get(cls.__module__, object()))
    sources = [source]
    for called in set(re.findall(r"(?<![.\w])([A-Za-z_]\w*)\s*\(", source)):
        helper = namespace.get(called)
        if inspect.isfunction(helper) and helper.__module__ == cls.__module__:
            sources.append(_source(helper))
    if any(_FUNCTIONAL_DROPOUT.search(text) for text in sources):
        return "torch.nn.functional.dropout"
    if any(_SDPA_DROPOUT.search(text) for text in sources):
        return "scaled_dot_product_attention with dropout_p"
    return None


def _source(function: Any) -> str:
    try:
        return inspect.getsource(function)
    except (OSError, TypeError):
        return ""
