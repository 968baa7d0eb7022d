import copy
import math

import pytest
import torch
from torch import nn

from lightning_lorafa import LoraFALinear
from lightning_lorafa.adapters.base import add_lora_fa_branch
from lightning_lorafa.adapters.dropout_masks import draw_seed, dropout_mul, keep_scale
from lightning_lorafa.profiling import measure_saved_activations


def make_layer(d_in=12, d_out=10, r=4, alpha=8.0, bias=True, dropout=0.0, dtype=torch.float32, seed=3):
    torch.manual_seed(0)
    layer = LoraFALinear(nn.Linear(d_in, d_out, bias=bias, dtype=dtype), r=r, alpha=alpha, dropout=dropout, seed=seed)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(d_out, r, dtype=dtype))
    return layer


def reference(layer, x, scale=None):
    """base(x) + s * (dropout(x) A^T) B^T with plain autograd ops (keeps x and the mask)."""
    xd = x if scale is None else x * scale
    return layer.base(x) + layer.scaling * (xd @ layer.lora_A.t()) @ layer.lora_B.t()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 12), (2, 7, 12), (2, 3, 4, 12)])
def test_forward_equals_base_plus_scaled_BAx(bias, shape):
    layer = make_layer(bias=bias)
    x = torch.randn(*shape)
    expected = layer.base(x) + layer.scaling * x @ (layer.lora_B @ layer.lora_A).t()
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert layer(x).shape == (*shape[:-1], 10)


def test_scaling_and_rslora():
    assert make_layer(r=4, alpha=8).scaling == 2.0
    layer = LoraFALinear(nn.Linear(12, 10), r=4, alpha=8, use_rslora=True)
    assert layer.scaling == 8 / math.sqrt(4)


def test_init_is_peft_kaiming_and_reproducible():
    a1, a2 = make_layer(seed=7).lora_A, make_layer(seed=7).lora_A
    assert torch.equal(a1, a2)
    assert not torch.equal(a1, make_layer(seed=8).lora_A)
    bound = 1 / math.sqrt(12)  # kaiming_uniform(a=sqrt(5)) bound = sqrt(6 / ((1 + 5) * fan_in))
    assert a1.abs().max() <= bound
    expected = torch.empty(4, 12)
    nn.init.kaiming_uniform_(expected, a=math.sqrt(5), generator=torch.Generator().manual_seed(7))
    assert torch.equal(a1, expected)
    assert torch.equal(make_layer().lora_B * 0, torch.zeros(10, 4))
    assert torch.count_nonzero(LoraFALinear(nn.Linear(12, 10), r=4, alpha=8).lora_B) == 0


def test_only_B_trains():
    layer = make_layer()
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_B"]
    assert "lora_A" in dict(layer.named_buffers())


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_gradients_equal_autograd_reference(dropout):
    layer = make_layer(dropout=dropout).train()
    x = torch.randn(3, 5, 12, requires_grad=True)
    dy = torch.randn(3, 5, 10)
    torch.manual_seed(42)
    (layer(x) * dy).sum().backward()
    grad_x, grad_B = x.grad.clone(), layer.lora_B.grad.clone()

    torch.manual_seed(42)  # the same seed draw as the forward above
    scale = dropout_mul(torch.ones_like(x), draw_seed(x.device), dropout) if dropout else None
    x.grad, layer.lora_B.grad = None, None
    (reference(layer, x, scale) * dy).sum().backward()
    torch.testing.assert_close(grad_x, x.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_B, layer.lora_B.grad, rtol=1e-5, atol=1e-6)


def test_dropout_mask_regenerated_exactly_against_stored_mask():
    layer = make_layer(dropout=0.5).train()
    x = torch.randn(4, 12, requires_grad=True)
    torch.manual_seed(5)
    out = layer(x)
    out.sum().backward()
    torch.manual_seed(5)
    mask = dropout_mul(torch.ones_like(x), draw_seed(x.device), 0.5)  # stored by the reference
    assert 0 < torch.count_nonzero(mask) < mask.numel()
    x_ref = x.detach().clone().requires_grad_(True)
    ref = reference(layer, x_ref, mask)
    assert torch.equal(out, ref)
    ref.sum().backward()
    assert torch.equal(x.grad, x_ref.grad)
    # eval mode: no dropout at all
    layer.eval()
    torch.testing.assert_close(layer(x), reference(layer, x), rtol=0, atol=0)


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_gradcheck_float64(p):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    a = torch.randn(3, 6, dtype=torch.float64)
    b = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)

    def branch(y, x, b):
        torch.manual_seed(1234)  # the same dropout seed at every call
        return add_lora_fa_branch(y, x, a * 1.5 * keep_scale(p), b, p)  # A' = s A / (1 - p)

    assert torch.autograd.gradcheck(branch, (y, x, b))


def saved_activation_shapes(layer, x):
    """Shapes and bytes of the tensors autograd keeps for backward that are not weights (parameters, buffers,
    the layer's scaled copy of A)."""
    report = measure_saved_activations(lambda: layer(x).sum(), module=layer)
    return [(t.shape, t.nbytes) for t in report.tensors if not t.is_weight]


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_backward_keeps_only_xA_not_x(dropout):
    layer = make_layer(d_in=64, d_out=48, r=4, dropout=dropout).train()
    x = torch.randn(8, 16, 64, requires_grad=True)
    saved = saved_activation_shapes(layer, x)
    h = ((8 * 16, 4), 8 * 16 * 4 * 4)  # h = dropout(x) A^T (as the 2-D view matmul saves), float32; no x, no mask
    assert saved == ([((), 8), h] if dropout else [h])  # with dropout, its 8-byte seed


def test_input_without_grad_still_trains_B():
    layer = make_layer()
    layer(torch.randn(4, 12)).sum().backward()
    assert layer.lora_B.grad is not None and layer.lora_B.grad.abs().sum() > 0
    assert layer.base.weight.grad is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_layers(dtype):
    layer = make_layer(dtype=dtype)
    x = torch.randn(4, 12, dtype=dtype, requires_grad=True)
    out = layer(x)
    assert out.dtype == dtype
    ref = reference(copy.deepcopy(layer).float(), x.detach().float())
    torch.testing.assert_close(out.float(), ref, rtol=0.02, atol=0.02)
    out.sum().backward()
    assert x.grad.dtype == dtype and layer.lora_B.grad.dtype == dtype


def test_autocast_bf16_keeps_fp32_parameters():
    layer = make_layer()
    x = torch.randn(4, 12, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference(layer, x).detach(), rtol=0.05, atol=0.05)
    out.float().sum().backward()
    assert layer.lora_B.grad.dtype == torch.float32 and x.grad.dtype == torch.float32


def test_merge_unmerge_round_trip():
    layer = make_layer()
    x = torch.randn(6, 12)
    before, weight = layer(x), layer.base.weight.detach().clone()
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.base(x), before, rtol=1e-5, atol=1e-6)
    layer.merge()  # idempotent
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, r"LoraFALinear\(r=0\): r must be >= 1"),
        ({"r": 13}, "exceeds min"),
        ({"alpha": 0}, "alpha must be > 0"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"dropout": -0.1}, r"dropout must be in \[0, 1\)"),
    ],
)
def test_bad_arguments(kwargs, message):
    args = {"r": 4, "alpha": 8, "dropout": 0.0} | kwargs
    with pytest.raises(ValueError, match=message):
        LoraFALinear(nn.Linear(12, 20), **args)


def test_base_must_be_linear():
    with pytest.raises(TypeError, match="adapts nn.Linear layers, got Conv1d"):
        LoraFALinear(nn.Conv1d(3, 3, 1), r=1, alpha=1)


def test_lora_A_is_dtype_independent():
    a16 = LoraFALinear(nn.Linear(12, 6, dtype=torch.bfloat16), r=4, alpha=8, seed=9).lora_A
    a32 = LoraFALinear(nn.Linear(12, 6), r=4, alpha=8, seed=9).lora_A
    assert a16.dtype == torch.bfloat16 and torch.equal(a16, a32.to(torch.bfloat16))


@pytest.mark.parametrize("init_a", ["kaiming", "orthogonal"])
def test_meta_layer_after_to_empty_and_reset_parameters_equals_a_cpu_built_layer(init_a):
    cpu = LoraFALinear(nn.Linear(12, 6), r=4, alpha=8, seed=3, init_a=init_a)
    with torch.device("meta"):
        meta = LoraFALinear(nn.Linear(12, 6), r=4, alpha=8, seed=3, init_a=init_a)
    assert meta.lora_A.is_meta and meta.lora_B.is_meta
    meta.to_empty(device="cpu")
    meta.reset_parameters()
    assert torch.equal(meta.lora_A, cpu.lora_A)
    assert torch.equal(meta.lora_B, torch.zeros(6, 4)) and meta.lora_B.requires_grad
    assert not meta.lora_A.requires_grad and not meta.base.weight.requires_grad


def test_reset_parameters_zeroes_a_trained_B_and_redraws_A():
    layer = LoraFALinear(nn.Linear(12, 6), r=4, alpha=8, seed=3)
    original = layer.lora_A.clone()
    with torch.no_grad():
        layer.lora_B.fill_(1.0)
        layer.lora_A.mul_(2.0)
    layer.reset_parameters()
    assert torch.equal(layer.lora_A, original) and torch.equal(layer.lora_B, torch.zeros(6, 4))


def test_autocast_casts_and_scales_A_once_while_it_is_unchanged():
    layer = make_layer()
    x = torch.randn(4, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = layer(x)
        scaled = layer.scaled_lora_A(torch.bfloat16, layer.scaling)
        assert scaled.dtype == torch.bfloat16 and torch.equal(scaled, (layer.lora_A * layer.scaling).bfloat16())
        torch.testing.assert_close(layer(x), first, rtol=0, atol=0)
        assert layer.scaled_lora_A(torch.bfloat16, layer.scaling) is scaled  # no new cast for the second forward
        with torch.no_grad():
            layer.lora_A.mul_(2)  # e.g. load_state_dict: A changed in place
        changed = layer(x)
    assert torch.equal(layer.scaled_lora_A(torch.bfloat16, layer.scaling), (layer.lora_A * layer.scaling).bfloat16())
    assert not torch.allclose(changed, first)


def test_scaled_A_is_a_weight_copy_kept_per_train_and_eval_scale():
    layer = make_layer(dropout=0.25)
    x = torch.randn(4, 12, requires_grad=True)
    layer.train()(x)
    train_scale = layer.scaling * keep_scale(0.25)
    layer.eval()(x)
    assert set(layer._scaled_A) == {(torch.float32, train_scale), (torch.float32, layer.scaling)}
    assert layer.scaled_lora_A(torch.float32, train_scale) is layer._scaled_A[(torch.float32, train_scale)][2]
    report = measure_saved_activations(lambda: layer.train()(x).sum(), module=layer)  # its copies are weights
    assert sorted(t.shape for t in report.tensors if t.is_weight) == [(4, 10), (12, 4), (12, 10)]  # B^T, A'^T, W^T
    assert sorted(t.shape for t in report.tensors if not t.is_weight) == [(), (4, 4)]  # the seed and h
