"""``LoraFAOptimizer``: AdamW over B (and ``modules_to_save``) that corrects B's gradient inside ``step``.

For plain PyTorch and for parity with PEFT's ``create_lorafa_optimizer``. The ``LoraFA`` callback keeps the
user's own optimizer instead and corrects B's gradient before its step (``lightning_lorafa.correction``).

The update is transformers-style AdamW ("adamw_hf", as in PEFT's ``LoraFAOptimizer``): eps added
to ``sqrt(v)``, bias correction folded into the step size, decoupled weight decay applied after the
step as ``p -= lr * wd * p``. State is keyed by parameter, like ``torch.optim``, so
``state_dict``/``load_state_dict`` and sharded-optimizer utilities work unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from lightning_lorafa.convert import lorafa_experts, lorafa_layers
from lightning_lorafa.correction import GradientCorrection, correct_gradient, correction_matrix
from lightning_lorafa.experts import ExpertsAdapter
from lightning_lorafa.layer import LoraFALinear


class LoraFAOptimizer(torch.optim.Optimizer):
    """AdamW (transformers style) whose ``step`` first corrects the gradients of LoRA-FA ``lora_B``s.

    Args:
        params: parameters or param groups (B's and any fully trained parameters).
        lora_layers: maps each ``lora_B`` parameter to its ``LoraFALinear`` (for A and s). Parameters
            not in it get plain AdamW. Build it with ``lora_layers_by_parameter(model)``.
        lr, betas, eps, weight_decay, correct_bias: as in transformers' AdamW (eps default 1e-6).
        gradient_correction: apply the closed-form correction (default True). Without it this is AdamW.

    Gradient clipping done before ``step`` (Lightning's ``gradient_clip_val``) acts on the raw
    gradients; the correction is applied after it, inside ``step``, as in PEFT. Layers with
    ``correct_in_backward`` set already carry corrected gradients and are not corrected again.
    ``LoraFA`` does not attach its own correction to a ``LoraFAOptimizer`` (it would correct twice).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lora_layers: Mapping[nn.Parameter, LoraFALinear] | None = None,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        gradient_correction: bool = True,
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
        self.lora_layers: dict[nn.Parameter, LoraFALinear] = dict(lora_layers or {})
        self._correction = GradientCorrection(self.lora_layers)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
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


def lora_layers_by_parameter(model: nn.Module) -> dict[nn.Parameter, LoraFALinear | ExpertsAdapter]:
    """Map each ``lora_B`` parameter of ``model`` to its layer (a fused experts projection: its ``ExpertsAdapter``,
    whose B is (E, d_out, r))."""
    layers: dict[nn.Parameter, LoraFALinear | ExpertsAdapter] = {
        layer.lora_B: layer for layer in lorafa_layers(model).values()
    }
    for experts in lorafa_experts(model).values():
        layers.update({adapter.lora_B: adapter for adapter in experts.adapters.values()})
    return layers


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
    )


__all__ = [
    "LoraFAOptimizer",
    "correct_gradient",
    "correction_matrix",
    "create_lorafa_optimizer",
    "lora_layers_by_parameter",
]
