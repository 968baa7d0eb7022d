import copy

import pytest
import torch
from conftest import TwoLayerNet
from torch import nn

from lightning_lorafa import LoraFAOptimizer, apply_lorafa, create_lorafa_optimizer
from lightning_lorafa.adapters.correction import correct_gradient, correction_matrix
from lightning_lorafa.adapters.find import lorafa_layers


def uneven_A(layer, seed=0):
    """An A whose rows have very different norms, so (A A^T)^{-1} is far from a multiple of I."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        rows = torch.randn(layer.lora_A.shape, generator=generator)
        layer.lora_A.copy_(rows * torch.logspace(-1, 1, rows.shape[0]).unsqueeze(1))


def test_correction_is_closed_form_least_squares():
    """s * g~_B A is the projection of the full-weight gradient G onto {s X A}: the lstsq optimum."""
    model = TwoLayerNet()
    apply_lorafa(model, r=3, alpha=6, target_modules=["fc2"])
    layer = lorafa_layers(model)["fc2"]
    uneven_A(layer)
    A, s = layer.lora_A.double(), layer.scaling
    G = torch.randn(16, 16, dtype=torch.float64)  # (d_out, d_in)
    g_B = s * G @ A.t()  # the B gradient induced by G
    corrected = g_B.float().clone()
    correct_gradient(layer, corrected)
    # min_X || s X A - G ||_F  =>  X = G A^T (A A^T)^{-1} / s
    best = torch.linalg.lstsq((s * A).t(), G.t()).solution.t()
    torch.testing.assert_close(corrected.double(), best, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(corrected.double() / corrected.norm(), g_B / g_B.norm(), atol=1e-2)


def test_correction_matrix_is_cached_per_layer():
    model = TwoLayerNet()
    apply_lorafa(model, r=2, target_modules=["fc1"])
    layer = lorafa_layers(model)["fc1"]
    first = correction_matrix(layer)
    assert correction_matrix(layer) is first
    assert first.dtype == torch.float32 and first.shape == (2, 2)
    with torch.no_grad():
        layer.lora_A.mul_(2)  # a changed A invalidates the cache
    torch.testing.assert_close(correction_matrix(layer), first / 4)


def peft_and_ours(r=4, alpha=8, weight_decay=0.0):
    """A PEFT LoRA model and our model with identical base weights, A and B."""
    from peft import LoraConfig, get_peft_model

    base = TwoLayerNet()
    ours = copy.deepcopy(base)
    peft_model = get_peft_model(
        base, LoraConfig(r=r, lora_alpha=alpha, target_modules=["fc1", "fc2"], modules_to_save=["head"])
    )
    apply_lorafa(ours, r=r, alpha=alpha, target_modules=["fc1", "fc2"], modules_to_save=["head"])
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, layer in lorafa_layers(ours).items():
            uneven_A(layer, seed=len(name))
            peft_layer = peft_model.base_model.model.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator))
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B)
    return peft_model, ours


def set_same_random_grads(peft_model, ours, seed):
    generator = torch.Generator().manual_seed(seed)
    ours_params = dict(ours.named_parameters())
    for name, param in peft_model.base_model.model.named_parameters():
        if not param.requires_grad:
            continue
        ours_name = name.replace(".lora_B.default.weight", ".lora_B").replace(".modules_to_save.default", "")
        grad = torch.randn(param.shape, generator=generator)
        param.grad = grad.clone()
        ours_params[ours_name].grad = grad.clone()


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_matches_peft_create_lorafa_optimizer(monkeypatch, weight_decay):
    import peft.optimizers.lorafa as peft_lorafa

    # PEFT multiplies the correction under bf16 autocast wherever bf16 exists; compare in full precision.
    monkeypatch.setattr(peft_lorafa, "is_bf16_available", lambda: False)
    peft_model, ours = peft_and_ours()
    peft_opt = peft_lorafa.create_lorafa_optimizer(peft_model, r=4, lora_alpha=8, lr=1e-2, weight_decay=weight_decay)
    our_opt = create_lorafa_optimizer(ours, lr=1e-2, weight_decay=weight_decay)
    assert sum(len(g["params"]) for g in our_opt.param_groups) == 4  # two B, head weight and bias
    for step in range(4):
        set_same_random_grads(peft_model, ours, seed=step)
        peft_opt.step()
        our_opt.step()
    ours_params = dict(ours.named_parameters())
    for name, param in peft_model.base_model.model.named_parameters():
        if param.requires_grad:
            ours_name = name.replace(".lora_B.default.weight", ".lora_B").replace(".modules_to_save.default", "")
            torch.testing.assert_close(ours_params[ours_name], param, rtol=1e-5, atol=1e-6)
    x = torch.randn(5, 12)
    torch.testing.assert_close(ours(x), peft_model(x), rtol=1e-5, atol=1e-5)


def test_without_correction_it_is_adamw_hf_and_differs_from_corrected():
    _, a = peft_and_ours()
    b = copy.deepcopy(a)
    b_before = lorafa_layers(b)["fc1"].lora_B.detach().clone()
    opt_a = create_lorafa_optimizer(a, lr=1e-2, gradient_correction=True)
    opt_b = create_lorafa_optimizer(b, lr=1e-2, gradient_correction=False)
    for model in (a, b):
        generator = torch.Generator().manual_seed(0)
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.randn(p.shape, generator=generator)
    g = lorafa_layers(b)["fc1"].lora_B.grad.clone()
    opt_a.step()
    opt_b.step()
    assert torch.equal(a.head.weight, b.head.weight)  # non-LoRA parameters: plain AdamW in both
    assert not torch.allclose(lorafa_layers(a)["fc1"].lora_B, lorafa_layers(b)["fc1"].lora_B)
    # first AdamW-HF step: m = 0.1 g, v = 0.001 g^2, step = lr * sqrt(0.001) / 0.1 * m / (sqrt(v) + eps)
    c = 0.001**0.5
    expected = b_before - 1e-2 * c * g / (c * g.abs() + 1e-6)
    torch.testing.assert_close(lorafa_layers(b)["fc1"].lora_B, expected, rtol=1e-6, atol=1e-7)


def test_state_is_keyed_by_parameter_and_resumes_exactly():
    _, model = peft_and_ours()
    resumed = copy.deepcopy(model)
    opt = create_lorafa_optimizer(model, lr=1e-2)

    def train(model, opt, steps):
        for step in steps:
            generator = torch.Generator().manual_seed(step)
            for p in model.parameters():
                if p.requires_grad:
                    p.grad = torch.randn(p.shape, generator=generator)
            opt.step()

    train(model, opt, range(2))
    state = copy.deepcopy(opt.state_dict())
    assert set(state["state"]) == {0, 1, 2, 3}
    resumed.load_state_dict(model.state_dict())
    resumed_opt = create_lorafa_optimizer(resumed, lr=1e-2)
    resumed_opt.load_state_dict(state)
    train(model, opt, range(2, 4))
    train(resumed, resumed_opt, range(2, 4))
    for (name, p), q in zip(model.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_optimizer_on_model_without_adapters_is_rejected():
    with pytest.raises(ValueError, match="call apply_lorafa"):
        create_lorafa_optimizer(TwoLayerNet())


@pytest.mark.parametrize(
    "kwargs, message", [({"lr": -1}, "lr must be"), ({"betas": (1.0, 0.9)}, "betas"), ({"eps": -1}, "eps")]
)
def test_bad_hyper_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraFAOptimizer([nn.Parameter(torch.zeros(2))], **kwargs)


def test_batched_correction_equals_per_layer_correction_and_follows_a_changed_A():
    """Gradients of equal shape are corrected in one bmm; the result is each layer's own correction."""
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 6))
    apply_lorafa(model, r=3, alpha=6)
    layers = list(lorafa_layers(model).values())
    for seed, layer in enumerate(layers):
        uneven_A(layer, seed)
    optimizer = create_lorafa_optimizer(model, lr=0.0)
    grads = [
        torch.randn(layer.lora_B.shape, generator=torch.Generator().manual_seed(i)) for i, layer in enumerate(layers)
    ]
    for _ in range(2):  # the second step changes A of one layer: its stacked correction must follow
        expected = []
        for layer, grad in zip(layers, grads, strict=True):
            layer.lora_B.grad = grad.clone()
            reference = grad.clone()
            correct_gradient(layer, reference)
            expected.append(reference)
        optimizer.step()
        for layer, reference in zip(layers, expected, strict=True):
            torch.testing.assert_close(layer.lora_B.grad, reference, rtol=1e-6, atol=1e-6)
        with torch.no_grad():
            layers[1].lora_A.mul_(2)
    assert len(optimizer._correction._stacked) == 1  # the three 8 x 3 gradients share one stacked correction
