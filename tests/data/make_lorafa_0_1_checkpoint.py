"""Wrote lorafa-0.1-roberta-tiny.ckpt (and the trained tensors beside it) with lightning-lorafa 0.1.

Run once, from the repository root, with the package of commit b747210 first on the path:

    git archive b747210 lightning_lorafa | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old:tests python tests/data/make_lorafa_0_1_checkpoint.py

The 0.1 callback replaced the module's AdamW by a LoraFAOptimizer and stored only its settings.
"""

import lightning.pytorch as pl
import torch
from conftest import VOCAB, tiny_roberta
from torch.utils.data import DataLoader, TensorDataset

import lightning_lorafa


def data(n=24, batch_size=4):
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(3, VOCAB, (n, 8), generator=generator)
    return DataLoader(TensorDataset(x, (x[:, 0] % 2)), batch_size=batch_size)


class Scheduled(pl.LightningModule):
    """The hyper-parameters of tests/lightning/test_user_choices.py's ``Scheduled``."""

    def __init__(self, scheduler="none", lr=1e-3, optimizer="adamw", eps=1e-6):
        super().__init__()
        self.save_hyperparameters()
        self.model = tiny_roberta(dropout=0.1).train()

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch[0], labels=batch[1]).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, eps=self.hparams.eps, weight_decay=0.0)


if __name__ == "__main__":
    assert lightning_lorafa.__file__.startswith("/tmp/old"), lightning_lorafa.__file__
    torch.manual_seed(0)
    module = Scheduled("none")
    callback = lightning_lorafa.LoraFA(r=4, alpha=8, dropout=0.1, modules_to_save=["classifier"])
    trainer = pl.Trainer(
        max_steps=2, logger=False, enable_progress_bar=False, enable_checkpointing=False, callbacks=[callback]
    )
    trainer.fit(module, data())
    trainer.save_checkpoint("tests/data/lorafa-0.1-roberta-tiny.ckpt")
    trained = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
    torch.save(trained, "tests/data/lorafa-0.1-roberta-tiny-trained.pt")
