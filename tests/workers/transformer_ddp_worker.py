"""Lightning's demo Transformer (``nn.Transformer``: nn.MultiheadAttention in every layer) fitted with ``LoraFA(r=4)``
on 2 CPU processes under DDP, and on one process with the same global batches; the trainable tensors of each are
saved to ``<out>/rank{0,1}.pt`` and ``<out>/single.pt``. DDP fails on a parameter that gets no gradient, so a run
that finishes shows every adapter took part in the forward.

    python tests/workers/transformer_ddp_worker.py OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.demos import Transformer
from torch.nn import functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_lorafa import LoraFA

VOCAB = 40


class LanguageModel(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = Transformer(vocab_size=VOCAB, ninp=16, nhead=4, nhid=32, nlayers=1, dropout=0.0)

    def training_step(self, batch, batch_idx):
        (tokens,) = batch
        output = self.model(tokens[:, :-1], tokens[:, :-1])
        return F.nll_loss(output.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def data(batch_size: int, world_size: int = 1, rank: int = 0) -> DataLoader:
    """16 sequences; rank r takes every other one from r, so 2 ranks with batch 4 see what one process with batch 8
    sees per step."""
    tokens = torch.randint(0, VOCAB, (16, 9), generator=torch.Generator().manual_seed(0))
    dataset = TensorDataset(tokens)
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler)


def fit(devices: int) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_epochs=2,
        callbacks=[LoraFA(r=4, alpha=8)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    loader = data(8 // devices, devices, trainer.global_rank)
    trainer.fit(LanguageModel(), loader)
    return trainer


def trained(trainer: pl.Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.lightning_module.named_parameters() if p.requires_grad}


def main(out: Path) -> None:
    ddp = fit(2)
    torch.save(trained(ddp), out / f"rank{ddp.global_rank}.pt")
    if ddp.global_rank == 0:
        torch.save(trained(fit(1)), out / "single.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
