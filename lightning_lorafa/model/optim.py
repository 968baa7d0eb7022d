"""Optimizers and LoRA-FA: B's gradient correction on any optimizer, and ``LoraFAOptimizer``.

``attach_gradient_correction(optimizer, model)`` corrects B's gradient before each step of any torch optimizer
(what the ``LoraFA`` callback does for the user's own optimizers); ``keep_trainable_only`` drops the frozen
parameters from their param groups. ``LoraFAOptimizer`` is AdamW over B (and ``modules_to_save``) that corrects B's
gradient inside ``step``, for plain PyTorch and for parity with PEFT's ``create_lorafa_optimizer``.

The update is transformers-style AdamW ("adamw_hf", as in PEFT's ``LoraFAOptimizer``): eps added
to ``sqrt(v)``, bias correction folded into the step size, decoupled weight decay applied after the
step as ``p -= lr * wd * p``. State is keyed by parameter, like ``torch.optim``, so
``state_dict``/``load_state_dict`` and sharded-optimizer utilities work unchanged.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_warn
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_lorafa.adapters.base import LoraFAAdapter
from lightning_lorafa.adapters.correction import (
    GradientCorrection,
    correct_gradient,
    correction_matrix,
    warn_no_gradient,
)
from lightning_lorafa.adapters.find import lorafa_adapters

log = logging.getLogger(__name__)


class LoraFAOptimizer(torch.optim.Optimizer):
    """AdamW (transformers style) whose ``step`` first corrects the gradients of LoRA-FA ``lora_B``s.

    Args:
        params: parameters or param groups (B's and any fully trained parameters).
        lora_layers: maps each ``lora_B`` parameter to its adapter (for A and s). Parameters
            not in it get plain AdamW. Build it with ``lora_layers_by_parameter(model)``.
        lr: learning rate.
        betas: Adam's coefficients for the running averages of the gradient and its square.
        eps: added to the denominator (default 1e-6, as in transformers' AdamW).
        weight_decay: decoupled weight decay (AdamW's).
        correct_bias: apply Adam's bias correction (as in transformers' AdamW).
        gradient_correction: apply the closed-form correction (default True). Without it this is AdamW.
        lora_names: maps each ``lora_B`` to its module's name (``lora_names_by_parameter(model)``); given, the
            first ``step`` warns by name about B's without a gradient (adapters that took no part in the forward).

    Gradient clipping done before ``step`` (Lightning's ``gradient_clip_val``) acts on the raw
    gradients; the correction is applied after it, inside ``step``, as in PEFT. Layers with
    ``correct_in_backward`` set already carry corrected gradients and are not corrected again.
    ``LoraFA`` does not attach its own correction to a ``LoraFAOptimizer`` (it would correct twice).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lora_layers: Mapping[nn.Parameter, LoraFAAdapter] | None = None,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        gradient_correction: bool = True,
        lora_names: Mapping[nn.Parameter, str] | None = None,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}.")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must lie in [0, 1), got {betas}.")
        if eps < 0.0 or weight_decay < 0.0:
            raise ValueError(f"eps and weight_decay must be >= 0, got eps={eps}, weight_decay={weight_decay}.")
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "correct_bias": correct_bias,
            "gradient_correction": gradient_correction,
        }
        super().__init__(params, defaults)
        self.lora_layers: dict[nn.Parameter, LoraFAAdapter] = dict(lora_layers or {})
        self._correction = GradientCorrection(self.lora_layers, names=lora_names)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._correction.check_gradients([p for group in self.param_groups for p in group["params"]])
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            params, grads, exp_avgs, exp_avg_sqs, step_sizes, steps = [], [], [], [], [], []
            if group["gradient_correction"]:
                self._correction.correct(group["params"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                steps.append(state["step"])
                step = state["step"].item() + 1  # the step counters advance together below
                step_size = group["lr"]
                if group["correct_bias"]:
                    step_size *= math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                step_sizes.append(-step_size)
            if not params:
                continue
            torch._foreach_add_(steps, 1.0)
            torch._foreach_mul_(exp_avgs, beta1)
            torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
            denoms = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_add_(denoms, group["eps"])
            torch._foreach_addcdiv_(params, exp_avgs, denoms, step_sizes)
            if group["weight_decay"] > 0.0:
                torch._foreach_mul_(params, 1.0 - group["lr"] * group["weight_decay"])
        return loss

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "_correction" not in self.__dict__:
            self._correction = GradientCorrection(self.__dict__.get("lora_layers", {}))


def lora_layers_by_parameter(model: nn.Module) -> dict[nn.Parameter, LoraFAAdapter]:
    """Map each ``lora_B`` parameter of ``model`` to its adapter."""
    return {adapter.lora_B: adapter for adapter in lorafa_adapters(model).values()}


def keep_trainable_only(optimizers: Sequence[torch.optim.Optimizer], module: nn.Module) -> None:
    """Drop the frozen parameters from the param groups of ``optimizers`` (they never get a gradient; under FSDP they
    are sharded base weights), log how many, and warn by name about trainable parameters of ``module`` that no
    optimizer holds (several optimizers, e.g. one for the adapters and one for a head, count together).

    Raises:
        ValueError: an optimizer holds no trainable parameter at all.
    """
    names = {id(p): name for name, p in module.named_parameters()}
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    held: set[int] = set()
    for optimizer in optimizers:
        kind, dropped, kept_any = type(optimizer).__name__, 0, False
        for group in optimizer.param_groups:
            kept = [p for p in group["params"] if p.requires_grad]
            dropped += len(group["params"]) - len(kept)
            group["params"] = kept
            held |= {id(p) for p in kept}
            kept_any = kept_any or bool(kept)
        if not kept_any:
            raise ValueError(
                f"The {kind} from configure_optimizers holds none of the LoRA-FA trainable parameters (B and "
                "modules_to_save). Build it over self.parameters() (LoraFA keeps only the trainable ones), or return "
                "None to let LoraFA supply one."
            )
        if dropped:
            log.info("LoRA-FA: %d frozen parameters left out of %s's param groups.", dropped, kind)
    missing = sorted(names.get(i, "?") for i in trainable - held)
    if missing:
        rank_zero_warn(
            f"LoRA-FA: {len(missing)} trainable tensors are in no optimizer and will not train: "
            f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}. Build the optimizers over "
            "self.parameters() (LoraFA keeps only the trainable ones)."
        )


def adapters_without_gradient(model: nn.Module, params: Iterable[torch.Tensor]) -> list[str]:
    """Names of the adapters of ``model`` whose B is among ``params`` and has no gradient after a backward pass:
    adapters that took no part in the loss. Adapters corrected in backward (FSDP1) are not looked at."""
    held = {id(p) for p in params}
    return [
        name
        for name, adapter in lorafa_adapters(model).items()
        if id(adapter.lora_B) in held and adapter.lora_B.grad is None and not adapter.correct_in_backward
    ]


def warn_adapters_without_gradient(model: nn.Module, optimizers: Iterable[torch.optim.Optimizer]) -> list[str]:
    """Warn by name about the adapters of ``model`` held by ``optimizers`` whose B got no gradient (call it after
    the first backward pass, before the optimizers' step); return their names."""
    params = [p for optimizer in optimizers for group in optimizer.param_groups for p in group["params"]]
    unused = adapters_without_gradient(model, params)
    warn_no_gradient(unused, len(lorafa_adapters(model)))
    return unused


def lora_names_by_parameter(model: nn.Module) -> dict[nn.Parameter, str]:
    """The name of the adapter of ``model`` that owns each ``lora_B`` parameter."""
    return {adapter.lora_B: name for name, adapter in lorafa_adapters(model).items()}


def attach_gradient_correction(
    optimizer: torch.optim.Optimizer, model: nn.Module, check_unused: bool = True
) -> RemovableHandle:
    """Correct the LoRA-FA B gradients of ``model`` that ``optimizer`` holds before each of its steps.

    Any ``torch.optim.Optimizer`` keeps its class, settings and LR schedulers; see ``GradientCorrection.attach``
    for when the correction runs (after the closure, i.e. after gradient clipping). With ``check_unused``, its first
    step warns by name about adapters whose B got no gradient (they took no part in the loss). Returns the hook's
    handle (``handle.remove()`` detaches it).

    Raises:
        ValueError: ``model`` has no LoRA-FA adapters, or ``optimizer`` is a ``LoraFAOptimizer`` (which corrects
            in its own step: attaching would correct twice).
    """
    if isinstance(optimizer, LoraFAOptimizer):
        raise ValueError("A LoraFAOptimizer corrects B's gradient in its own step; attaching would correct twice.")
    layers = lora_layers_by_parameter(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA-FA layers: call prepare_model(model, ...) first.")
    names = lora_names_by_parameter(model) if check_unused else None
    return GradientCorrection(layers, names=names).attach(optimizer)


def create_lorafa_optimizer(
    model: nn.Module,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
    gradient_correction: bool = True,
) -> LoraFAOptimizer:
    """A ``LoraFAOptimizer`` over the trainable parameters of a model converted by ``apply_lorafa``.

    Raises:
        ValueError: the model has no LoRA-FA layers, or an ``lora_A`` requires grad.
    """
    layers = lora_layers_by_parameter(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA-FA layers: call apply_lorafa(model, ...) first.")
    trainable = [p for p in model.parameters() if p.requires_grad]
    return LoraFAOptimizer(
        trainable,
        lora_layers=layers,
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        gradient_correction=gradient_correction,
        lora_names=lora_names_by_parameter(model),
    )


__all__ = [
    "LoraFAOptimizer",
    "attach_gradient_correction",
    "correct_gradient",
    "correction_matrix",
    "create_lorafa_optimizer",
    "lora_layers_by_parameter",
    "lora_names_by_parameter",
]
