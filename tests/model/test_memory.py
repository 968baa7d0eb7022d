"""Saved-activation accounting: exact bytes per storage, op labels, weights apart, LoRA-FA dropout for free."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, tiny_roberta
from torch import nn

from lightning_lorafa import apply_lorafa
from lightning_lorafa.model.dropouts import keep_dropout_seeds
from lightning_lorafa.profiling import SavedActivationRecorder, measure_saved_activations, measure_step


def test_mlp_saved_bytes_are_exact_and_weights_apart():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    x = torch.randn(5, 8)
    report = measure_saved_activations(lambda: mlp(x).sum())
    # linear 1 keeps its input (5x8), GELU its input (5x16), linear 2 its input (5x16); fp32.
    assert report.total_bytes == 4 * (5 * 8 + 5 * 16 + 5 * 16)
    assert report.num_tensors == 3
    assert report.by_op == {"linear": 4 * (5 * 8 + 5 * 16), "gelu": 4 * 5 * 16}
    assert report.weight_bytes == 4 * 16 * 4  # linear 2 keeps its weight to pass the gradient to GELU


def test_storages_are_counted_once_and_whole():
    x = torch.randn(6, 10, requires_grad=True)
    report = measure_saved_activations(lambda: (x.sin() + x.cos() + x[:, :2].exp().sum()).sum())
    # sin and cos both keep x (once); exp keeps its result, a fresh 6x2 storage.
    assert report.total_bytes == 4 * (6 * 10 + 6 * 2)
    assert report.by_op == {"sin": 4 * 6 * 10, "exp": 4 * 6 * 2}


def test_custom_autograd_functions_are_named_and_buffers_of_the_module_are_weights():
    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):
            ctx.save_for_backward(w)
            return x * w

        @staticmethod
        def backward(ctx, grad):
            (w,) = ctx.saved_tensors
            return grad * w, None

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("w", torch.randn(3))

        def forward(self, x):
            return Scale.apply(x, self.w) * Scale.apply(x, x.detach() * 2)

    net, x = Net(), torch.randn(4, 3, requires_grad=True)
    report = measure_saved_activations(lambda: net(x), module=net)
    assert report.weight_bytes == 4 * 3
    assert report.by_op["Scale"] == 4 * 4 * 3
    assert measure_saved_activations(lambda: net(x)).by_op["Scale"] == 4 * (3 + 4 * 3)


def test_recorder_split_across_hooks_and_markdown():
    model = tiny_roberta(dropout=0.1).train()
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    recorder = SavedActivationRecorder(model)
    recorder.__enter__()
    loss = model(input_ids=ids, labels=torch.tensor([0, 1])).loss
    recorder.__exit__(None, None, None)
    loss.backward()
    report = recorder.report()
    assert report.total_bytes == sum(report.by_op.values()) > 0
    table = str(report)
    assert table.startswith("| op | activation MiB | tensors |")
    assert f"| **total** | **{report.total_bytes / 2**20:.2f}** | **{report.num_tensors}** |" in table
    again = measure_saved_activations(lambda: model(input_ids=ids, labels=torch.tensor([0, 1])).loss, model)
    assert again.total_bytes == report.total_bytes


def test_lorafa_dropout_costs_no_activation_memory():
    """Whole model with LoRA-FA and replaced dropouts: lora_dropout 0.1 saves what 0.0 saves plus one seed a layer."""
    ids = torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 1, 0])
    saved = {}
    for lora_dropout in (0.0, 0.1):
        model = tiny_roberta(dropout=0.1).train()
        apply_lorafa(
            model,
            r=4,
            alpha=8,
            dropout=lora_dropout,
            target_modules=["query", "key", "value", "dense"],
            modules_to_save=["classifier"],
        )
        keep_dropout_seeds(model)
        saved[lora_dropout] = measure_saved_activations(lambda m=model: m(input_ids=ids, labels=labels).loss, model)
    seeds = 8 * (2 * 6 - 3)  # an int64 seed per layer whose input needs a gradient (not the first q, k, v)
    assert saved[0.1].total_bytes == saved[0.0].total_bytes + seeds > seeds
    assert "dropout" not in saved[0.1].by_op
    h = 4 * 16 * 4 * 4 * 2 * 6  # h: (4, 16, r=4) fp32, 6 per layer
    assert saved[0.0].by_op["lora_fa_branch"] == saved[0.1].by_op["lora_fa_branch"] == h
    assert saved[0.1].by_op["dropout seed"] - saved[0.0].by_op.get("dropout seed", 0) == seeds


def test_measure_step_on_cpu_reports_no_peak_memory():
    calls = []
    stats = measure_step(lambda: calls.append(1), tokens=1000, repeats=3, warmup=2, device="cpu")
    assert len(calls) == 5
    assert stats.peak_allocated_bytes is None
    assert stats.tokens_per_second == 1000 / stats.seconds


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_measure_step_on_cuda_reports_peak_memory():
    x = torch.randn(1024, 1024, device="cuda", requires_grad=True)
    stats = measure_step(lambda: (x @ x).sum().backward(), tokens=1024, device=x.device)
    assert stats.peak_allocated_bytes >= 2 * x.numel() * x.element_size()
