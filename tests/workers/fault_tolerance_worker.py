"""One training process for tests/lightning/test_fault_tolerance.py:
``python tests/workers/fault_tolerance_worker.py MODE OUT_DIR``.

Trains a tiny RoBERTa with LoRA-FA and dropout for 8 steps (one shuffled epoch of 8 batches from a
``StatefulDataLoader``), checkpointing every 2 steps and ``last.ckpt`` through ``AtomicCheckpointIO``.
MODE ``straight`` runs through; ``kill`` SIGKILLs itself while writing the step-6 checkpoint (mid-epoch,
mid-write); ``resume`` continues from ``ckpt_path="last"``.
Writes ``OUT_DIR/MODE.pt``: the batches trained on (global step, batch index, first token ids) and B.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: conftest
from conftest import VOCAB, tiny_roberta  # noqa: E402

from lightning_lorafa import AtomicCheckpointIO, LoraFA
from lightning_lorafa.tasks.common import stateful_loader  # noqa: E402

KILL_AT_STEP = 6


class KillWhilePickled:
    """Kills the process (SIGKILL) when ``torch.save`` reaches it: a crash in the middle of writing a file."""

    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGKILL)


class KillDuringCheckpoint(pl.Callback):
    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if trainer.global_step == KILL_AT_STEP:
            checkpoint["crash"] = KillWhilePickled()


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_roberta(dropout=0.1).train()
        self.seen: list[tuple[int, int, list[int]]] = []

    def training_step(self, batch, batch_idx):
        input_ids, labels = batch
        self.seen.append((self.trainer.global_step, batch_idx, input_ids[:, 0].tolist()))
        return self.model(input_ids=input_ids, labels=labels).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def data() -> DataLoader:
    """16 samples in 8 shuffled batches of 2, from the loader the task data modules use (a StatefulDataLoader)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(3, VOCAB, (16, 8), generator=generator)
    return stateful_loader(TensorDataset(x, x[:, 0] % 2), batch_size=2, shuffle=True, seed=0)


def main(mode: str, out: Path) -> None:
    pl.seed_everything(0, verbose=False)
    callbacks = [
        LoraFA(r=4, alpha=8, dropout=0.1, modules_to_save=["classifier"], attn_implementation=None),
        ModelCheckpoint(dirpath=out / f"{mode}-ckpts", every_n_train_steps=2, save_top_k=-1, save_last=True),
    ]
    if mode == "kill":
        callbacks.append(KillDuringCheckpoint())
    trainer = pl.Trainer(
        max_steps=8,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )
    module = Classifier()
    ckpt_path = "last" if mode == "resume" else None
    if mode == "resume":  # ModelCheckpoint finds "last" in its own directory: point it at the killed run's
        callbacks[1].dirpath = str(out / "kill-ckpts")
    trainer.fit(module, data(), ckpt_path=ckpt_path)
    B = {n: p.detach().clone() for n, p in module.named_parameters() if n.endswith("lora_B")}
    torch.save({"seen": module.seen, "B": B, "global_step": trainer.global_step}, out / f"{mode}.pt")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
