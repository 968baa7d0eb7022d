"""LoRA-FA on transformers' ``Conv1D`` (GPT-2's linears, weight stored (d_in, d_out)), and narrow layers."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import VOCAB, randomize_lora_B
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from lightning_lorafa import (
    LoraFALinear,
    apply_lorafa,
    count_parameters,
    export_peft,
    load_adapter,
    merge_lorafa,
    save_adapter,
)
from lightning_lorafa.adapters.find import lorafa_layers
from lightning_lorafa.model.select import find_target_modules
from lightning_lorafa.profiling import measure_saved_activations

GPT2_TARGETS = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config).eval()


def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))


def test_conv1d_layer_computes_the_transposed_linear_plus_branch():
    torch.manual_seed(0)
    base = Conv1D(24, 16)  # nf=24 (d_out), nx=16 (d_in): weight (16, 24)
    layer = LoraFALinear(base, r=4, alpha=8)
    assert layer.fan_in_fan_out and (layer.in_features, layer.out_features) == (16, 24)
    assert layer.lora_A.shape == (4, 16) and layer.lora_B.shape == (24, 4)
    randomize_lora_B(layer)
    x = torch.randn(3, 5, 16)
    expected = x @ base.weight + base.bias + 2.0 * (x @ layer.lora_A.t()) @ layer.lora_B.t()
    torch.testing.assert_close(layer(x), expected)
    assert not base.weight.requires_grad and not base.bias.requires_grad


def test_conv1d_keeps_h_and_a_seed_never_x():
    torch.manual_seed(0)
    layer = LoraFALinear(Conv1D(24, 16), r=4, alpha=8, dropout=0.1).train()
    x = torch.randn(2, 5, 16, requires_grad=True)  # an input that needs a gradient: W, A, B are kept, not x
    report = measure_saved_activations(lambda: layer(x).sum(), module=layer)
    assert sorted((t.shape, t.nbytes) for t in report.tensors if not t.is_weight) == [((), 8), ((10, 4), 10 * 4 * 4)]
    assert report.total_bytes == 10 * 4 * 4 + 8


def test_all_linear_finds_gpt2_conv1d_like_peft():
    from peft import LoraConfig, get_peft_model

    model = tiny_gpt2()
    names = find_target_modules(model, "all-linear")
    assert names == [f"transformer.h.{i}.{t}" for i in range(2) for t in GPT2_TARGETS]
    peft_model = get_peft_model(tiny_gpt2(), LoraConfig(r=4, target_modules="all-linear"))
    peft_names = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert set(names) == {n for n in peft_names if not n.endswith((".lora_A", ".lora_B"))}
    apply_lorafa(model, r=4)
    # B: r * sum(d_out) = 4 * (96 + 32 + 128 + 32) per block
    assert count_parameters(model)[0] == 2 * 4 * (96 + 32 + 128 + 32)


def test_gpt2_starts_equal_merges_and_unmerges():
    reference, model = tiny_gpt2(), tiny_gpt2()
    apply_lorafa(model, r=4, alpha=8, dropout=0.1)
    torch.testing.assert_close(model(ids()).logits, reference(ids()).logits, rtol=0, atol=0)
    randomize_lora_B(model)
    expected = model(ids()).logits
    layer = lorafa_layers(model)["transformer.h.0.attn.c_attn"]
    weight = layer.base.weight.clone()
    layer.merge()
    torch.testing.assert_close(layer.base.weight, weight + (layer.lora_B @ layer.lora_A).t() * layer.scaling)
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, weight, rtol=0, atol=1e-6)
    merged = merge_lorafa(model)
    assert type(merged.transformer.h[0].attn.c_attn) is Conv1D and not lorafa_layers(merged)
    torch.testing.assert_close(merged(ids()).logits, expected, rtol=1e-5, atol=4e-6)


def test_gpt2_trains_only_B():
    model = tiny_gpt2().train()
    apply_lorafa(model, r=4, alpha=8, dropout=0.1)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not n.endswith("lora_B")}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(ids(), labels=ids()).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(layer.lora_B.abs().sum() > 0 for layer in lorafa_layers(model).values())


def test_gpt2_adapter_checkpoint_and_peft_export_with_fan_in_fan_out(tmp_path):
    from peft import PeftModel

    tiny_gpt2().save_pretrained(tmp_path / "base")
    model = GPT2LMHeadModel.from_pretrained(tmp_path / "base").eval()
    apply_lorafa(model, r=4, alpha=8)
    randomize_lora_B(model)
    expected = model(ids()).logits

    save_adapter(model, tmp_path / "adapter")
    fresh = load_adapter(GPT2LMHeadModel.from_pretrained(tmp_path / "base").eval(), tmp_path / "adapter")
    torch.testing.assert_close(fresh(ids()).logits, expected, rtol=0, atol=0)

    export_peft(model, tmp_path / "peft", str(tmp_path / "base"), task_type="CAUSAL_LM")
    base = GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    peft_model = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    peft_layer = peft_model.base_model.model.transformer.h[0].attn.c_attn
    assert peft_layer.fan_in_fan_out
    torch.testing.assert_close(peft_model(ids()).logits, expected, rtol=1e-5, atol=1e-5)
    merged = peft_model.merge_and_unload()
    torch.testing.assert_close(merged(ids()).logits, expected, rtol=1e-5, atol=4e-6)


class GatedNet(nn.Module):
    """Qwen2-MoE's shape: a hidden -> 1 gate beside full-width linears."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(16, 32)
        self.gate = nn.Linear(16, 1)
        self.down = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x))) * torch.sigmoid(self.gate(x))


def test_all_linear_skips_layers_narrower_than_r_and_logs_them(caplog):
    model = GatedNet()
    with caplog.at_level(logging.INFO, logger="lightning_lorafa.model.select"):
        names = apply_lorafa(model, r=4, modules_to_save=[])  # down, its output layer, would train fully by default
    assert names == ["up", "down"] and type(model.gate) is nn.Linear
    assert "all-linear leaves gate (16 -> 1) out: a gate narrower than r=4" in caplog.text
    assert apply_lorafa(GatedNet(), r=1, modules_to_save=[]) == ["up", "gate", "down"]  # r=1 fits the gate


def test_an_explicit_narrow_target_is_still_refused():
    model = GatedNet()
    with pytest.raises(ValueError, match=r"r=4 exceeds min\(in_features, out_features\) of: gate \(16 -> 1\)"):
        apply_lorafa(model, r=4, target_modules=["up", "gate"])
    assert not lorafa_layers(model)


def test_converted_layers_keep_the_training_mode_of_the_layer_they_replace():
    model = tiny_gpt2()  # eval mode: a dropout on the branch must not run
    apply_lorafa(model, r=4, alpha=8, dropout=0.5)
    assert not any(layer.training for layer in lorafa_layers(model).values())
    randomize_lora_B(model)
    torch.testing.assert_close(model(ids()).logits, model(ids()).logits, rtol=0, atol=0)
