"""B's gradient correction: ``g_B <- g_B (A A^T)^{-1} / s^2``, for any optimizer.

With A frozen, ``g_B = s * G A^T`` (G: the full-weight gradient, (d_out, d_in)). The follow-up paper's closed
form makes the weight change ``s * g~_B A`` the closest to G in Frobenius norm:

    g~_B = (1 / s^2) * g_B (A A^T)^{-1}           g_B: (d_out, r), (A A^T)^{-1}: (r, r)

The correction is linear in ``g_B`` and acts on each row of it alone, so it may run

- on the gradient before any optimizer's step: ``GradientCorrection.attach(optimizer)`` registers a step
  pre-hook (what the ``LoraFA`` callback does for the user's own optimizer), and ``LoraFAOptimizer`` calls it
  inside its ``step``; gradient clipping done before the step acts on the raw gradient, as in PEFT;
- in backward, on each rank's full local gradient (``LoraFALinear.correct_in_backward``, under FSDP1, which
  flattens B): sums and means over data-parallel ranks commute with it;
- on a row-sharded B (FSDP2 DTensor): each rank corrects its own rows with the full (r, r) matrix.

A is frozen, so ``(A A^T + ridge I)^{-1}`` is computed once per layer in float32 and cached while A is unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_warn
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_lorafa import _compat

#: Added to the diagonal of ``A A^T`` before inverting it.
RIDGE = 1e-8


class _HasFrozenA(Protocol):
    lora_A: torch.Tensor
    lora_B: nn.Parameter
    scaling: float
    correct_in_backward: bool


def correction_matrix(layer: _HasFrozenA, ridge: float = RIDGE) -> torch.Tensor:
    """``(1 / s^2) * (A A^T + ridge I)^{-1}`` (r, r) in float32, cached on the layer while A is unchanged.

    For fused MoE experts, A is (E, r, d_in) and the matrix (E, r, r): one per expert."""
    lora_A = layer.lora_A
    key = (lora_A.device, _compat.tensor_version(lora_A), lora_A.data_ptr(), ridge, layer.scaling)
    cached = getattr(layer, "_correction_cache", None)
    if cached is None or cached[0] != key:
        a = lora_A.detach().float()
        gram = a @ a.mT + ridge * torch.eye(a.shape[-2], device=a.device)
        matrix = torch.linalg.inv(gram) / layer.scaling**2
        layer._correction_cache = (key, matrix)
        return matrix
    return cached[1]


class CorrectedGradient(torch.autograd.Function):
    """Identity on B (d_out, r) whose backward returns ``grad @ correction`` (float32 (r, r)): the correction
    in backward (``LoraFALinear.correct_in_backward``)."""

    @staticmethod
    def forward(ctx, lora_B: torch.Tensor, correction: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(correction)
        return lora_B.view_as(lora_B)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (correction,) = ctx.saved_tensors
        return (grad.float() @ correction).to(grad.dtype), None


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


@torch.no_grad()
def correct_gradient(layer: _HasFrozenA, grad: torch.Tensor | None = None) -> None:
    """Replace B's gradient (d_out, r) in place by ``g_B @ correction_matrix(layer)``.

    ``grad`` defaults to ``layer.lora_B.grad``; a DTensor gradient is corrected on its local rows.
    """
    grad = layer.lora_B.grad if grad is None else grad
    if grad is None:
        return
    local = _local(grad)
    matrix = correction_matrix(layer).to(local.device)
    local.copy_((local.float() @ matrix).to(local.dtype))


def warn_no_gradient(unused: Sequence[str], total: int) -> None:
    """Warn that the adapters ``unused`` (module names, of ``total``) got no gradient in the first training step."""
    if unused:
        rank_zero_warn(
            f"LoRA-FA: {len(unused)} of {total} adapters got no gradient in the first training step: they do not "
            f"reach the loss and will not train: {', '.join(unused[:8])}{' ...' if len(unused) > 8 else ''}. "
            "Their module was not called, its forward does not go through the adapter, or its output is not used. "
            "Leave them out (exclude=[...]); under DDP, parameters without a gradient make the next step fail."
        )


class GradientCorrection:
    """Corrects the gradients of the ``lora_B`` parameters of a set of LoRA-FA layers, in place.

    Args:
        layers: maps each ``lora_B`` parameter to its layer (``lora_layers_by_parameter(model)``).
        names: maps each ``lora_B`` to its module's name; given, the first ``check_gradients`` warns by name about
            B's without a gradient.

    Layers with ``correct_in_backward`` set carry corrected gradients already and are left alone.
    """

    def __init__(self, layers: Mapping[nn.Parameter, _HasFrozenA], names: Mapping[nn.Parameter, str] | None = None):
        self.layers: dict[nn.Parameter, _HasFrozenA] = dict(layers)
        self._stacked: dict[tuple[int, ...], tuple[tuple, torch.Tensor]] = {}
        self.names = dict(names or {})
        self._checked = names is None

    def check_gradients(self, params: Iterable[torch.Tensor]) -> list[str]:
        """Once, after the first backward pass: warn by name about the B's among ``params`` that got no gradient
        (their adapters took no part in the forward); return their module names."""
        if self._checked:
            return []
        self._checked = True
        held = [p for p in params if p in self.layers and not self.layers[p].correct_in_backward]
        unused = list(dict.fromkeys(self.names.get(p, "?") for p in held if p.grad is None))
        warn_no_gradient(unused, len(set(self.names.values())) or len(self.layers))
        return unused

    @torch.no_grad()
    def correct(self, params: Iterable[torch.Tensor]) -> int:
        """Correct the gradients of those ``params`` that are LoRA-FA B's; return how many were corrected.

        Gradients of one local shape, dtype and device are stacked (k, d_out, r) and multiplied by their stacked
        corrections (k, r, r) in one ``bmm``.
        """
        batches: dict[tuple, list[tuple[_HasFrozenA, torch.Tensor]]] = {}
        count = 0
        for p in params:
            layer = self.layers.get(p)
            if layer is None or p.grad is None or layer.correct_in_backward:
                continue
            local = _local(p.grad)
            if local.ndim != 2:  # experts' B (E, d_out, r): one batched product of its own
                correct_gradient(layer, local)
                count += 1
                continue
            batches.setdefault((local.shape, local.dtype, local.device), []).append((layer, local))
        for (_, _, device), batch in batches.items():
            count += len(batch)
            if len(batch) == 1:
                correct_gradient(*batch[0])
                continue
            locals_ = [local for _, local in batch]
            matrices = [correction_matrix(layer) for layer, _ in batch]
            ids = tuple(id(layer) for layer, _ in batch)
            versions = tuple(layer._correction_cache[0] for layer, _ in batch)  # A's device, version, storage
            cached = self._stacked.get(ids)
            if cached is None or cached[0] != versions:
                cached = self._stacked[ids] = (versions, torch.stack(matrices).to(device))  # (k, r, r)
            corrected = torch.bmm(torch.stack(locals_).float(), cached[1])  # (k, d_out, r)
            torch._foreach_copy_(locals_, list(corrected.unbind(0)))
        return count

    def attach(self, optimizer: torch.optim.Optimizer) -> RemovableHandle:
        """Correct the B gradients that ``optimizer`` holds before each of its steps (a step pre-hook).

        When ``step`` is given a closure (Lightning's automatic optimization: forward, backward, then gradient
        clipping), the correction runs right after the closure, so clipping sees the raw gradient, as in PEFT;
        otherwise right before the step. The optimizer's class, settings and LR schedulers are untouched.
        """

        def params_of(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
            return [p for group in opt.param_groups for p in group["params"]]

        def pre_hook(opt: torch.optim.Optimizer, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            # args is (optimizer, *positional arguments of step): the closure is step's first argument
            closure, where = (args[1], "args") if len(args) > 1 else (kwargs.get("closure"), "kwargs")
            if closure is None:
                self.check_gradients(params_of(opt))
                self.correct(params_of(opt))
                return None

            def corrected_closure() -> Any:
                loss = closure()
                self.check_gradients(params_of(opt))
                self.correct(params_of(opt))
                return loss

            if where == "args":
                return (args[0], corrected_closure, *args[2:]), kwargs
            return args, {**kwargs, "closure": corrected_closure}

        return optimizer.register_step_pre_hook(pre_hook)
