"""LoRA-FA on MoE routers (``LoraFARouter``): Mixtral's, Qwen2-MoE's and Qwen3-MoE's ``mlp.gate``."""

from __future__ import annotations

import copy
import json
import logging
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import randomize_lora_B
from torch import nn
from torch.nn import functional as F

from lightning_lorafa import LoraFALinear, apply_lorafa, export_peft, load_adapter, merge_lorafa, save_adapter
from lightning_lorafa.adapters.correction import GradientCorrection
from lightning_lorafa.adapters.find import lorafa_experts, lorafa_layers
from lightning_lorafa.adapters.initialization import draw_lora_A
from lightning_lorafa.adapters.router import LoraFARouter, is_router
from lightning_lorafa.model.optim import lora_layers_by_parameter
from lightning_lorafa.profiling import measure_saved_activations

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from models_table import ARCHS, build  # noqa: E402

MOE = ["Mixtral", "Qwen2-MoE", "Qwen3-MoE"]
ROUTERS = [f"model.layers.{i}.mlp.gate" for i in range(2)]


def routers(model: nn.Module) -> dict[str, LoraFARouter]:
    return {name: layer for name, layer in lorafa_layers(model).items() if isinstance(layer, LoraFARouter)}


def peft_adapted_weights(model: nn.Module) -> set[str]:
    """The base weights PEFT LoRA ``all-linear`` adapts, by the base model's parameter names."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import Linear, ParamWrapper

    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
    weights = set()
    for name, module in peft_model.base_model.model.named_modules():
        owner = name.replace(".base_layer", "")
        if isinstance(module, ParamWrapper):
            weights.add(f"{owner}.{module.parameter_name}")
        elif isinstance(module, Linear):
            weights.add(f"{owner}.weight")
    return weights


def lorafa_adapted_weights(model: nn.Module) -> set[str]:
    weights = {f"{name}.weight" for name in lorafa_layers(model)}
    return weights | {f"{name}.{p}" for name, experts in lorafa_experts(model).items() for p in experts.adapters}


@pytest.mark.parametrize("name", MOE)
def test_all_linear_adapts_every_weight_peft_all_linear_adapts_routers_included(name, caplog):
    model = build(name, 0.1)
    with caplog.at_level(logging.INFO, logger="lightning_lorafa"):
        names = apply_lorafa(model, r=4, alpha=8, dropout=0.1)
    assert sorted(routers(model)) == ROUTERS and set(ROUTERS) <= set(names)
    assert not [r for r in caplog.records if "MoE routers" in r.getMessage()]
    theirs = peft_adapted_weights(build(name, 0.1))
    assert {f"{r}.weight" for r in ROUTERS} <= theirs or name == "Qwen2-MoE"
    # all but the gates narrower than r, which PEFT adapts at any r and ours leaves out, each logged by name
    narrow = {f"model.layers.{i}.mlp.shared_expert_gate" for i in range(2)} if name == "Qwen2-MoE" else set()
    assert theirs - lorafa_adapted_weights(model) == {f"{gate}.weight" for gate in narrow}
    assert all(any(f"leaves {gate} (32 -> 1) out" in r.getMessage() for r in caplog.records) for gate in narrow)

    router = routers(model)["model.layers.0.mlp.gate"]
    num_experts, hidden = router.base.weight.shape
    assert router.lora_A.shape == (4, hidden) and not router.lora_A.requires_grad
    assert router.lora_B.shape == (num_experts, 4) and router.lora_B.requires_grad
    assert not router.base.weight.requires_grad
    assert torch.equal(router.lora_A, draw_lora_A(4, hidden, router.seed))


@pytest.mark.parametrize("name", MOE)
def test_the_output_at_init_is_the_models_bit_for_bit_and_the_routers_B_trains(name):
    model = build(name, 0.1)
    reference = build(name, 0.1)
    for m in (model, reference):
        m.set_experts_implementation("eager")
    apply_lorafa(model, r=4, alpha=8, dropout=0.1)
    batch = ARCHS[name].batch()
    assert torch.equal(model.eval()(**batch).logits, reference.eval()(**batch).logits)
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**batch).loss.backward()
    optimizer.step()
    assert all(router.lora_B.abs().sum() > 0 for router in routers(model).values())
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def _router_and_input(name: str) -> tuple[nn.Module, torch.Tensor]:
    model = build(name, 0.0)
    x = torch.randn(24, model.config.hidden_size, generator=torch.Generator().manual_seed(0), requires_grad=True)
    return model.model.layers[0].mlp.gate, x


@pytest.mark.parametrize("name", MOE)
def test_logits_and_B_gradient_equal_peft_lora_on_the_same_A_and_B(name):
    """PEFT adapts the router's weight with a ParamWrapper (a delta weight, dropout 0); with ours' A and B copied
    in, router logits, top-k weights and indices, and B's raw gradient agree."""
    from peft import LoraConfig, get_peft_model

    router, x = _router_and_input(name)
    holder = nn.ModuleDict({"gate": router})  # apply_lorafa replaces children
    ours = copy.deepcopy(holder)
    apply_lorafa(ours, r=4, alpha=8, target_modules=["gate"])
    randomize_lora_B(ours)
    theirs = get_peft_model(
        copy.deepcopy(holder), LoraConfig(r=4, lora_alpha=8, target_modules=[], target_parameters=["gate.weight"])
    )
    wrapper = theirs.base_model.model.gate
    with torch.no_grad():
        wrapper.lora_A["default"].weight.copy_(ours.gate.lora_A)
        wrapper.lora_B["default"].weight.copy_(ours.gate.lora_B)
    mine, peft = ours.gate(x), wrapper(x)
    for a, b in zip(mine, peft, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    target = torch.randn(mine[0].shape, generator=torch.Generator().manual_seed(1))
    (((mine[0] - target) ** 2).sum() + mine[1].sum()).backward()
    (((peft[0] - target) ** 2).sum() + peft[1].sum()).backward()
    torch.testing.assert_close(ours.gate.lora_B.grad, wrapper.lora_B["default"].weight.grad, rtol=1e-5, atol=1e-6)


def test_with_dropout_the_router_computes_what_a_lorafa_linear_on_its_weight_computes():
    """The branch is ``LoraFALinear``'s: with the same A, B and RNG state, the same mask, logits and gradients."""
    router, x = _router_and_input("Mixtral")
    layer = LoraFARouter(router, r=4, alpha=8, dropout=0.25, seed=3).train()
    linear = nn.Linear(*reversed(router.weight.shape), bias=False)
    with torch.no_grad():
        linear.weight.copy_(router.weight)
    reference = LoraFALinear(linear, r=4, alpha=8, dropout=0.25, seed=3).train()
    randomize_lora_B(layer)
    randomize_lora_B(reference)
    assert torch.equal(layer.lora_A, reference.lora_A) and torch.equal(layer.lora_B, reference.lora_B)
    torch.manual_seed(7)
    logits = layer(x)[0]
    torch.manual_seed(7)
    expected = reference(x)
    assert torch.equal(logits, expected)
    logits.pow(2).sum().backward()
    expected.pow(2).sum().backward()
    assert torch.equal(layer.lora_B.grad, reference.lora_B.grad)
    torch.manual_seed(8)
    assert not torch.equal(layer(x)[0], logits)  # another draw drops other entries


def test_the_router_keeps_h_and_a_seed_never_its_input():
    router, x = _router_and_input("Mixtral")
    layer = LoraFARouter(router, r=4, alpha=8, dropout=0.1).train()
    report = measure_saved_activations(lambda: layer(x)[0].sum(), module=layer)
    assert report.by_op["lora_fa_branch"] == x.shape[0] * 4 * 4  # h (T, r) float32
    assert report.by_op["dropout seed"] == 8  # and one 8-byte seed
    frozen = measure_saved_activations(lambda: router(x)[0].sum(), module=router)
    assert report.total_bytes == frozen.total_bytes + x.shape[0] * 4 * 4 + 8


def test_correction_merge_checkpoint_and_peft_export_include_the_routers(tmp_path):
    from peft import PeftModel

    name = "Qwen3-MoE"
    batch = ARCHS[name].batch()
    model = build(name, 0.0)
    apply_lorafa(model, r=4, alpha=8)
    randomize_lora_B(model)
    router = routers(model)["model.layers.0.mlp.gate"]
    assert router.lora_B in lora_layers_by_parameter(model)
    model(**batch).loss.backward()
    raw = router.lora_B.grad.double().clone()
    layers = lora_layers_by_parameter(model)
    GradientCorrection(layers).correct(list(layers))
    a = router.lora_A.double()
    torch.testing.assert_close(router.lora_B.grad.double(), raw @ torch.linalg.inv(a @ a.T) / 2.0**2)
    model.zero_grad()

    expected = model.eval()(**batch).logits
    save_adapter(model, tmp_path / "adapter.pt")
    fresh = build(name, 0.0)
    apply_lorafa(fresh, r=4, alpha=8)
    load_adapter(fresh, tmp_path / "adapter.pt")
    assert torch.equal(fresh.eval()(**batch).logits, expected)

    export_peft(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert {f"{r}.weight" for r in ROUTERS} <= set(config["target_parameters"])
    assert not set(ROUTERS) & set(config["target_modules"])
    peft_model = PeftModel.from_pretrained(build(name, 0.0), tmp_path / "peft").eval()
    torch.testing.assert_close(peft_model(**batch).logits, expected, rtol=1e-5, atol=1e-5)

    weight = router.base.weight.detach().clone()
    router.merge()
    torch.testing.assert_close(router.base.weight, weight + 2.0 * router.lora_B @ router.lora_A)
    torch.testing.assert_close(model(**batch).logits, expected, rtol=1e-5, atol=1e-5)
    router.unmerge()
    torch.testing.assert_close(router.base.weight, weight, rtol=0, atol=1e-6)
    merged = merge_lorafa(model)
    assert type(merged.model.layers[0].mlp.gate).__name__ == "Qwen3MoeTopKRouter"
    torch.testing.assert_close(merged(**batch).logits, expected, rtol=1e-5, atol=1e-5)


def test_routers_correct_in_backward_as_under_fsdp1_like_the_optimizer():
    models = [build("Mixtral", 0.0) for _ in range(2)]
    for model in models:
        apply_lorafa(model, r=4, alpha=8, target_modules=["gate"])
        randomize_lora_B(model)
    raw, in_backward = models
    for router in routers(in_backward).values():
        router.correct_in_backward = True  # what the callback sets on every LoRA-FA linear under FSDP1
    batch = ARCHS["Mixtral"].batch()
    for model in models:
        model(**batch).loss.backward()
    layers = lora_layers_by_parameter(raw)
    GradientCorrection(layers).correct(list(layers))
    for name, router in routers(raw).items():
        torch.testing.assert_close(routers(in_backward)[name].lora_B.grad, router.lora_B.grad)


def test_routers_left_out_are_logged_by_name(caplog):
    model = build("Mixtral", 0.0)
    with caplog.at_level(logging.INFO, logger="lightning_lorafa"):
        apply_lorafa(model, r=4, alpha=8, target_modules=["experts"])
    lines = [r.getMessage() for r in caplog.records if "MoE routers" in r.getMessage()]
    assert len(lines) == 1 and ", ".join(ROUTERS) in lines[0] and "stay frozen" in lines[0]
    assert not routers(model)

    caplog.clear()
    model = build("Mixtral", 0.0)  # 4 experts: at r=8 the router (32 -> 4) is a gate narrower than r
    with caplog.at_level(logging.INFO, logger="lightning_lorafa"):
        apply_lorafa(model, r=8, alpha=8)
    messages = [r.getMessage() for r in caplog.records]
    assert any("leaves model.layers.0.mlp.gate (32 -> 4) out" in m for m in messages), messages
    assert not routers(model)


class MatmulRouter(nn.Module):
    """A router whose logits are ``x @ W^T`` (no F.linear): LoRA-FA cannot find the product."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x @ self.weight.T, dim=-1)


class SwitchableRouter(MatmulRouter):
    def __init__(self) -> None:
        super().__init__()
        self.linear = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(F.linear(x, self.weight) if self.linear else x @ self.weight.T, dim=-1)


def test_only_modules_whose_forward_makes_one_f_linear_call_with_their_weight_are_routers():
    assert is_router(SwitchableRouter())
    assert not is_router(MatmulRouter())
    assert not any(is_router(m) for m in (nn.Linear(16, 4), nn.Embedding(4, 16), nn.LayerNorm(16)))
    model = nn.ModuleDict({"gate": MatmulRouter()})
    with pytest.raises(TypeError, match=r"matched: gate \(MatmulRouter\)"):
        apply_lorafa(model, r=2, target_modules=["gate"])


def test_a_router_that_stops_calling_f_linear_warns_instead_of_training_nothing_silently():
    layer = LoraFARouter(SwitchableRouter(), r=2, alpha=4)
    x = torch.randn(3, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x)
    layer.base.linear = False
    with pytest.warns(UserWarning, match="SwitchableRouter made 0 F.linear calls with its weight"):
        layer(x)


def test_meta_device_conversion_gives_the_routers_of_a_cpu_conversion():
    model = build("Mixtral", 0.0)
    apply_lorafa(model, r=4, alpha=8, seed=5)
    with torch.device("meta"):
        meta = ARCHS["Mixtral"].build(0.0)
    apply_lorafa(meta, r=4, alpha=8, seed=5)
    assert sorted(routers(meta)) == ROUTERS
    meta.to_empty(device="cpu")
    for router in routers(meta).values():
        router.reset_parameters()
    for name, router in routers(model).items():
        assert torch.equal(routers(meta)[name].lora_A, router.lora_A)
        assert torch.count_nonzero(routers(meta)[name].lora_B) == 0
