"""Checkpoints and adapters written by earlier versions still load and give the trained outputs: the LoraFA
callback's adapter-only checkpoint and save_adapter's directory of the version before the package's restructure
(tests/data/make_lorafa_0_2_files.py wrote them). Those of 0.1: tests/lightning/test_user_choices.py."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from conftest import VOCAB, quiet_trainer, tiny_roberta
from torch.utils.data import DataLoader, TensorDataset

from lightning_lorafa import LoraFA, load_adapter, load_from_checkpoint

DATA = Path(__file__).parents[1] / "data"
TOKENS = torch.arange(3, 3 + 2 * 8).remainder(VOCAB).view(2, 8)


class Tuned(pl.LightningModule):
    """The module tests/data/make_lorafa_0_2_files.py trained."""

    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = tiny_roberta(dropout=0.1).train()

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch[0], labels=batch[1]).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


def expected() -> torch.Tensor:
    return torch.load(DATA / "lorafa-0.2-expected.pt", weights_only=True)["logits"]


def test_a_checkpoint_of_the_previous_version_loads_and_gives_its_logits():
    module = load_from_checkpoint(Tuned, DATA / "lorafa-0.2-roberta-tiny.ckpt")
    with torch.no_grad():
        assert torch.equal(module.model.eval()(input_ids=TOKENS).logits, expected())


def test_an_adapter_of_the_previous_version_loads_and_gives_its_logits():
    model = load_adapter(tiny_roberta(dropout=0.1), DATA / "lorafa-0.2-adapter")
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=TOKENS).logits, expected())


def test_training_resumes_from_a_checkpoint_of_the_previous_version(tmp_path):
    x = torch.randint(3, VOCAB, (16, 8), generator=torch.Generator().manual_seed(0))
    module = Tuned()
    trainer = quiet_trainer(tmp_path, max_steps=4, callbacks=[LoraFA(r=4, alpha=8, dropout=0.1)])
    trainer.fit(module, DataLoader(TensorDataset(x, x[:, 0] % 2), batch_size=4),
                ckpt_path=DATA / "lorafa-0.2-roberta-tiny.ckpt")
    assert trainer.global_step == 4
