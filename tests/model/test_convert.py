import pytest
import torch
from conftest import TwoLayerNet, randomize_lora_B, tiny_llama, tiny_roberta, tiny_t5
from torch import nn

from lightning_lorafa import LoraFALinear, apply_lorafa, count_parameters, merge_lorafa
from lightning_lorafa.adapters.find import lorafa_layers
from lightning_lorafa.adapters.initialization import layer_seed
from lightning_lorafa.model.select import find_target_modules


def b_parameter_count(model, names, r):
    modules = dict(model.named_modules())
    return r * sum(modules[name].out_features for name in names)


def test_roberta_query_key_value_dense_with_classifier_trained():
    model = tiny_roberta()
    classifier = sum(p.numel() for p in model.classifier.parameters())
    names = apply_lorafa(
        model, r=4, alpha=8, target_modules=["query", "key", "value", "dense"], modules_to_save=["classifier"]
    )
    # per layer: query, key, value, attention.output.dense, intermediate.dense, output.dense
    assert len(names) == 2 * 6
    assert not any(name.startswith("classifier") for name in names)
    trainable, total = count_parameters(model)
    # r * sum(d_out): 4 * (4 * 32 + 64 + 32) per layer, two layers
    assert trainable == 2 * 4 * (4 * 32 + 64 + 32) + classifier
    assert trainable == b_parameter_count(model, names, 4) + classifier
    trainable_names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith("lora_B") or n.startswith("classifier.") for n in trainable_names)
    assert model.lorafa_config.modules_to_save == ["classifier"]


def test_t5_attention_and_ffn():
    model = tiny_t5()
    names = apply_lorafa(model, r=4, target_modules=["q", "k", "v", "o", "wi", "wo"])
    # encoder: 2 x (self-attn 4 + ffn 2); decoder: 2 x (self 4 + cross 4 + ffn 2)
    assert len(names) == 2 * 6 + 2 * 10
    trainable, _ = count_parameters(model)
    # q,k,v,o: d_out 32 (4 heads x 8); wi: 64; wo: 32
    assert trainable == 4 * (2 * (4 * 32 + 64 + 32) + 2 * (8 * 32 + 64 + 32))
    ids = torch.randint(1, 90, (2, 7))
    loss = model(input_ids=ids, labels=ids).loss  # T5's feed-forward reads wo.weight.dtype
    loss.backward()
    assert all(layer.lora_B.grad is not None for layer in lorafa_layers(model).values())


def test_llama_projections():
    model = tiny_llama()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    names = apply_lorafa(model, r=8, target_modules=targets)
    assert len(names) == 2 * 7
    trainable, _ = count_parameters(model)
    # q 32, k 16, v 16 (2 kv heads x 8), o 32, gate 64, up 64, down 32
    assert trainable == 8 * 2 * (32 + 16 + 16 + 32 + 64 + 64 + 32)


def test_all_linear_skips_output_heads():
    llama = tiny_llama()
    names = apply_lorafa(llama, r=2)
    assert "lm_head" not in names and len(names) == 14
    roberta = tiny_roberta()
    head = sum(p.numel() for p in roberta.classifier.parameters())
    names = apply_lorafa(roberta, r=2)
    assert not any(n.startswith("classifier") for n in names) and len(names) == 12
    assert roberta.lorafa_config.modules_to_save == ["classifier"]  # the fresh task head trains by default
    assert count_parameters(roberta)[0] == b_parameter_count(roberta, names, 2) + head
    frozen_head = tiny_roberta()
    names = apply_lorafa(frozen_head, r=2, modules_to_save=[])
    assert frozen_head.lorafa_config.modules_to_save == []
    assert count_parameters(frozen_head)[0] == b_parameter_count(frozen_head, names, 2)


def test_plain_module_and_regex_and_exclude():
    model = TwoLayerNet()
    assert apply_lorafa(model, r=2, target_modules=r"fc\d") == ["fc1", "fc2"]
    model = TwoLayerNet()
    assert apply_lorafa(model, r=2, exclude=["fc2"]) == ["fc1"]  # the output layer trains fully
    assert model.lorafa_config.modules_to_save == ["head"] and model.head.weight.requires_grad
    x = torch.randn(3, 12)
    assert model(x).shape == (3, 3)


def test_A_seeds_are_per_layer_and_reproducible():
    a, b = tiny_llama(), tiny_llama()
    apply_lorafa(a, r=4, seed=11)
    apply_lorafa(b, r=4, seed=11)
    layers_a, layers_b = lorafa_layers(a), lorafa_layers(b)
    assert all(torch.equal(layers_a[n].lora_A, layers_b[n].lora_A) for n in layers_a)
    q0, q1 = layers_a["model.layers.0.self_attn.q_proj"], layers_a["model.layers.1.self_attn.q_proj"]
    assert not torch.equal(q0.lora_A, q1.lora_A)
    assert q0.seed == layer_seed(11, "model.layers.0.self_attn.q_proj")


def test_converted_model_starts_equal_to_base(input_ids):
    base, model = tiny_roberta(), tiny_roberta()
    apply_lorafa(model, r=4, dropout=0.1, modules_to_save=["classifier"])
    torch.testing.assert_close(model(input_ids).logits, base(input_ids).logits)


def test_merge_lorafa_returns_plain_linears_with_equal_outputs(input_ids):
    model = tiny_roberta()
    apply_lorafa(model, r=4)
    randomize_lora_B(model)
    expected = model(input_ids).logits
    merged = merge_lorafa(model)
    assert not lorafa_layers(merged) and not hasattr(merged, "lorafa_config")
    assert type(merged.roberta.encoder.layer[0].attention.self.query) is nn.Linear
    torch.testing.assert_close(merged(input_ids).logits, expected, rtol=1e-5, atol=1e-5)


def unchanged(model, before):
    after = model.state_dict()
    return (
        not lorafa_layers(model)
        and before.keys() == after.keys()
        and all(torch.equal(before[k], after[k]) for k in before)
        and all(p.requires_grad for p in model.parameters())
        and not hasattr(model, "lorafa_config")
    )


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"target_modules": ["qkv"]}, ValueError, r"matches no module.*suffixes \['dense', 'key', 'out_proj'"),
        (
            {"target_modules": ["attention"]},
            TypeError,
            r"adapts nn.Linear layers, transformers' Conv1D, nn.MultiheadAttention \(packed q, k, v\), fused MoE "
            r"experts and MoE routers only.*RobertaAttention",
        ),
        ({"r": 0}, ValueError, r"\(r=0\): r must be >= 1"),
        ({"r": 33}, ValueError, r"exceeds min\(in_features, out_features\)"),
        ({"alpha": -1}, ValueError, "alpha must be > 0"),
        ({"dropout": 1.5}, ValueError, "dropout must be in"),
        ({"modules_to_save": ["head"]}, ValueError, r"modules_to_save entries \['head'\] match no module"),
    ],
)
def test_bad_input_is_rejected_and_model_left_unchanged(kwargs, error, message):
    model = tiny_roberta()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=message):
        apply_lorafa(model, **({"r": 4} | kwargs))
    assert unchanged(model, before)


def test_r_too_large_for_one_layer_names_it():
    model = tiny_llama()  # k_proj / v_proj have d_out 16
    with pytest.raises(ValueError, match=r"k_proj \(32 -> 16\)"):
        apply_lorafa(model, r=20)


def test_converting_twice_is_rejected():
    model = tiny_roberta()
    apply_lorafa(model, r=4)
    with pytest.raises(ValueError, match="already has 12 LoRA-FA layers"):
        apply_lorafa(model, r=4)


def test_find_target_modules_does_not_change_the_model():
    model = TwoLayerNet()
    assert find_target_modules(model, ["fc1", "head"]) == ["fc1", "head"]
    assert not any(isinstance(m, LoraFALinear) for m in model.modules())


def test_a_model_converted_on_the_meta_device_gets_the_adapters_of_a_cpu_built_one_after_reset(input_ids):
    """Build on meta, convert, ``to_empty``, then every module's ``reset_parameters`` (what FSDP and Lightning's
    ``configure_model`` users do): A from its seed, B zero, as on CPU; the base is then loaded from a checkpoint."""
    cpu = tiny_roberta()
    apply_lorafa(cpu, r=4, alpha=8, init_a="orthogonal")
    with torch.device("meta"):
        meta = tiny_roberta()
    apply_lorafa(meta, r=4, alpha=8, init_a="orthogonal")
    assert all(layer.lora_A.is_meta and layer.lora_B.is_meta for layer in lorafa_layers(meta).values())
    meta.to_empty(device="cpu")
    for module in meta.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    base = {k: v for k, v in cpu.state_dict().items() if not k.endswith(("lora_A", "lora_B"))}
    meta.load_state_dict(base, strict=False)
    for name, layer in lorafa_layers(cpu).items():
        assert torch.equal(lorafa_layers(meta)[name].lora_A, layer.lora_A), name
        assert torch.equal(lorafa_layers(meta)[name].lora_B, torch.zeros_like(layer.lora_B)), name
    for buffer_name, buffer in cpu.named_buffers():
        dict(meta.named_buffers())[buffer_name].copy_(buffer)  # non-persistent buffers are the user's to fill
    torch.testing.assert_close(meta(input_ids).logits, cpu(input_ids).logits, rtol=0, atol=0)
