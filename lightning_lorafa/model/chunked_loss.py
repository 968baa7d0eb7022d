"""A causal LM's training loss without its logits (``chunked_loss``).

At a 128k-262k vocabulary the (tokens x vocabulary) logits, their float32 copy and the log-probabilities kept for
backward are the largest activations of fine-tuning, and LoRA-FA does not shrink them. With ``chunked_loss`` on, a
training forward of a supported transformers causal LM that is given ``labels`` computes its loss from the final
hidden states in chunks of tokens (``model.linear_cross_entropy``): the same number transformers computes (label
shift, ``ignore_index``, ``num_items_in_batch``, ``shift_labels``, Gemma's final logit softcapping, a tied, untied,
LoRA-FA-adapted or fully trained ``lm_head``, a MoE model's router loss), without any (tokens x vocabulary) tensor.

The one mechanism: two forward hooks (public ``torch.nn.Module`` hooks, removed by ``disable_chunked_loss``).

- Before the model's forward, in training with grad enabled and ``labels`` given: the labels are taken out of the
  call and ``logits_to_keep`` asks for no position, so the model computes no logits and no loss of its own.
- After its forward: the loss from the decoder's last hidden state replaces ``outputs.loss``; ``outputs.logits`` is
  a ``LogitsNotKept`` whose every use raises an error naming the setting.

So a ``training_step`` returning ``self.model(**batch).loss`` gets it without a change. Evaluation, prediction and
generation (``model.eval()``, ``torch.no_grad()``, or no labels) return real logits, and so does a call that asks
for ``logits_to_keep`` or ``return_dict=False`` itself.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.hooks import RemovableHandle

from lightning_lorafa.adapters.linear import LoraFALinear, is_quantized
from lightning_lorafa.model.linear_cross_entropy import linear_cross_entropy

log = logging.getLogger(__name__)

#: The causal LMs whose loss is ``ForCausalLMLoss(lm_head(h))`` (Gemma 2/3 with their final softcapping), each
#: checked against transformers' own loss and gradients in the tests.
KNOWN_CAUSAL_LMS = frozenset(
    {
        "BloomForCausalLM",
        "FalconForCausalLM",
        "GPT2LMHeadModel",
        "GPTNeoXForCausalLM",
        "Gemma2ForCausalLM",
        "Gemma3ForCausalLM",
        "GemmaForCausalLM",
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "MixtralForCausalLM",
        "OPTForCausalLM",
        "Phi3ForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen2MoeForCausalLM",
        "Qwen3ForCausalLM",
        "Qwen3MoeForCausalLM",
    }
)
#: The loss transformers' ``loss_function`` is for these models unless a user sets their own.
_CAUSAL_LM_LOSS = "ForCausalLM"
_ATTRIBUTE = "lorafa_chunked_loss"


class LogitsNotKept:
    """What ``outputs.logits`` is in a training forward with ``chunked_loss`` on: the loss was computed without
    the logits, so there are none; any use raises an error that says how to get them."""

    def __init__(self, model_name: str) -> None:
        self._message = (
            f"LoRA-FA: {model_name}'s training forward computed its loss with chunked_loss on, without the "
            "(tokens x vocabulary) logits, so outputs.logits holds none. To read logits in training, pass "
            "chunked_loss=False (LoraFA(chunked_loss=False), prepare_model(..., chunked_loss=False), or "
            "chunked_loss: false in the LoraFA callback's init_args of a lorafa config); evaluation, prediction "
            "and generation (model.eval(), torch.no_grad(), or no labels) return logits as usual."
        )

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # dunders and the message itself (copy, pickle): plain attribute lookups
            raise AttributeError(name)
        raise AttributeError(self._message)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        stand_in = next(a for a in (*args, *(kwargs or {}).values()) if isinstance(a, LogitsNotKept))
        raise RuntimeError(stand_in._message)

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(self._message)

    __getitem__ = __len__ = __iter__ = __array__ = __float__ = __bool__ = _refuse
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __matmul__ = _refuse

    def __repr__(self) -> str:
        return "LogitsNotKept(chunked_loss=True: no logits in this training forward)"


def chunked_loss_support(model: nn.Module) -> str | None:
    """None when ``chunked_loss`` can compute ``model``'s loss, else why not (one sentence)."""
    name = type(model).__name__
    if name not in KNOWN_CAUSAL_LMS:
        return f"{name} is not one of the causal LMs whose loss it computes ({', '.join(sorted(KNOWN_CAUSAL_LMS))})"
    if "_loss_function" in vars(model):
        return f"{name} has a loss_function of its own"
    if getattr(model, "loss_type", _CAUSAL_LM_LOSS) not in (_CAUSAL_LM_LOSS, None):
        return f"{name} has loss_type {model.loss_type!r}"
    parameters = inspect.signature(model.forward).parameters
    if "labels" not in parameters or "logits_to_keep" not in parameters:
        return f"{name}.forward takes no labels or logits_to_keep"
    head = model.get_output_embeddings()
    base = head.base if isinstance(head, LoraFALinear) else head
    if type(base) is not nn.Linear or is_quantized(base):
        return f"its output layer is a {type(base).__name__}, not an nn.Linear (with or without a LoRA-FA adapter)"
    if decoder_of(model) is model:
        return f"{name} has no decoder to take the hidden states from"
    return None


def decoder_of(model: nn.Module) -> nn.Module:
    """The module whose output's first item is the hidden state the LM head reads (after the final norm)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    return decoder if isinstance(decoder, nn.Module) else model.base_model


def causal_lms(model: nn.Module) -> dict[str, nn.Module]:
    """The transformers causal LMs in ``model`` (itself, or the outermost ones inside a wrapper), by name."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        is_lm = type(module).__name__.endswith(("ForCausalLM", "LMHeadModel"))
        if is_lm and not any(name.startswith(outer + ".") or outer == "" for outer in found):
            found[name] = module
    return found


@dataclass
class ChunkedLoss:
    """The hooks of one causal LM, and what passes from its pre-forward hook to its post-forward hook."""

    handles: list[RemovableHandle] = field(default_factory=list)
    pending: dict[str, Any] | None = None  # labels and loss arguments of the training forward under way
    hidden: torch.Tensor | None = None  # the decoder's last hidden state (B, S, H) of that forward

    def before_forward(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        self.pending = self.hidden = None
        labels = kwargs.get("labels")
        if labels is None or not model.training or not torch.is_grad_enabled():
            return None
        if kwargs.get("logits_to_keep", 0) not in (0, None) or kwargs.get("return_dict") is False:
            return None  # the caller asked for something of the model's own: its own loss
        kwargs = dict(kwargs)
        self.pending = {
            "labels": kwargs.pop("labels"),
            "shift_labels": kwargs.pop("shift_labels", None),
            "num_items_in_batch": kwargs.get("num_items_in_batch"),
            "ignore_index": kwargs.get("ignore_index", -100),
        }
        kwargs["logits_to_keep"] = torch.empty(0, dtype=torch.long, device=labels.device)
        return args, kwargs

    def keep_hidden(self, decoder: nn.Module, args: tuple, output: Any) -> None:
        if self.pending is not None:
            self.hidden = output[0]

    def after_forward(self, model: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        pending, hidden = self.pending, self.hidden
        self.pending = self.hidden = None
        if pending is None:
            return None
        if hidden is None:
            raise RuntimeError(
                f"LoRA-FA: {type(model).__name__}'s decoder ({type(decoder_of(model)).__name__}) returned no hidden "
                "states to the chunked loss; pass chunked_loss=False."
            )
        loss = causal_lm_loss(model, hidden, **pending)
        aux_loss = output.get("aux_loss")
        if aux_loss is not None:  # a MoE model's router loss, added as the model adds it
            loss = loss + model.router_aux_loss_coef * aux_loss.to(loss.device)
        values = {key: value for key, value in output.items() if key not in ("loss", "logits")}
        return type(output)(loss=loss, logits=LogitsNotKept(type(model).__name__), **values)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def causal_lm_loss(
    model: nn.Module,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss(lm_head(hidden), labels)`` from hidden (B, S, H), without the logits.

    Tokens whose (shifted) label is ``ignore_index`` take no part (eager: no logits are computed for them; under
    ``torch.compile``, which needs static shapes, they are weighted 0); the sum over the others is divided by
    ``num_items_in_batch`` when given (gradient accumulation), else by their count.
    """
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = shift_labels.reshape(-1).to(hidden.device)
    x = hidden.reshape(-1, hidden.shape[-1])
    counted = targets != ignore_index
    if not torch.compiler.is_compiling():
        index = counted.nonzero().squeeze(1)
        x, targets, counted = x.index_select(0, index), targets.index_select(0, index), None
    head = model.get_output_embeddings()
    h = lora_B = None
    if isinstance(head, LoraFALinear):
        if not head.merged:
            h, lora_B = head.branch_input(x)
        head = head.base
    weight, bias = head.weight, head.bias
    if hasattr(weight, "full_tensor"):  # an FSDP2-sharded head outside its own forward: gather it (differentiably)
        weight = weight.full_tensor()
        bias = bias.full_tensor() if bias is not None else None
    softcap = getattr(model.config, "final_logit_softcapping", None)
    return linear_cross_entropy(
        x,
        weight,
        targets,
        counted=counted,
        bias=bias,
        h=h,
        lora_B=lora_B,
        normalizer=num_items_in_batch,
        softcap=softcap,
    )


def enable_chunked_loss(model: nn.Module) -> ChunkedLoss:
    """Compute ``model``'s training loss without its logits (the module docstring); idempotent.

    Raises:
        ValueError: ``model`` is not a causal LM whose loss this computes (the message says why).
    """
    existing = getattr(model, _ATTRIBUTE, None)
    if isinstance(existing, ChunkedLoss):
        return existing
    why = chunked_loss_support(model)
    if why is not None:
        raise _refusal(why)
    hooks = ChunkedLoss()
    hooks.handles = [
        model.register_forward_pre_hook(hooks.before_forward, with_kwargs=True),
        decoder_of(model).register_forward_hook(hooks.keep_hidden),
        model.register_forward_hook(hooks.after_forward, with_kwargs=True),
    ]
    setattr(model, _ATTRIBUTE, hooks)
    return hooks


def disable_chunked_loss(model: nn.Module) -> bool:
    """Give ``model`` back its own loss and logits in training; whether ``chunked_loss`` was on."""
    hooks = vars(model).pop(_ATTRIBUTE, None)
    if hooks is None:
        return False
    hooks.remove()
    return True


def check_chunked_loss(model: nn.Module, setting: bool | str) -> None:
    """Raise ``ValueError`` (saying why) when ``setting`` is True and a causal LM in ``model`` is not supported;
    what ``prepare_model`` checks before it changes anything."""
    if setting is not True:
        return
    lms = causal_lms(model)
    if not lms:
        raise ValueError(
            f"chunked_loss=True: {type(model).__name__} holds no causal LM (a transformers *ForCausalLM or "
            "*LMHeadModel), whose loss it computes. Pass chunked_loss=False or 'auto'."
        )
    for lm in lms.values():
        why = chunked_loss_support(lm)
        if why is not None:
            raise _refusal(why)


def _refusal(why: str) -> ValueError:
    """The error of ``chunked_loss=True`` on a causal LM it does not support, saying ``why``."""
    return ValueError(f"chunked_loss=True: {why}. Pass chunked_loss=False (or 'auto', which leaves such models be).")


def apply_chunked_loss(model: nn.Module, setting: bool | str) -> tuple[list[str], dict[str, str]]:
    """``chunked_loss`` for the causal LMs in ``model``: True (each must be supported, else ``ValueError``),
    ``"auto"`` (those supported; the others are returned with why) or False (turned off where on).

    Returns:
        (names of the causal LMs whose loss is chunked, {name: why not} for the causal LMs left with their own).
    """
    lms = causal_lms(model)
    if setting is False:
        for lm in lms.values():
            disable_chunked_loss(lm)
        return [], {}
    done, left = [], {}
    for name, lm in lms.items():
        label = name or type(lm).__name__
        why = chunked_loss_support(lm)
        if why is None or setting is True:
            enable_chunked_loss(lm)
            done.append(label)
        else:
            left[label] = why
    return done, left
