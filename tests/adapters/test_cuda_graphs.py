"""On CUDA, forward and backward of LoRA-FA layers, seed-kept dropout and attention never wait for the host:
no synchronising call, and a whole forward + backward can be captured in a CUDA graph and replayed (GPU only)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_lorafa import LoraFALinear
from lightning_lorafa.adapters.dropout import RecomputedDropout
from lightning_lorafa.model.attention import recomputed_dropout_sdpa

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")


class Block(nn.Module):
    """x (B, S, 64) -> (B, S, 64): attention with probability dropout and an MLP, every linear a LoRA-FA layer
    with LoRA dropout, every hidden dropout seed-kept."""

    def __init__(self, width: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = LoraFALinear(nn.Linear(width, 3 * width), r=4, alpha=8, dropout=0.1, seed=1)
        self.out = LoraFALinear(nn.Linear(width, width), r=4, alpha=8, dropout=0.1, seed=2)
        self.up = LoraFALinear(nn.Linear(width, 4 * width), r=4, alpha=8, dropout=0.1, seed=3)
        self.down = LoraFALinear(nn.Linear(4 * width, width), r=4, alpha=8, dropout=0.1, seed=4)
        self.norm = nn.LayerNorm(width)
        self.drop = RecomputedDropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape
        q, k, v = self.qkv(x).view(batch, seq, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # (B, H, S, D) each
        p = 0.1 if self.training else 0.0
        attended, _ = recomputed_dropout_sdpa(self, q, k, v, None, dropout=p, is_causal=False)
        x = self.norm(x + self.drop(self.out(attended.reshape(batch, seq, width))))
        return x + self.drop(self.down(nn.functional.gelu(self.up(x))))


def _block_and_input() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block()).cuda().train()
    for module in model.modules():
        if isinstance(module, LoraFALinear):
            nn.init.normal_(module.lora_B, std=0.02)
    return model, torch.randn(2, 16, 64, device="cuda")


def _forward_backward(model: nn.Module, x: torch.Tensor) -> None:
    model(x).square().mean().backward()


def test_forward_and_backward_never_synchronise():
    model, x = _block_and_input()
    _forward_backward(model, x)  # compiles the Triton kernels and fills the layers' caches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _forward_backward(model, x)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_forward_and_backward_replay_from_a_cuda_graph():
    model, x = _block_and_input()
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(name.endswith("lora_B") for name, p in model.named_parameters() if p.requires_grad)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as whole-network capture requires
        for _ in range(3):
            for p in params:
                p.grad = None
            _forward_backward(model, x)
    torch.cuda.current_stream().wait_stream(side)
    for p in params:
        p.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _forward_backward(model, x)
    grads = []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        grads.append([p.grad.clone() for p in params])
    assert all(torch.isfinite(g).all() for g in grads[0])
    # Each replay draws fresh seeds on the device (the graph advances the RNG offset), so the dropout masks and
    # with them the gradients differ between replays: nothing was frozen on the host at capture time.
    assert any(not torch.equal(a, b) for a, b in zip(grads[0], grads[1], strict=True))

    model.eval()  # no dropout: a replayed graph then gives the eager gradients
    for p in params:
        p.grad = None
    eager_graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):
        _forward_backward(model, x)
    torch.cuda.current_stream().wait_stream(side)
    eager = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    with torch.cuda.graph(eager_graph):
        _forward_backward(model, x)
    eager_graph.replay()
    torch.cuda.synchronize()
    for p, e in zip(params, eager, strict=True):  # the same kernels; attention's backward may sum in another order
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-7)
