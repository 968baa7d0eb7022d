"""LoRA-FA on fused MoE experts (transformers 5's 3D expert parameters): Mixtral, Qwen2-MoE, Qwen3-MoE."""

from __future__ import annotations

import copy
import logging
import sys
from pathlib import Path

import pytest
import torch
from conftest import randomize_lora_B
from torch import nn

from lightning_lorafa import apply_lorafa, create_lorafa_optimizer, load_adapter, merge_lorafa, save_adapter
from lightning_lorafa.adapters.correction import GradientCorrection
from lightning_lorafa.adapters.experts import LoraFAExperts
from lightning_lorafa.adapters.find import lorafa_experts
from lightning_lorafa.adapters.initialization import draw_lora_A, expert_seed
from lightning_lorafa.lightning.strategies import correct_experts_in_backward
from lightning_lorafa.model.dropouts import keep_dropout_seeds
from lightning_lorafa.model.merge import merged_state_dict
from lightning_lorafa.model.optim import lora_layers_by_parameter
from lightning_lorafa.profiling import measure_saved_activations

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from models_table import ARCHS, build  # noqa: E402

MOE = ["Mixtral", "Qwen2-MoE", "Qwen3-MoE"]


def eager(model: nn.Module) -> nn.Module:
    """``model`` running transformers' eager experts forward (the reference our expert loop follows)."""
    model.set_experts_implementation("eager")
    return model


def record_routing(model: nn.Module, sequence_length: int) -> tuple[dict[str, set[int]], list]:
    """``(hit, hooks)``: ``hit`` collects, per experts module, the experts that receive tokens which reach a causal
    LM's loss (every position but the last of each sequence, whose prediction has no label) while the hooks are
    registered."""
    hit: dict[str, set[int]] = {}

    def hook(name: str):
        def record(module, args):
            routed = args[1].view(-1, sequence_length, args[1].shape[-1])[:, :-1]
            hit.setdefault(name, set()).update(routed.flatten().tolist())

        return record

    return hit, [module.register_forward_pre_hook(hook(name)) for name, module in lorafa_experts(model).items()]


@pytest.mark.parametrize("name", MOE)
def test_experts_are_adapted_and_the_output_at_init_is_the_eager_output_bit_for_bit(name, caplog):
    model = build(name, 0.1)
    with caplog.at_level(logging.INFO, logger="lightning_lorafa"):
        names = apply_lorafa(model, r=4, alpha=8, dropout=0.1)
    experts = lorafa_experts(model)
    assert sorted(experts) == [f"model.layers.{i}.mlp.experts" for i in range(2)]
    assert set(experts) <= set(names)
    assert {f"model.layers.{i}.mlp.gate" for i in range(2)} <= set(names)  # the routers too (test_router.py)
    assert not [r for r in caplog.records if "MoE routers" in r.getMessage()]  # none left out
    layer = experts["model.layers.0.mlp.experts"]
    num_experts, hidden = layer.num_experts, model.config.hidden_size
    # trainable: B (E, d_out, r) of both projections; A frozen buffers (E, r, d_in)
    gate_up, down = layer.adapters["gate_up_proj"], layer.adapters["down_proj"]
    assert gate_up.lora_B.shape == (num_experts, layer.base.gate_up_proj.shape[1], 4) and gate_up.lora_B.requires_grad
    assert down.lora_A.shape == (num_experts, 4, layer.base.down_proj.shape[2]) and not down.lora_A.requires_grad
    assert down.lora_B.shape == (num_experts, hidden, 4)
    assert not any(p.requires_grad for p in layer.base.parameters())

    batch = ARCHS[name].batch()
    reference = eager(build(name, 0.1))
    assert torch.equal(model(**batch).logits, reference(**batch).logits)
    default = build(name, 0.1)  # transformers' default experts implementation (grouped_mm) rounds otherwise
    torch.testing.assert_close(model(**batch).logits, default(**batch).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["Mixtral", "Qwen3-MoE"])
def test_only_B_of_the_experts_that_received_tokens_moves(name):
    model = build(name, 0.1)
    apply_lorafa(model, r=4, alpha=8, dropout=0.1)
    model.train()
    batch = ARCHS[name].batch()
    batch = {key: value[:1, :3] for key, value in batch.items()}  # 2 tokens in the loss, top-2 of 4 experts
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    hit, hooks = record_routing(model, 3)  # the routing of later steps changes as the attention's B moves
    for _ in range(2):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for hook in hooks:
        hook.remove()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    some_idle = False
    for module_name, experts in lorafa_experts(model).items():
        for adapter in experts.adapters.values():
            moved = {e for e in range(experts.num_experts) if adapter.lora_B[e].abs().sum() > 0}
            assert moved == hit[module_name], (module_name, moved, hit[module_name])
            some_idle |= len(moved) < experts.num_experts
    assert some_idle  # the batch leaves some expert without tokens, so the test can tell


def _block_and_input(name: str) -> tuple[nn.Module, torch.Tensor]:
    model = build(name, 0.1)
    torch.manual_seed(0)
    return model.model.layers[0].mlp, torch.randn(4, 64, model.config.hidden_size, requires_grad=True)


#: MoE blocks at a sixteenth of real widths: Mixtral-8x7B (4096 / 14336, 8 experts, top-2) and Qwen3-30B-A3B
#: (2048 / 768, 128 experts, top-8; here 32 experts).
BLOCKS = {
    "Mixtral": dict(hidden_size=256, intermediate_size=896, num_local_experts=8, num_experts_per_tok=2),
    "Qwen3-MoE": dict(hidden_size=128, moe_intermediate_size=48, num_experts=32, num_experts_per_tok=8),
}


def sparse_block(name: str) -> nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    if name == "Mixtral":
        return tf.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock(tf.MixtralConfig(**BLOCKS[name]))
    return tf.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock(tf.Qwen3MoeConfig(**BLOCKS[name]))


@pytest.mark.parametrize("name", ["Mixtral", "Qwen3-MoE"])
def test_the_experts_keep_h_and_seeds_never_the_routed_inputs(name):
    from peft import LoraConfig, get_peft_model

    block = sparse_block(name)
    x = torch.randn(2, 64, block.experts.gate_up_proj.shape[-1], generator=torch.Generator().manual_seed(0))
    x.requires_grad_(True)
    ours = copy.deepcopy(block).train()
    apply_lorafa(ours, r=4, alpha=8, dropout=0.1, target_modules=["experts"])
    keep_dropout_seeds(ours)
    report = measure_saved_activations(lambda: ours(x).sum(), module=ours)
    pairs = x.shape[0] * x.shape[1] * ours.gate.top_k  # (token, expert) pairs
    calls = 2 * len(routed_experts_of_block(ours, x))  # one branch per projection per expert with tokens
    # per (token, expert) pair, each projection's branch keeps h (r floats); each call one 8-byte dropout seed
    assert report.by_op["lora_fa_branch"] == 2 * pairs * 4 * 4 and report.by_op["dropout seed"] == 8 * calls

    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=[], target_parameters=["experts.gate_up_proj", "experts.down_proj"]
    )
    theirs = get_peft_model(copy.deepcopy(block), config).train()  # PEFT: dropout 0, which its ParamWrapper needs
    peft = measure_saved_activations(lambda: theirs(x).sum(), module=theirs)
    assert report.total_bytes <= 0.5 * peft.total_bytes, report.total_bytes / peft.total_bytes


def routed_experts_of_block(block: nn.Module, x: torch.Tensor) -> set[int]:
    _, _, top_k_index = block.gate(x.reshape(-1, x.shape[-1]))
    return set(top_k_index.flatten().tolist())


@pytest.mark.parametrize("name", ["Mixtral", "Qwen2-MoE"])
def test_output_and_B_gradient_equal_peft_lora_on_the_same_A_and_B(name):
    """At dropout 0 PEFT's ParamWrapper computes the same function; with ours' A and B copied in (PEFT's
    A (E * r, d_in), B (d_out, E * r)), outputs and B's raw gradients agree."""
    from peft import LoraConfig, get_peft_model

    block, x = _block_and_input(name)
    ours = copy.deepcopy(block).train()
    apply_lorafa(ours, r=4, alpha=8, target_modules=["experts"])
    randomize_lora_B(ours)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=[], target_parameters=["experts.gate_up_proj", "experts.down_proj"]
    )
    theirs = get_peft_model(copy.deepcopy(block), config).train()
    wrappers = {
        "gate_up_proj": theirs.base_model.model.experts.base_layer,
        "down_proj": theirs.base_model.model.experts,
    }
    adapters = ours.experts.adapters
    with torch.no_grad():
        for projection, wrapper in wrappers.items():
            num_experts, d_out, r = adapters[projection].lora_B.shape
            wrapper.lora_A["default"].weight.copy_(adapters[projection].lora_A.reshape(num_experts * r, -1))
            wrapper.lora_B["default"].weight.copy_(adapters[projection].lora_B.permute(1, 2, 0).reshape(d_out, -1))
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    mine, peft = ours(x), theirs(x)
    torch.testing.assert_close(mine, peft, rtol=1e-5, atol=1e-6)
    ((mine - target) ** 2).sum().backward()
    ((peft - target) ** 2).sum().backward()
    for projection, wrapper in wrappers.items():
        grad = adapters[projection].lora_B.grad
        num_experts, d_out, r = grad.shape
        theirs_grad = wrapper.lora_B["default"].weight.grad.reshape(d_out, r, num_experts).permute(2, 0, 1)
        torch.testing.assert_close(grad, theirs_grad, rtol=1e-4, atol=1e-5)


def test_gradient_correction_is_per_expert_in_the_optimizer_and_in_backward():
    block, x = _block_and_input("Mixtral")
    models = [copy.deepcopy(block).train() for _ in range(2)]
    for model in models:
        apply_lorafa(model, r=4, alpha=8, target_modules=["experts"])
        randomize_lora_B(model)
    raw, in_backward = models
    correct_experts_in_backward(in_backward)
    for model in models:
        model(x).pow(2).sum().backward()
    layers = lora_layers_by_parameter(raw)
    raw_grads = {projection: a.lora_B.grad.clone() for projection, a in raw.experts.adapters.items()}
    assert GradientCorrection(layers).correct(list(layers)) == 2
    for projection, adapter in raw.experts.adapters.items():
        a, s = adapter.lora_A.double(), adapter.scaling
        expected = raw_grads[projection].double() @ torch.linalg.inv(a @ a.mT) / s**2  # (E, d_out, r) @ (E, r, r)
        torch.testing.assert_close(adapter.lora_B.grad.double(), expected, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(in_backward.experts.adapters[projection].lora_B.grad, adapter.lora_B.grad)
    # the optimizer leaves gradients corrected in backward alone
    assert (
        GradientCorrection(lora_layers_by_parameter(in_backward)).correct(list(lora_layers_by_parameter(in_backward)))
        == 0
    )


def test_lorafa_optimizer_trains_the_experts():
    model = build("Qwen3-MoE", 0.0)
    apply_lorafa(model, r=4, alpha=8)
    model.train()
    batch = ARCHS["Qwen3-MoE"].batch()
    optimizer = create_lorafa_optimizer(model, lr=1e-2)
    losses = []
    for _ in range(3):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_a_is_drawn_per_expert_from_its_seed_and_meta_device_init_gives_the_same_adapters():
    model = build("Mixtral", 0.0)
    apply_lorafa(model, r=4, alpha=8, seed=5)
    adapter = lorafa_experts(model)["model.layers.0.mlp.experts"].adapters["down_proj"]
    for expert in range(adapter.lora_A.shape[0]):
        assert torch.equal(
            adapter.lora_A[expert], draw_lora_A(4, adapter.lora_A.shape[2], expert_seed(adapter.seed, expert))
        )
    assert not torch.equal(adapter.lora_A[0], adapter.lora_A[1])
    assert torch.count_nonzero(adapter.lora_B) == 0

    with torch.device("meta"):
        meta = ARCHS["Mixtral"].build(0.0)
    apply_lorafa(meta, r=4, alpha=8, seed=5)
    meta.to_empty(device="cpu")
    for module in meta.modules():
        if isinstance(module, LoraFAExperts):
            module.reset_parameters()
    cpu_state = {k: v for k, v in model.state_dict().items() if ".adapters." in k}
    meta_state = {k: v for k, v in meta.state_dict().items() if ".adapters." in k}
    assert cpu_state.keys() == meta_state.keys() and len(cpu_state) == 8
    assert all(torch.equal(cpu_state[k], meta_state[k]) for k in cpu_state)


def test_merge_unmerge_merged_export_and_adapter_checkpoint(tmp_path):
    name = "Qwen3-MoE"
    batch = ARCHS[name].batch()
    model = build(name, 0.0)
    apply_lorafa(model, r=4, alpha=8)
    randomize_lora_B(model)
    expected = model(**batch).logits
    base_weight = model.model.layers[0].mlp.experts.base.down_proj.detach().clone()

    save_adapter(model, tmp_path / "adapter.pt")
    fresh = build(name, 0.0)
    apply_lorafa(fresh, r=4, alpha=8)
    load_adapter(fresh, tmp_path / "adapter.pt")
    assert torch.equal(fresh(**batch).logits, expected)

    state = merged_state_dict(model)
    plain = build(name, 0.0)
    plain.load_state_dict(state)  # strict: the merged keys are transformers' own
    torch.testing.assert_close(plain(**batch).logits, expected, rtol=1e-5, atol=1e-5)

    experts = lorafa_experts(model)["model.layers.0.mlp.experts"]
    experts.merge()
    torch.testing.assert_close(model(**batch).logits, expected, rtol=1e-5, atol=1e-5)
    experts.unmerge()
    torch.testing.assert_close(experts.base.down_proj, base_weight, rtol=0, atol=1e-6)
    merged = merge_lorafa(model)
    assert not lorafa_experts(merged) and type(merged.model.layers[0].mlp.experts).__name__ == "Qwen3MoeExperts"
    torch.testing.assert_close(merged(**batch).logits, expected, rtol=1e-5, atol=1e-5)


def test_r_above_an_expert_projection_is_refused_with_its_name():
    model = build("Mixtral", 0.0)
    with pytest.raises(ValueError, match=r"r=40 exceeds.*model\.layers\[0\]\.mlp\.experts \(32 -> 128\)"):
        apply_lorafa(model, r=40, target_modules=["experts"])
    assert not lorafa_experts(model)


class UnknownMoE(nn.Module):
    """Fused experts stored as a 3D parameter outside transformers' experts interface."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.expert_weights = nn.Parameter(torch.randn(4, 8, 8))

    def forward(self, x):
        return self.proj(x) + torch.einsum("bi,eoi->bo", x, self.expert_weights)


def test_parameters_that_look_like_fused_experts_of_an_unknown_architecture_are_warned_about():
    model = UnknownMoE()
    with pytest.warns(UserWarning, match=r"look like fused MoE experts.*stay frozen: expert_weights\."):
        apply_lorafa(model, r=2, alpha=4)
    assert model.lorafa_config.target_modules == ["proj"]


def test_ddp_skips_every_experts_A_in_its_buffer_broadcast():
    from lightning_lorafa import _compat
    from lightning_lorafa.lightning.strategies import keep_lora_A_out_of_ddp_buffer_sync

    model = build("Qwen2-MoE", 0.0)
    apply_lorafa(model, r=4, alpha=8)
    names = keep_lora_A_out_of_ddp_buffer_sync(model)
    expert_As = {n for n, _ in model.named_buffers() if ".experts.adapters." in n and n.endswith("lora_A")}
    assert len(expert_As) == 4 and expert_As <= set(names) == set(_compat.ddp_ignored_names(model))
    assert {n for n, _ in model.named_buffers() if n.endswith("lora_A")} == set(names)


def test_the_gate_without_transformers_apply_gate_is_its_documented_default():
    from lightning_lorafa import _compat

    experts = build("Mixtral").model.layers[0].mlp.experts
    gate_up = torch.randn(5, experts.gate_up_proj.shape[1], generator=torch.Generator().manual_seed(0))
    plain = nn.Module()  # an experts module from a transformers version without _apply_gate
    plain.act_fn = experts.act_fn
    torch.testing.assert_close(_compat.experts_gate(plain)(gate_up), experts._apply_gate(gate_up), rtol=0, atol=0)
    plain.is_concatenated = False
    with pytest.raises(TypeError, match="interleaves its gate and up rows"):
        _compat.experts_gate(plain)


def test_routers_train_fully_when_named_in_modules_to_save(caplog):
    model = build("Mixtral", 0.0)
    with caplog.at_level(logging.INFO, logger="lightning_lorafa"):
        apply_lorafa(model, r=4, alpha=8, modules_to_save=["gate"])
    assert not [r for r in caplog.records if "MoE routers" in r.getMessage()]  # not called frozen
    routers = [f"model.layers.{i}.mlp.gate" for i in range(2)]
    assert model.lorafa_config.modules_to_save == routers
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {f"{r}.weight" for r in routers} <= trainable
    assert all(n.endswith("lora_B") or n.endswith("gate.weight") for n in trainable)
    before = model.model.layers[0].mlp.gate.weight.detach().clone()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**ARCHS["Mixtral"].batch()).loss.backward()
    optimizer.step()
    assert not torch.equal(model.model.layers[0].mlp.gate.weight, before)


def test_the_merged_export_loads_with_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    from lightning_lorafa.tasks.export import save_merged

    model = build("Mixtral", 0.0)
    apply_lorafa(model, r=4, alpha=8)
    randomize_lora_B(model)
    batch = ARCHS["Mixtral"].batch()
    expected = model(**batch).logits
    save_merged(model, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert type(plain.model.layers[0].mlp.experts).__name__ == "MixtralExperts"
    torch.testing.assert_close(plain(**batch).logits, expected, rtol=1e-5, atol=1e-5)
