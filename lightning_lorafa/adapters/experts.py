"""LoRA-FA on fused MoE experts: transformers 5 stores the experts of a MoE block as 3D parameters.

An experts module of transformers' experts interface (``use_experts_implementation``: Mixtral, Qwen2-MoE,
Qwen3-MoE and most MoE models) holds, for E experts,

    gate_up_proj (E, 2I, H)  (``up_proj`` (E, I, H) when ``has_gate`` is False)      down_proj (E, H, I)

(transposed, (E, d_in, d_out), when ``is_transposed``; biases (E, d_out) when ``has_bias``), and is called as
``experts(hidden (T, H), top_k_index (T, k), top_k_weights (T, k))``. ``LoraFAExperts`` gives each projection of
each expert e a frozen A_e (r, d_in) and a trainable B_e (d_out, r):

    y_e = x_e W_e^T + s * dropout(x_e) A_e^T B_e^T            x_e: the tokens routed to expert e, (T_e, d_in)

so backward keeps ``h_e = dropout(x_e) A_e^T`` (T_e, r) and a seed, never the routed copies of x (T_e, d_in): in a
MoE each token is copied to k experts, which is where LoRA's activation memory grows most. PEFT adapts experts
through a delta weight per expert (``target_parameters``) and only without dropout; here dropout keeps a seed as
in ``LoraFALinear``. The tokens are routed as transformers' eager experts forward does (one pass per expert that
received tokens), and the base's own gate (``_compat.experts_gate``), activation and post-expert norm are used.

B's gradient correction is per expert: ``g_B,e (A_e A_e^T)^{-1} / s^2``, one batched product over (E, d_out, r)
(``lightning_lorafa.adapters.correction``, in the optimizer step or, with ``correct_in_backward``, in backward).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from lightning_lorafa import _compat
from lightning_lorafa.adapters.base import LoraFAAdapter, add_lora_fa_branch
from lightning_lorafa.adapters.dropout_masks import keep_scale
from lightning_lorafa.settings import check_adapter_arguments, scaling

#: The flags transformers' experts interface sets on an experts module.
EXPERTS_FLAGS = ("has_gate", "has_bias", "is_transposed")


def expert_projections(experts: nn.Module) -> list[str]:
    """The names of the 3D projection parameters of a fused experts module, in call order."""
    return ["gate_up_proj" if experts.has_gate else "up_proj", "down_proj"]


def is_fused_experts(module: nn.Module) -> bool:
    """Whether ``module`` is an experts module of transformers' experts interface that ``LoraFAExperts`` adapts:
    the interface's flags set, ``num_experts``, and 3D floating-point projection parameters with E experts."""
    if isinstance(module, LoraFAExperts) or not all(hasattr(module, flag) for flag in EXPERTS_FLAGS):
        return False
    num_experts = getattr(module, "num_experts", None)
    if not isinstance(num_experts, int) or not callable(getattr(module, "act_fn", None)):
        return False
    for name in expert_projections(module):
        param = getattr(module, name, None)
        if not isinstance(param, nn.Parameter) or param.ndim != 3 or param.shape[0] != num_experts:
            return False
        if not param.is_floating_point():
            return False
    return True


def fused_expert_like_parameters(model: nn.Module) -> list[str]:
    """Names of parameters that look like fused experts of an architecture this library does not know: 3D,
    floating point, more than one entry along the first (experts) dimension, held by a module that is neither one of
    torch's own (a ``Conv1d`` weight is 3D too) nor an experts module that ``is_fused_experts`` recognises."""
    modules = dict(model.named_modules())
    known = [name for name, module in modules.items() if is_fused_experts(module) or isinstance(module, LoraFAExperts)]
    found = []
    for name, param in model.named_parameters():
        owner = name.rpartition(".")[0]
        if param.ndim != 3 or not param.is_floating_point() or param.shape[0] < 2:
            continue
        if type(modules[owner]).__module__.startswith("torch.nn"):
            continue
        if not any(owner == k or owner.startswith(k + ".") for k in known):
            found.append(name)
    return found


def expert_features(experts: nn.Module, name: str) -> tuple[int, int]:
    """``(d_in, d_out)`` of the projection ``name`` of a fused experts module."""
    shape = getattr(experts, name).shape
    return (shape[1], shape[2]) if experts.is_transposed else (shape[2], shape[1])


class ExpertsAdapter(LoraFAAdapter):
    """The LoRA-FA adapters of one fused projection of E experts: frozen A (E, r, d_in), trainable B (E, d_out, r);
    expert e's A is drawn from ``expert_seed(seed, e)``. Attributes: those of ``LoraFAAdapter``."""

    def __init__(
        self,
        num_experts: int,
        d_in: int,
        d_out: int,
        r: int,
        alpha: float,
        dropout: float,
        use_rslora: bool,
        seed: int,
        init_a: str,
        factory: dict,
    ) -> None:
        super().__init__((num_experts,), d_in, d_out, r, alpha, dropout, use_rslora, seed, init_a, factory)


class _RecomputedActivation(torch.autograd.Function):
    """``activation(y)`` that keeps only its input y and runs the activation again in backward.

    For an expert's gate (``act(gate) * up`` of the gate/up output, (T_e, 2I)): autograd would keep the gate,
    ``act(gate)`` and up; this keeps y, which holds the first and the last, and recomputes ``act(gate)``: one
    elementwise pass more in backward for a third less of the expert's saved activations."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, activation) -> torch.Tensor:
        ctx.save_for_backward(y)
        ctx.activation = activation
        return activation(y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (y,) = ctx.saved_tensors
        with torch.enable_grad():
            y = y.detach().requires_grad_(True)
            out = ctx.activation(y)
        (grad_y,) = torch.autograd.grad(out, y, grad)
        return grad_y, None


class LoraFAExperts(nn.Module):
    """A frozen fused experts module with LoRA-FA adapters on each expert's projections.

    Args:
        base: an experts module that ``is_fused_experts`` accepts; its parameters are frozen.
        r, alpha, dropout, use_rslora, seed, init_a: as for ``LoraFALinear``; the i-th projection (gate/up, then
            down) draws its A's from ``seed + i``, expert e's from ``expert_seed(seed + i, e)``.

    Called like the base: ``(hidden (T, H), top_k_index (T, k), top_k_weights (T, k)) -> (T, H)``.

    Attributes:
        adapters: ``ModuleDict`` projection name -> ``ExpertsAdapter``.
        merged: whether every ``s B_e A_e`` is folded into the base's parameters.
    """

    def __init__(
        self,
        base: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        seed: int = 0,
        init_a: str = "kaiming",
    ) -> None:
        super().__init__()
        check_adapter_arguments(type(self).__name__, r, alpha, dropout, use_rslora, seed, init_a)
        if not is_fused_experts(base):
            raise TypeError(
                "LoraFAExperts adapts fused experts modules (transformers' experts interface), got "
                f"{type(base).__name__}."
            )
        self.r, self.alpha, self.dropout, self.use_rslora = r, alpha, float(dropout), use_rslora
        self.seed, self.init_a, self.scaling = seed, init_a, scaling(alpha, r, use_rslora)
        self.base = base
        self.base.requires_grad_(False)
        adapters = {}
        for index, name in enumerate(expert_projections(base)):
            d_in, d_out = expert_features(base, name)
            if r > min(d_in, d_out):
                raise ValueError(
                    f"r={r} exceeds min(d_in, d_out)={min(d_in, d_out)} of the experts' {name} ({d_in} -> {d_out}); "
                    "choose a smaller r, or leave the experts out (exclude=[...])."
                )
            weight = getattr(base, name)
            factory = {"device": weight.device, "dtype": weight.dtype}
            adapters[name] = ExpertsAdapter(
                base.num_experts, d_in, d_out, r, alpha, dropout, use_rslora, (seed + index) % 2**63, init_a, factory
            )
        self.adapters = nn.ModuleDict(adapters)

    @property
    def merged(self) -> bool:
        """Whether every ``s B_e A_e`` is folded into the base's parameters."""
        return all(adapter.merged for adapter in self.adapters.values())

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Every adapter as freshly drawn (A from its seeds, B zero); the base is left alone."""
        for adapter in self.adapters.values():
            adapter.reset_parameters()

    @property
    def num_experts(self) -> int:
        return self.base.num_experts

    def _project(
        self, name: str, x: torch.Tensor, expert: int, operands: tuple[torch.Tensor, torch.Tensor], p: float
    ) -> torch.Tensor:
        """Expert ``expert``'s projection ``name`` of its tokens x (T_e, d_in), with the LoRA-FA branch."""
        base = self.base
        weight = getattr(base, name)[expert]
        y = x @ weight if base.is_transposed else F.linear(x, weight)
        if base.has_bias:
            y = y + getattr(base, f"{name}_bias")[expert]
        scaled_A, lora_B = operands
        return add_lora_fa_branch(y, x, scaled_A[expert], lora_B[expert], p)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """hidden (T, H), top_k_index (T, k), top_k_weights (T, k) -> (T, H).

        The S = T * k (token, expert) pairs are sorted by expert; each expert that received tokens runs on its
        contiguous rows of the gathered inputs (T_e, H), in the order transformers' eager experts forward takes
        them, and the weighted outputs (S, H) return to (k, token) order and are summed over k, as its grouped
        forward does (exactly the eager result for k = 2, where the order of a two-term sum does not matter).
        Autograd keeps, per pair, the gate/up output (the gate itself is recomputed in backward), the expert's
        output for the routing weight, and the adapters' ``h``; never the gathered inputs.
        """
        base = self.base
        if self.merged:
            return base(hidden_states, top_k_index, top_k_weights)
        p = self.dropout if self.training else 0.0
        scale = self.scaling * keep_scale(p)
        up_name, down_name = expert_projections(base)
        up_ops = self.adapters[up_name].branch_operands(hidden_states, scale)
        down_ops = self.adapters[down_name].branch_operands(hidden_states, scale)
        num_tokens, top_k = top_k_index.shape
        expert_ids = top_k_index.t().reshape(-1)  # (S,) in (k, token) order: each expert's rows as eager's
        sorted_ids, order = torch.sort(expert_ids, stable=True)
        counts = torch.bincount(sorted_ids, minlength=self.num_experts + 1).tolist()  # one host sync, as eager's
        gathered = hidden_states[order % num_tokens]  # (S, H): indexing keeps the indices, not the rows
        gate = _compat.experts_gate(base) if base.has_gate else base.act_fn
        outputs, start = [], 0
        for expert, count in enumerate(counts[: self.num_experts]):
            if count == 0:
                continue
            x = gathered[start : start + count]
            start += count
            y = self._project(up_name, x, expert, up_ops, p)
            y = _RecomputedActivation.apply(y, gate) if y.requires_grad else gate(y)
            y = self._project(down_name, y, expert, down_ops, p)
            if getattr(base, "has_post_expert_norm", False):
                y = base.post_expert_norm(y)
            outputs.append(y)
        kept = start  # pairs past the experts (expert-parallel sentinels) contribute nothing
        out = torch.cat(outputs) if outputs else hidden_states.new_zeros(0, hidden_states.shape[-1])
        weights = top_k_weights.t().reshape(-1)[order[:kept]]
        out = out * weights[:, None].to(out.dtype)  # (kept, H)
        if kept < expert_ids.numel():
            out = torch.cat([out, out.new_zeros(expert_ids.numel() - kept, out.shape[-1])])
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return out[inverse].view(top_k, num_tokens, -1).sum(dim=0).to(hidden_states.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold every expert's ``s B_e A_e`` into the base's projections (no-op if merged)."""
        self._fold(1.0)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the folded deltas again (no-op if not merged)."""
        self._fold(-1.0)

    def _fold(self, sign: float) -> None:
        for name, adapter in self.adapters.items():
            if adapter.merged != (sign > 0):
                weight = getattr(self.base, name)
                weight.copy_(adapter.merged_weight(weight, sign, self.base.is_transposed))
                adapter.merged = sign > 0

    def folded_state(self, state: dict, prefix: str) -> dict:
        """``state`` with this module's entries (keys starting with ``prefix``) replaced by those of its plain base
        with every expert's adapter folded in: the adapters dropped, ``<prefix>base.<name>`` renamed
        ``<prefix><name>``, ``s B_e A_e`` added to each projection (unless merged already)."""
        adapters_prefix = prefix + "adapters."
        if not any(key.startswith(adapters_prefix) for key in state):
            return state
        base_prefix, folded = prefix + "base.", {}
        for key, tensor in state.items():
            if key.startswith(adapters_prefix):
                continue
            if key.startswith(base_prefix):
                name = key[len(base_prefix) :]
                adapter = self.adapters[name] if name in self.adapters else None
                if adapter is not None and not adapter.merged:
                    tensor = adapter.merged_weight(tensor, 1.0, self.base.is_transposed)
                key = prefix + name
            folded[key] = tensor
        return folded

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, "
            f"dropout={self.dropout}, merged={self.merged}"
        )
