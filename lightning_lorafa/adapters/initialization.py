"""How the frozen A (r, d_in) of a LoRA-FA adapter is drawn, and from which seed.

- ``"kaiming"``: PEFT's LoRA A, Kaiming-uniform with ``a = sqrt(5)``: entries uniform in
  ``[-1/sqrt(d_in), 1/sqrt(d_in)]``, so each row has squared norm about 1/3 and ``A A^T`` is close to ``I / 3``.
- ``"orthogonal"``: rows orthonormal, ``A A^T = I`` exactly: ``x A^T`` is the orthogonal projection of x onto
  a random r-dimensional subspace (uniformly distributed), and B's gradient correction reduces to ``1 / s^2``.

Both draws happen on CPU in float32 from the layer's seed, so a seed gives the same A on every device and dtype.
Under Adam the scale of A acts as a multiplier of B's learning rate (B's update is normalised; the weight change
is ``s * dB A``): orthonormal rows are sqrt(3) times longer than Kaiming's on average.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn

from lightning_lorafa.settings import INIT_A


def layer_seed(seed: int, name: str) -> int:
    """Seed of the A matrix of the layer called ``name``: distinct per layer, reproducible from ``seed``."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63


def expert_seed(seed: int, expert: int) -> int:
    """Seed of expert ``expert``'s A in a stack of experts, from the projection's seed."""
    return (seed + 7919 * (expert + 1)) % 2**63


def draw_lora_A(r: int, d_in: int, seed: int, init_a: str = "kaiming") -> torch.Tensor:
    """A frozen A of shape (r, d_in), float32 on CPU, drawn from ``seed``.

    ``"orthogonal"``: the Q factor of a Gaussian (d_in, r) matrix with the signs of R's diagonal folded in
    (Haar-distributed orthonormal columns), transposed to rows.
    """
    generator = torch.Generator().manual_seed(seed)
    if init_a == "kaiming":
        values = torch.empty(r, d_in, dtype=torch.float32)
        return nn.init.kaiming_uniform_(values, a=math.sqrt(5), generator=generator)
    if init_a != "orthogonal":
        raise ValueError(f"init_a must be one of {list(INIT_A)}, got {init_a!r}.")
    if r > d_in:
        raise ValueError(f"init_a='orthogonal' needs r <= d_in, got r={r}, d_in={d_in}.")
    gaussian = torch.randn(d_in, r, dtype=torch.float64, generator=generator)
    q, rr = torch.linalg.qr(gaussian)  # q: (d_in, r)
    q = q * torch.sign(torch.diagonal(rr)).where(torch.diagonal(rr) != 0, torch.ones(()))
    return q.t().contiguous().float()
