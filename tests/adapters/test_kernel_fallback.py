"""The backend of the CUDA path's masks (``LIGHTNING_LORAFA_DROPOUT_BACKEND``) and its first-use check, on CPU:
CPU masks take the CUDA path as under ``TRITON_INTERPRET=1``, with the Triton launches replaced to fail."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lightning_lorafa import LoraFALinear
from lightning_lorafa.adapters import dropout_masks as kernels
from lightning_lorafa.adapters.dropout import RecomputedDropout
from lightning_lorafa.adapters.dropout_masks import (
    BACKEND_VARIABLE,
    draw_seed,
    dropout_backend,
    dropout_mask,
    dropout_mul,
    keep_mask,
    keep_scale,
    philox_keep_mask,
    uses_triton,
)

SHAPE = torch.Size((6, 301))


@pytest.fixture
def cuda_path_on_cpu(monkeypatch):
    """CPU masks are the CUDA path's Philox masks, its backend not yet decided; returns the Triton launches made."""
    monkeypatch.setattr(kernels, "TRITON_ON_CPU", True)
    monkeypatch.setattr(kernels, "_triton_selected", None)
    monkeypatch.setattr(kernels, "_backend_setting", None)
    monkeypatch.delenv(BACKEND_VARIABLE, raising=False)
    launches = []

    def failing_launch(*args):
        launches.append(args)
        raise RuntimeError("no compiler for this GPU")

    monkeypatch.setattr(kernels, "_triton_mask", failing_launch)
    monkeypatch.setattr(kernels, "_triton_dropout_mul", failing_launch)
    return launches


def _reference_product(x: torch.Tensor, seed: torch.Tensor, p: float, scale: float) -> torch.Tensor:
    return x * philox_keep_mask(x.shape, seed, p) * scale


def _dropout_forward_and_backward() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dropout of a (6, 301) input under manual seed 3: output, input gradient, and the mask of that seed."""
    y = torch.randn(SHAPE, requires_grad=True)
    torch.manual_seed(3)
    out = RecomputedDropout(0.3).train()(y)
    (grad,) = torch.autograd.grad(out, y, torch.ones_like(out))
    torch.manual_seed(3)
    return out, grad, philox_keep_mask(SHAPE, draw_seed(y.device), 0.3)


def _layer_matches_a_stored_mask_reference() -> bool:
    """A LoRA-FA layer with dropout: forward and input gradient equal those of a reference that stores the mask."""
    torch.manual_seed(0)
    layer = LoraFALinear(nn.Linear(48, 40), r=4, alpha=8, dropout=0.5).train()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(6, 48, requires_grad=True)
    torch.manual_seed(7)
    out = layer(x)
    out.square().sum().backward()
    torch.manual_seed(7)
    mask = philox_keep_mask(x.shape, draw_seed(x.device), 0.5) * keep_scale(0.5)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = layer.base(x_ref) + layer.scaling * ((x_ref * mask) @ layer.lora_A.t()) @ layer.lora_B.t()
    ref.square().sum().backward()
    return torch.allclose(out, ref, rtol=1e-6, atol=1e-6) and torch.allclose(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)


def test_backend_variable_accepts_auto_triton_torch(monkeypatch):
    monkeypatch.delenv(BACKEND_VARIABLE, raising=False)
    assert dropout_backend() == "auto"
    for value in ("auto", "triton", "torch"):
        monkeypatch.setenv(BACKEND_VARIABLE, value)
        assert dropout_backend() == value
    monkeypatch.setenv(BACKEND_VARIABLE, "cuda")
    with pytest.raises(ValueError, match=r"LIGHTNING_LORAFA_DROPOUT_BACKEND='cuda'.*'auto', 'triton', 'torch'"):
        dropout_backend()


def test_a_bad_backend_value_fails_the_first_cuda_path_mask(cuda_path_on_cpu, monkeypatch):
    monkeypatch.setenv(BACKEND_VARIABLE, "Torch")
    with pytest.raises(ValueError, match="LIGHTNING_LORAFA_DROPOUT_BACKEND='Torch' is not a dropout backend"):
        dropout_mask(SHAPE, torch.tensor(1), 0.3, torch.float32)


def test_auto_warns_once_when_the_kernel_raises_and_then_gives_the_kernels_masks(cuda_path_on_cpu):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, grad, mask = _dropout_forward_and_backward()
        layer_equal = _layer_matches_a_stored_mask_reference()
        large = torch.randn(2**18)
        large_seed = torch.tensor(2**62 + 1)
        large_out = dropout_mul(large, large_seed, 0.1)
    (warning,) = caught
    assert warning.category is RuntimeWarning
    assert "first-use check on cpu (RuntimeError: no compiler for this GPU)" in str(warning.message)
    assert "masks now come from the PyTorch path" in str(warning.message) and BACKEND_VARIABLE in str(warning.message)
    assert len(cuda_path_on_cpu) == 1 and kernels._triton_selected is False and not uses_triton(large)
    assert 0 < int(mask.sum()) < mask.numel()
    assert torch.equal(out != 0, mask) and torch.equal(grad != 0, mask)  # forward and backward: one mask
    assert torch.equal(grad, mask * keep_scale(0.3))
    assert layer_equal
    assert torch.equal(large_out, large * philox_keep_mask(large.shape, large_seed, 0.1) * keep_scale(0.1))


def test_auto_falls_back_when_the_kernel_gives_other_masks(cuda_path_on_cpu, monkeypatch):
    monkeypatch.setattr(kernels, "_triton_mask", lambda shape, seed, p: ~philox_keep_mask(shape, seed, p))
    monkeypatch.setattr(kernels, "_triton_dropout_mul", _reference_product)
    differs = r"differs from the reference in 3003 of 3003 entries \(the masked product in 0\)"
    with pytest.warns(RuntimeWarning, match=differs):
        assert not uses_triton(torch.ones(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # decided: no second check, no second warning
        out, grad, mask = _dropout_forward_and_backward()
    assert torch.equal(out != 0, mask) and torch.equal(grad != 0, mask)


def test_auto_keeps_triton_when_the_check_passes(cuda_path_on_cpu, monkeypatch):
    pytest.importorskip("triton")
    launches = []

    def counted(function):
        return lambda *args: launches.append(function.__name__) or function(*args)

    monkeypatch.setattr(kernels, "_triton_mask", counted(philox_keep_mask))
    monkeypatch.setattr(kernels, "_triton_dropout_mul", counted(_reference_product))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert uses_triton(torch.ones(1)) and kernels._triton_selected is True
        assert launches == ["philox_keep_mask", "_reference_product"]  # the check: one mask, one product
        mask = dropout_mask(SHAPE, torch.tensor(9), 0.3, torch.float32)
    assert launches[2:] == ["philox_keep_mask"] and torch.equal(mask, philox_keep_mask(SHAPE, torch.tensor(9), 0.3))


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_a_later_failing_launch_falls_back_under_auto_and_raises_under_triton(backend, cuda_path_on_cpu, monkeypatch):
    """A kernel that passed the check can still fail for a dtype the GPU's compiler rejects."""
    pytest.importorskip("triton")
    monkeypatch.setenv(BACKEND_VARIABLE, backend)

    def product_without_bfloat16(x, seed, p, scale):
        if x.dtype == torch.bfloat16:
            raise RuntimeError("bfloat16 is not supported on this GPU")
        return _reference_product(x, seed, p, scale)

    monkeypatch.setattr(kernels, "_triton_mask", philox_keep_mask)
    monkeypatch.setattr(kernels, "_triton_dropout_mul", product_without_bfloat16)
    x, seed = torch.randn(SHAPE, dtype=torch.bfloat16), torch.tensor(2**62 + 8)
    assert uses_triton(x)
    if backend == "triton":
        with pytest.raises(RuntimeError, match="bfloat16 is not supported"):
            dropout_mul(x, seed, 0.3)
        return
    with pytest.warns(RuntimeWarning, match=r"failed on cpu \(RuntimeError: bfloat16 is not supported on this GPU\)"):
        out = dropout_mul(x, seed, 0.3)
    assert not uses_triton(x) and torch.equal(out, x * philox_keep_mask(SHAPE, seed, 0.3) * keep_scale(0.3))


def test_torch_backend_gives_the_kernels_masks_without_triton(cuda_path_on_cpu, monkeypatch):
    monkeypatch.setenv(BACKEND_VARIABLE, "torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, grad, mask = _dropout_forward_and_backward()
        assert not uses_triton(out)
    assert cuda_path_on_cpu == []  # no check, no launch
    assert torch.equal(out != 0, mask) and torch.equal(grad != 0, mask)
    seed = torch.tensor(2**62 - 3)
    assert torch.equal(dropout_mask(SHAPE, seed, 0.3, torch.float32), philox_keep_mask(SHAPE, seed, 0.3))


def test_triton_backend_skips_the_check_and_raises_the_kernels_error(cuda_path_on_cpu, monkeypatch):
    monkeypatch.setenv(BACKEND_VARIABLE, "triton")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert uses_triton(torch.ones(1)) and cuda_path_on_cpu == []
        with pytest.raises(RuntimeError, match="no compiler for this GPU"):
            dropout_mask(SHAPE, torch.tensor(1), 0.3, torch.float32)
    assert len(cuda_path_on_cpu) == 1


def test_without_triton_auto_warns_and_triton_is_a_clear_error(cuda_path_on_cpu, monkeypatch):
    monkeypatch.setattr(kernels, "HAS_TRITON", False)
    monkeypatch.setenv(BACKEND_VARIABLE, "triton")
    with pytest.raises(RuntimeError, match="LIGHTNING_LORAFA_DROPOUT_BACKEND=triton, but Triton cannot be imported"):
        uses_triton(torch.ones(1))
    monkeypatch.setenv(BACKEND_VARIABLE, "auto")
    with pytest.warns(RuntimeWarning, match="ImportError: Triton is not installed"):
        mask = dropout_mask(SHAPE, torch.tensor(4), 0.3, torch.float32)
    assert torch.equal(mask, philox_keep_mask(SHAPE, torch.tensor(4), 0.3)) and cuda_path_on_cpu == []


@pytest.mark.parametrize("backend", ["auto", "triton", "torch", "not-a-backend"])
def test_cpu_masks_come_from_the_cpu_generator_whatever_the_backend(backend, monkeypatch):
    monkeypatch.setattr(kernels, "TRITON_ON_CPU", False)
    monkeypatch.setenv(BACKEND_VARIABLE, backend)
    mask = dropout_mask(SHAPE, torch.tensor(5), 0.3, torch.float32)
    assert not uses_triton(mask) and torch.equal(mask, keep_mask(SHAPE, 0.3, 5, torch.device("cpu"), torch.float32))


def test_compiled_dropout_runs_the_check_eagerly_and_falls_back(cuda_path_on_cpu):
    """Under ``torch.compile`` the check runs in the custom op's eager call, not while tracing."""
    y = torch.randn(SHAPE, requires_grad=True)
    dropout = RecomputedDropout(0.3).train()

    compiled = torch.compile(dropout, backend="aot_eager", fullgraph=True)
    with pytest.warns(RuntimeWarning, match="no compiler for this GPU"):
        torch.manual_seed(3)
        out = compiled(y)
        (grad,) = torch.autograd.grad(out, y, torch.ones_like(out))
    torch.manual_seed(3)
    mask = philox_keep_mask(SHAPE, draw_seed(y.device), 0.3)
    assert len(cuda_path_on_cpu) == 1 and torch.equal(out != 0, mask) and torch.equal(grad != 0, mask)
