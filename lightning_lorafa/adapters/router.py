"""LoRA-FA on the router of a MoE block.

transformers' MoE routers (``MixtralTopKRouter``, ``Qwen2MoeTopKRouter``, ``Qwen3MoeTopKRouter``) are not linear
layers: each holds a weight W (E, H) that its own forward uses as ``logits = F.linear(hidden (T, H), W)``, followed
by the softmax and the top-k. ``LoraFARouter`` adds the LoRA-FA branch to exactly that product:

    logits = x W^T + s * dropout(x) A^T B^T          x (T, H), A (r, H) frozen, B (E, r) trained

so B's gradient keeps ``h = dropout(x) A^T`` (T, r) and a seed, never x, as ``LoraFALinear`` does (it is one: the
same A, B, scaling, merge, checkpoints and gradient correction). PEFT adapts the same weight through
``target_parameters``, as a delta weight and without dropout.

The product is found while the router runs: a ``TorchFunctionMode`` (torch's public API for intercepting functions),
active only inside the router's forward, adds the branch to the one ``F.linear`` call whose weight is the router's
own; the router's class and instance are left as they are. ``is_router`` runs a router once on one zero token at
conversion to check that its forward makes that call, so a router whose forward computes its logits another way
is left out by name instead of training nothing.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from lightning_lorafa.adapters.linear import LoraFALinear, is_linear

#: Errors a module that is not called like a router ``(hidden (T, H)) -> ...`` raises on the probe token.
_PROBE_ERRORS = (TypeError, ValueError, RuntimeError, IndexError, AttributeError, NotImplementedError)


class _BranchOnWeight(TorchFunctionMode):
    """Counts the ``F.linear(x, weight)`` calls made with one weight and, given ``branch``, returns
    ``branch(y, x)`` for the first of them instead of y."""

    def __init__(self, weight: torch.Tensor, branch: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None):
        super().__init__()
        self.weight, self.branch, self.calls = weight, branch, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.linear:
            x = args[0] if args else kwargs.get("input")
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            if weight is self.weight:
                self.calls += 1
                if self.branch is not None and self.calls == 1:
                    out = self.branch(out, x)
        return out


def _router_weight(module: nn.Module) -> nn.Parameter | None:
    """The module's own 2D floating-point ``weight`` parameter, if it has one."""
    weight = dict(module.named_parameters(recurse=False)).get("weight")
    if isinstance(weight, nn.Parameter) and weight.ndim == 2 and weight.is_floating_point():
        return weight
    return None


def is_router(module: nn.Module) -> bool:
    """Whether ``LoraFARouter`` adapts ``module``: a module of a model library (not one of torch's, not a linear
    layer), without child modules, holding a 2D floating-point ``weight`` (E, H), whose forward called on one zero
    token (1, H) makes exactly one ``F.linear`` call with that weight."""
    if isinstance(module, LoraFALinear) or is_linear(module) or type(module).__module__.startswith("torch."):
        return False
    weight = _router_weight(module)
    if weight is None or any(True for _ in module.children()):
        return False
    watch = _BranchOnWeight(weight, None)
    token = torch.zeros(1, weight.shape[1], dtype=weight.dtype, device=weight.device)
    try:
        with torch.no_grad(), watch:
            module(token)
    except _PROBE_ERRORS:  # called another way: not a router
        return False
    return watch.calls == 1


class LoraFARouter(LoraFALinear):
    """A frozen MoE router with a LoRA-FA branch on its logits: ``x W^T + s * dropout(x) A^T B^T``.

    Args:
        base: a router that ``is_router`` accepts (weight (E, H)); its parameters are frozen.
        r, alpha, dropout, use_rslora, seed, init_a: as for ``LoraFALinear`` (d_in = H, d_out = E).

    Called like the base, returning what it returns (for transformers' routers: logits (T, E), the top-k
    weights and indices (T, k)), with the branch added to the logits before the base's softmax and top-k.

    Attributes: those of ``LoraFALinear``: lora_A (r, H), lora_B (E, r), scaling, merged.
    """

    @staticmethod
    def base_features(base: nn.Module) -> tuple[int, int]:
        """``(H, E)`` of a router; raises ``TypeError`` for a module ``is_router`` does not accept."""
        if not is_router(base):
            raise TypeError(
                "LoraFARouter adapts MoE routers whose forward computes F.linear(hidden, self.weight) (Mixtral, "
                f"Qwen2-MoE, Qwen3-MoE), got {type(base).__name__}."
            )
        num_experts, hidden = base.weight.shape
        return hidden, num_experts

    def forward(self, *args, **kwargs):
        if self.merged:
            return self.base(*args, **kwargs)
        mode = _BranchOnWeight(self.base.weight, self.add_branch)
        with mode:
            out = self.base(*args, **kwargs)
        if mode.calls != 1:
            warnings.warn(
                f"LoRA-FA: {type(self.base).__name__} made {mode.calls} F.linear calls with its weight in this forward "
                "(one at conversion), so its adapter was "
                + ("not applied." if mode.calls == 0 else "applied to the first only."),
                stacklevel=2,
            )
        return out
