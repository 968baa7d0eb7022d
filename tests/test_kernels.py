"""The dropout-mask kernel: the CPU path in process, the Triton (CUDA) kernel under Triton's interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_lorafa import LoraFALinear
from lightning_lorafa.kernels import (
    SMALL_MASK,
    draw_seed,
    dropout_mask,
    dropout_mul,
    effective_p,
    keep_scale,
    uses_triton,
)

ROOT = Path(__file__).resolve().parents[1]


def test_effective_p_and_keep_scale():
    assert effective_p(0.1) == 6554 / 2**16
    assert keep_scale(0.1) == 1 / (1 - 6554 / 2**16)
    assert effective_p(0.0) == 0.0 and keep_scale(0.0) == 1.0
    assert effective_p(1 - 2**-20) == (2**16 - 1) / 2**16  # never drops everything


def test_draw_seed_is_a_device_tensor_reproducible_under_manual_seed():
    torch.manual_seed(3)
    first = draw_seed(torch.device("cpu"))
    assert first.shape == () and first.dtype == torch.int64 and first.device.type == "cpu"
    torch.manual_seed(3)
    assert torch.equal(draw_seed(torch.device("cpu")), first)
    assert not torch.equal(draw_seed(torch.device("cpu")), first)


@pytest.mark.parametrize("shape", [(7, 33), (40, 64), (3, 5, 101)], ids=["small", "large", "large-odd"])
def test_cpu_masks_small_and_large_are_seeded_unbiased_and_match_dropout_mul(shape):
    """Small masks (one ``bernoulli``) and large ones (16-bit slices of ``randint`` words): the same seed
    gives the same mask in every dtype, ``dropout_mul`` applies exactly that mask, about ``p`` is dropped."""
    shape = torch.Size(shape)
    assert (shape.numel() <= SMALL_MASK) == (shape == (7, 33))
    seed, other = torch.tensor(5), torch.tensor(6)
    mask = dropout_mask(shape, seed, 0.3, torch.float32)
    assert mask.shape == shape and set(mask.unique().tolist()) == {0, 1}
    assert mask.dtype == torch.float32  # float masks come in the dtype they multiply (faster than bool on CPU)
    assert torch.equal(dropout_mask(shape, seed, 0.3, torch.float64), mask.double())
    half = dropout_mask(shape, seed, 0.3, torch.bfloat16)  # bool: a bf16 mask would round the 1 / (1 - p) scale
    assert half.dtype == torch.bool and torch.equal(half, mask.bool())
    x_half = torch.randn(shape, dtype=torch.bfloat16)
    assert torch.equal(dropout_mul(x_half, seed, 0.3) != 0, (x_half != 0) & half)  # dropout_mul: the same mask
    assert not torch.equal(dropout_mask(shape, other, 0.3, torch.float32), mask)
    x = torch.randn(shape)
    assert torch.equal(dropout_mul(x, seed, 0.3), x * mask * keep_scale(0.3))
    assert torch.equal(dropout_mul(x, seed, 0.3, 1.0), x * mask)
    draws = torch.stack([dropout_mask(shape, torch.tensor(s), 0.3, torch.float32) for s in range(200)])
    assert abs(1 - draws.double().mean().item() - 0.3) < 0.01  # >= 46,200 draws: standard error < 0.003


def test_cpu_path_runs_without_triton_kernel():
    assert not uses_triton(torch.ones(2)) or os.environ.get("TRITON_INTERPRET") == "1"
    empty = dropout_mul(torch.ones(0, 3), torch.tensor(1), 0.5)
    assert empty.shape == (0, 3)


def test_triton_kernel_under_interpreter():
    """The CUDA path's Triton kernel, run by Triton's CPU interpreter: a seeded, unbiased mask that forward and
    backward rebuild identically."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "triton_kernel_worker.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results.pop("uses_triton") is True
    assert results.pop("values") == [0.0, pytest.approx(keep_scale(0.25))]
    assert abs(results.pop("dropped") - 0.25) < 0.01  # 21,210 draws: the standard error is 0.003
    assert all(results.values()), results


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_cuda_layer_rebuilds_the_forward_mask_in_backward():
    pytest.importorskip("triton")
    torch.manual_seed(0)
    layer = LoraFALinear(nn.Linear(64, 48), r=8, alpha=16, dropout=0.3).cuda().train()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 33, 64, device="cuda", requires_grad=True)
    assert uses_triton(x)
    torch.cuda.manual_seed(11)
    out = layer(x)
    out.square().sum().backward()
    torch.cuda.manual_seed(11)
    mask = dropout_mul(torch.ones_like(x), draw_seed(x.device), 0.3)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = layer.base(x_ref) + layer.scaling * ((x_ref * mask) @ layer.lora_A.t()) @ layer.lora_B.t()
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    assert abs((mask == 0).float().mean().item() - 0.3) < 0.02


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_fused_and_split_dropout_paths_give_the_same_values(dtype, monkeypatch):
    """Large CUDA tensors take the fused kernel, small ones the mask kernel and an ATen product: bit-equal."""
    pytest.importorskip("triton")
    from lightning_lorafa import dropout as dropout_module
    from lightning_lorafa.dropout import RecomputedDropout

    x = torch.randn(33, 1001, device="cuda", dtype=dtype, requires_grad=True)
    results = []
    for fused_min in (0, 2**62):
        monkeypatch.setattr(dropout_module, "FUSED_MIN_NUMEL", fused_min)
        torch.cuda.manual_seed(6)
        out = RecomputedDropout(0.3).train()(x)
        results.append((out, torch.autograd.grad(out, x, torch.ones_like(out))[0]))
    (fused, fused_grad), (split, split_grad) = results
    assert torch.equal(fused, split) and torch.equal(fused_grad, split_grad)
