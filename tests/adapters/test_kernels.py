"""The dropout-mask kernel: the CPU path in process, the Triton (CUDA) kernel under Triton's interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_lorafa import LoraFALinear
from lightning_lorafa.adapters import dropout_masks as kernels
from lightning_lorafa.adapters.dropout_masks import (
    SMALL_MASK,
    draw_seed,
    dropout_mask,
    dropout_mul,
    effective_p,
    keep_scale,
    philox4x32,
    philox_bits,
    philox_keep_mask,
    uses_triton,
)

ROOT = Path(__file__).resolve().parents[2]


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


@pytest.mark.parametrize(
    "counter, key, expected",
    [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
    ids=["zeros", "ones", "pi"],
)
def test_philox4x32_gives_random123_known_answers(counter, key, expected):
    """The PyTorch Philox is Random123's Philox-4x32-10 (its published known-answer vectors), which is what
    ``tl.randint4x`` computes (the interpreter test checks the kernel against it bit for bit)."""
    words = philox4x32(tuple(torch.tensor([c]) for c in counter), tuple(torch.tensor(k) for k in key))
    assert [int(w) for w in words] == list(expected)


def test_philox_bits_are_uniform_16_bit_draws_in_the_kernel_layout():
    seed = torch.tensor(2**62 - 7)
    bits = philox_bits(2**18 + 5, seed)  # not a multiple of 8: the last group is partly used
    assert bits.shape == (2**18 + 5,) and bits.dtype == torch.int64
    assert int(bits.min()) == 0 and int(bits.max()) == 2**16 - 1  # 16-bit values, no wider
    set_rate = torch.stack([(bits >> b) & 1 for b in range(16)]).double().mean(dim=1)  # each bit: set half the time
    assert (set_rate - 0.5).abs().max() < 0.005, set_rate  # standard error 0.001
    lane_low = (bits[: 2**18].view(-1, 8) < 2**15).double().mean(dim=0)  # each of the 8 lanes of a draw
    assert (lane_low - 0.5).abs().max() < 0.012, lane_low  # 32,768 draws each: standard error 0.0028
    words = philox4x32(
        (torch.tensor([1]), torch.tensor([0]), torch.tensor([0]), torch.tensor([0])), (seed & 0xFFFFFFFF, seed >> 32)
    )
    assert bits[8:16].tolist() == [half for w in words for half in (int(w) >> 16, int(w) & 0xFFFF)]  # group 1


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_philox_keep_mask_drops_p(p):
    mask = philox_keep_mask(torch.Size((128, 1031)), torch.tensor(2**40 + 3), p)
    assert mask.shape == (128, 1031) and mask.dtype == torch.bool
    assert abs(1 - mask.double().mean().item() - effective_p(p)) < 0.005  # 131,968 draws: standard error < 0.0014


def test_philox_keep_mask_is_a_pure_function_of_seed_shape_and_p():
    shape, seed = torch.Size((5, 7, 3)), torch.tensor(2**33 + 1)
    mask = philox_keep_mask(shape, seed, 0.3)
    assert torch.equal(philox_keep_mask(shape, seed.clone(), 0.3), mask)
    assert torch.equal(philox_keep_mask(torch.Size((105,)), seed, 0.3), mask.view(-1))  # element i: draw i
    assert not torch.equal(philox_keep_mask(shape, seed + 1, 0.3), mask)  # the key's low half
    assert not torch.equal(philox_keep_mask(shape, seed + 2**32, 0.3), mask)  # and its high half
    assert not (philox_keep_mask(shape, seed, 0.6) & ~mask).any()  # a larger p drops a superset
    assert philox_keep_mask(torch.Size((0, 3)), seed, 0.3).shape == (0, 3)


def test_triton_kernel_under_interpreter():
    """The CUDA path's Triton kernel, run by Triton's CPU interpreter: a seeded mask that drops ``p`` of the
    entries, equals ``philox_keep_mask`` bit for bit and is rebuilt identically in backward; a kernel that fails
    the first-use check warns once and the PyTorch path then gives the kernel's masks."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "workers" / "triton_kernel_worker.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    drop_rates = results.pop("drop_rates")  # 131,968 draws each: the standard error is at most 0.0014
    assert all(abs(rate - float(p)) < 0.005 for p, rate in drop_rates.items()) and len(drop_rates) == 3, drop_rates
    assert results.pop("mask_kernel_equals_reference") and results.pop("product_kernel_equals_reference")
    assert results.pop("uses_triton") is True
    assert results.pop("values") == [0.0, pytest.approx(keep_scale(0.25))]
    assert abs(results.pop("dropped") - 0.25) < 0.01  # 21,210 draws: the standard error is 0.003
    (warning,) = results.pop("fallback_warnings")  # one, although three masks were made after the check
    assert "failed its first-use check" in warning and "differs from the reference in 1 of 3003 entries" in warning
    assert "PyTorch path" in warning
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
    from lightning_lorafa.adapters import dropout as dropout_module
    from lightning_lorafa.adapters.dropout import RecomputedDropout

    x = torch.randn(33, 1001, device="cuda", dtype=dtype, requires_grad=True)
    results = []
    for fused_min in (0, 2**62):
        monkeypatch.setattr(dropout_module, "FUSED_MIN_NUMEL", fused_min)
        torch.cuda.manual_seed(6)
        out = RecomputedDropout(0.3).train()(x)
        results.append((out, torch.autograd.grad(out, x, torch.ones_like(out))[0]))
    (fused, fused_grad), (split, split_grad) = results
    assert torch.equal(fused, split) and torch.equal(fused_grad, split_grad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_cuda_kernels_pass_the_first_use_check_and_give_the_reference_masks():
    """On this GPU the Triton kernels are chosen (no warning) and give ``philox_keep_mask``'s masks, which are
    the same on CPU; the fused product equals the PyTorch path's ``x * mask * scale`` in every dtype."""
    pytest.importorskip("triton")

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert uses_triton(torch.ones(1, device="cuda")) and kernels._triton_selected is True
    cases = [((1,), 0, 0.1), ((1031,), 2**62 - 1, 0.5), ((3, 70, 101), 2**32 + 5, 0.9), ((512, 4099), 2**62 + 7, 0.3)]
    for shape, seed, p in cases:
        shape, seed = torch.Size(shape), torch.tensor(seed, device="cuda")
        expected = philox_keep_mask(shape, seed, p)
        assert torch.equal(dropout_mask(shape, seed, p, torch.float32), expected)
        assert torch.equal(philox_keep_mask(shape, seed.cpu(), p), expected.cpu())
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            x = torch.randn(shape, device="cuda", dtype=dtype)
            assert torch.equal(dropout_mul(x, seed, p), (x * expected).mul_(keep_scale(p)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_cuda_graph_capture_before_the_backend_decision_takes_the_pytorch_path(monkeypatch):

    monkeypatch.setattr(kernels, "_triton_selected", None)
    shape, seed = torch.Size((33, 1001)), torch.tensor(2**62 + 3, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        mask = dropout_mask(shape, seed, 0.3, torch.float32)
    graph.replay()
    assert kernels._triton_selected is None  # decided at the first mask outside capture
    assert torch.equal(mask, philox_keep_mask(shape, seed, 0.3))
