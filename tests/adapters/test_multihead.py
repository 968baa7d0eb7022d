"""LoRA-FA on torch's ``nn.MultiheadAttention``, ``nn.TransformerEncoder``, ``nn.Transformer`` and Lightning's demo
Transformer: every adapter takes part in the forward, in training and in eval, merged and exported."""

from __future__ import annotations

import copy
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import randomize_lora_B
from lightning.pytorch.demos import Transformer
from peft import PeftModel
from torch import nn

from lightning_lorafa import apply_lorafa, export_peft, load_adapter, merge_lorafa, save_adapter
from lightning_lorafa.adapters.find import lorafa_layers
from lightning_lorafa.adapters.multihead import LoraFAMultiheadAttention
from lightning_lorafa.model.merge import merged_state_dict

E, HEADS = 16, 4


def attention(**kwargs) -> nn.MultiheadAttention:
    torch.manual_seed(0)
    return nn.MultiheadAttention(E, HEADS, **kwargs)


def inputs(batch_first: bool, batched: bool = True, length: int = 5, source: int = 7) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(1)
    shape = (lambda n: (3, n, E) if batch_first else (n, 3, E)) if batched else (lambda n: (n, E))
    return torch.randn(shape(length), generator=generator), torch.randn(shape(source), generator=generator)


def masks(kind: str, length: int = 5, source: int = 7) -> dict:
    padding = torch.zeros(3, source, dtype=torch.bool)
    padding[0, 5:] = True
    if kind == "padding":
        return {"key_padding_mask": padding}
    if kind == "float padding":
        return {"key_padding_mask": torch.zeros(3, source).masked_fill(padding, float("-inf"))}
    if kind == "2d bool":
        return {"attn_mask": torch.rand(length, source, generator=torch.Generator().manual_seed(2)) > 0.8}
    if kind == "3d float":
        return {"attn_mask": torch.randn(3 * HEADS, length, source, generator=torch.Generator().manual_seed(2))}
    if kind == "both":
        return {"key_padding_mask": padding, "attn_mask": torch.zeros(length, source)}
    return {}


CASES = [
    # (module kwargs, call: self / cross (key is value) / separate, masks, need_weights, average, batch_first, batched)
    ({}, "self", "", True, True, False, True),
    ({}, "self", "", False, True, False, True),
    ({"batch_first": True}, "self", "padding", False, True, True, True),
    ({"batch_first": True}, "cross", "float padding", True, False, True, True),
    ({}, "separate", "2d bool", True, True, False, True),
    ({}, "cross", "3d float", False, True, False, True),
    ({"bias": False}, "self", "both", True, True, False, True),
    ({"add_bias_kv": True, "add_zero_attn": True}, "cross", "padding", True, True, False, True),
    ({"batch_first": True}, "self", "", True, True, True, False),
]


def call(module: nn.Module, kind: str, mask: str, need_weights: bool, average: bool, batch_first: bool, batched: bool):
    x, memory = inputs(batch_first, batched)
    if kind == "self":
        query = key = value = memory if mask else x
    elif kind == "cross":
        query, key, value = x, memory, memory
    else:
        query, key, value = x, memory, memory.flip(0)
    length = query.shape[1 if batch_first and batched else 0]
    return module(query, key, value, need_weights=need_weights, average_attn_weights=average, **masks(mask, length))


@pytest.mark.parametrize("kwargs, kind, mask, need_weights, average, batch_first, batched", CASES)
def test_at_init_it_computes_exactly_what_torch_computes(kwargs, kind, mask, need_weights, average, batch_first,
                                                         batched):
    torch_attention = attention(**kwargs).train()  # train mode at dropout 0: torch's own Python path
    torch_attention.requires_grad_(False)  # frozen, as converted (linear picks its kernel by requires_grad)
    adapted = LoraFAMultiheadAttention(copy.deepcopy(torch_attention), r=4, alpha=8).train()
    expected = call(torch_attention, kind, mask, need_weights, average, batch_first, batched)
    got = call(adapted, kind, mask, need_weights, average, batch_first, batched)
    assert torch.equal(got[0], expected[0])
    assert (got[1] is None) == (expected[1] is None) and (got[1] is None or torch.equal(got[1], expected[1]))


@pytest.mark.parametrize("kind", ["self", "cross", "separate"])
def test_output_and_B_gradients_equal_torchs_attention_on_the_merged_weights(kind):
    """The reference: torch's own attention on W_in + s B A and W_o + s B_o A_o, B and B_o leaves of autograd."""
    adapted = LoraFAMultiheadAttention(attention(), r=4, alpha=8)
    randomize_lora_B(adapted)
    plain = attention()
    B = adapted.lora_B.detach().clone().requires_grad_(True)
    B_out = adapted.out_proj.lora_B.detach().clone().requires_grad_(True)
    x, memory = inputs(False)
    args = {"self": (x, x, x), "cross": (x, memory, memory), "separate": (x, memory, memory.flip(0))}[kind]
    expected = nn.functional.multi_head_attention_forward(
        *args, E, HEADS, plain.in_proj_weight.detach() + 2.0 * B @ adapted.lora_A, plain.in_proj_bias.detach(),
        None, None, False, 0.0, plain.out_proj.weight.detach() + 2.0 * B_out @ adapted.out_proj.lora_A,
        plain.out_proj.bias.detach(), need_weights=False,
    )[0]
    got = adapted(*args, need_weights=False)[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    expected.square().sum().backward()
    got.square().sum().backward()
    torch.testing.assert_close(adapted.lora_B.grad, B.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(adapted.out_proj.lora_B.grad, B_out.grad, rtol=1e-4, atol=1e-6)


def encoder() -> nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, HEADS, 32, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)


def transformer() -> nn.Transformer:
    torch.manual_seed(0)
    return nn.Transformer(E, HEADS, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32, dropout=0.0,
                          batch_first=True)


def demo() -> Transformer:
    torch.manual_seed(0)
    return Transformer(vocab_size=40, ninp=E, nhead=HEADS, nhid=32, nlayers=1, dropout=0.0)


MODELS = {
    "TransformerEncoder": (encoder, lambda m, x, t, pad: m(x, src_key_padding_mask=pad)),
    "Transformer": (transformer, lambda m, x, t, pad: m(x, t, src_key_padding_mask=pad, memory_key_padding_mask=pad)),
    "demo Transformer": (demo, lambda m, x, t, pad: m(x, t)),
}


def model_inputs(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    if name == "demo Transformer":
        x = torch.randint(0, 40, (3, 6), generator=generator)
        t = torch.randint(0, 40, (3, 6), generator=generator)
    else:
        x, t = torch.randn(3, 6, E, generator=generator), torch.randn(3, 6, E, generator=generator)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[0, 4:] = True
    return x, t, pad


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_adapter_gets_a_gradient_and_eval_equals_train_and_merged(name):
    build, forward = MODELS[name]
    model = build()
    x, t, pad = model_inputs(name)
    names = apply_lorafa(model, r=4, alpha=8)
    attentions = [n for n, m in model.named_modules() if isinstance(m, LoraFAMultiheadAttention)]
    assert attentions and set(attentions) <= set(names)
    assert not any(n.endswith("out_proj") for n in names)  # adapted with their attention module
    randomize_lora_B(model)
    trained = forward(model.train(), x, t, pad)
    trained.square().sum().backward()
    layers = lorafa_layers(model)
    assert all(layer.lora_B.grad is not None and layer.lora_B.grad.abs().sum() > 0 for layer in layers.values())
    keep = ~pad if name == "TransformerEncoder" else slice(None)  # the fused path zeroes padded positions
    with torch.no_grad():
        evaluated = forward(model.eval(), x, t, pad)
        assert torch.backends.mha.get_fastpath_enabled()  # turned off only while the modules run
        torch.testing.assert_close(evaluated[keep], trained.detach()[keep], rtol=0, atol=0)
        state = merged_state_dict(model)
        merge_lorafa(model)
        assert not lorafa_layers(model)
        assert model.state_dict().keys() == state.keys()
        torch.testing.assert_close(forward(model, x, t, pad)[keep], evaluated[keep], rtol=1e-5, atol=1e-5)
    plain = build()
    plain.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(forward(plain.eval(), x, t, pad)[keep], evaluated[keep], rtol=1e-5, atol=1e-5)


def test_adapter_round_trip_and_peft_export_give_the_trained_outputs(tmp_path):
    model = demo()
    apply_lorafa(model, r=4, alpha=8)
    randomize_lora_B(model)
    x, t, _ = model_inputs("demo Transformer")
    with torch.no_grad():
        expected = model.eval()(x, t)
    save_adapter(model, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(load_adapter(demo(), tmp_path / "adapter").eval()(x, t), expected)
    with pytest.warns(UserWarning, match=r"PEFT 0\.21\.2's MultiheadAttention layer adds out_proj's delta twice in "
                      r"its forward and its merge \(huggingface/peft#3774\)"):
        export_peft(model, tmp_path / "peft")
    config = __import__("json").loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert "transformer.encoder.layers.0.self_attn" in config["target_modules"]
    assert not any("out_proj" in name for name in config["target_modules"])
    peft_model = PeftModel.from_pretrained(demo(), tmp_path / "peft").eval()
    ours = dict(model.named_parameters()) | dict(model.named_buffers())
    for name, tensor in peft_model.state_dict().items():  # every A and B where PEFT keeps it
        if ".lora_" in name:
            key = name.removeprefix("base_model.model.").replace(".default", "").replace(".weight", "")
            assert torch.equal(tensor, ours[key.replace("base_layer.out_proj", "base.out_proj")]), name
    with torch.no_grad():  # outputs agree where PEFT's bug does not act: out_proj's B at zero
        for name, layer in lorafa_layers(model).items():
            if name.endswith(".base.out_proj"):
                layer.lora_B.zero_()
        for name, param in peft_model.named_parameters():
            if "out_proj.lora_B" in name:
                param.zero_()
        # in train mode (dropout 0): in eval, torch's fused encoder path skips PEFT's MultiheadAttention adapters
        torch.testing.assert_close(peft_model.train()(x, t), model.train()(x, t), rtol=1e-5, atol=1e-5)


def test_attention_dropout_keeps_a_seed_not_a_mask_on_cpu():
    model = LoraFAMultiheadAttention(attention(dropout=0.5, batch_first=True), r=4, alpha=8).train()
    x = torch.randn(3, 5, E, requires_grad=True)
    saved = []

    def pack(tensor):
        saved.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(x, x, x, need_weights=False)[0]
    assert (3, HEADS, 5, 5) not in saved and (3 * HEADS, 5, 5) not in saved  # no mask, no probabilities
    torch.manual_seed(4)
    first = model(x, x, x, need_weights=False)[0]
    torch.manual_seed(4)
    assert torch.equal(model(x, x, x, need_weights=False)[0], first) and not torch.equal(first, out)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_an_out_proj_alone_is_refused_and_unsupported_modules_are_left_out_by_name():
    model = encoder()
    with pytest.raises(ValueError, match=r"selects layers\[0\]\.self_attn\.out_proj, the out_proj of "
                       r"nn.MultiheadAttention layers\[0\]\.self_attn, whose forward reads out_proj.weight directly.*"
                       r"Target the attention module itself \('self_attn'\)"):
        apply_lorafa(model, r=4, target_modules=["out_proj"])
    assert not lorafa_layers(model)
    assert apply_lorafa(model, r=4, target_modules=["self_attn"]) == ["layers.0.self_attn", "layers.1.self_attn"]
    assert len(lorafa_layers(model)) == 4  # with their out_proj

    class Separate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = nn.MultiheadAttention(E, HEADS, kdim=8, vdim=8)
            self.proj = nn.Linear(E, E)
            self.out = nn.Linear(E, 2)

    separate = Separate()
    with pytest.warns(UserWarning, match=r"leaves out these nn.MultiheadAttention modules \(q, k, v and out_proj stay "
                      r"frozen\): attention: its q, k and v weights are separate \(kdim=8, vdim=8, embed_dim=16\)"):
        assert apply_lorafa(separate, r=4) == ["proj"]
    with pytest.raises(TypeError, match=r"attention \(MultiheadAttention: its q, k and v weights are separate"):
        apply_lorafa(Separate(), r=4, target_modules=["attention"])


def test_two_processes_train_lightnings_demo_transformer_under_ddp_like_one(tmp_path):
    worker = Path(__file__).parents[1] / "workers" / "transformer_ddp_worker.py"
    done = subprocess.run([sys.executable, str(worker), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    single = torch.load(tmp_path / "single.pt", weights_only=True)
    assert any(".self_attn.lora_B" in key for key in single) and "model.decoder.weight" in single
    for key, expected in single.items():
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        torch.testing.assert_close(ranks[0][key], expected, rtol=1e-5, atol=1e-6, msg=key)


def test_backward_keeps_x_A_transposed_not_the_inputs():
    """Above the frozen attention's own saved tensors, the adapters keep exactly h = x A^T (N, L, r) for the
    in-projection and h_o = o A_o^T for out_proj: 2 * N * L * r float32 values, never a (N, L, E) input."""
    from lightning_lorafa.profiling import measure_saved_activations

    frozen = attention(batch_first=True).train()
    frozen.requires_grad_(False)
    adapted = LoraFAMultiheadAttention(attention(batch_first=True), r=4, alpha=8).train()
    x = torch.randn(3, 5, E, requires_grad=True)
    theirs = measure_saved_activations(lambda: frozen(x, x, x, need_weights=False)[0].sum(), module=frozen)
    ours = measure_saved_activations(lambda: adapted(x, x, x, need_weights=False)[0].sum(), module=adapted)
    assert ours.total_bytes - theirs.total_bytes == 2 * 3 * 5 * 4 * 4
    shapes = [Counter(tuple(t.shape) for t in report.tensors if not t.is_weight) for report in (ours, theirs)]
    assert shapes[0] - shapes[1] == Counter({(15, 4): 2}) and not shapes[1] - shapes[0]  # h and h_o, (L * N, r)
