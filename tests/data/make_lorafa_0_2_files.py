"""Wrote lorafa-0.2-roberta-tiny.ckpt, lorafa-0.2-adapter/ and lorafa-0.2-expected.pt with lightning-lorafa of
commit 145db6e (before the package's restructure into layers), so that tests can check that checkpoints and adapters
of that version still load.

Run once, from the repository root, with that commit's package on the path:

    git archive 145db6e lightning_lorafa | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old:tests python tests/data/make_lorafa_0_2_files.py

The checkpoint is the LoraFA callback's adapter-only Lightning checkpoint after two steps (the default head trained
fully); the adapter directory is save_adapter's; expected.pt holds the trained module's logits on fixed tokens.
"""

import lightning.pytorch as pl
import torch
from conftest import VOCAB, tiny_roberta
from torch.utils.data import DataLoader, TensorDataset

import lightning_lorafa

TOKENS = torch.arange(3, 3 + 2 * 8).remainder(VOCAB).view(2, 8)


class Tuned(pl.LightningModule):
    """The module of tests/lightning/test_compatibility.py's ``Tuned``."""

    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = tiny_roberta(dropout=0.1).train()

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch[0], labels=batch[1]).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


if __name__ == "__main__":
    assert lightning_lorafa.__file__.startswith("/tmp/old"), lightning_lorafa.__file__
    torch.manual_seed(0)
    x = torch.randint(3, VOCAB, (16, 8), generator=torch.Generator().manual_seed(0))
    module = Tuned()
    trainer = pl.Trainer(max_steps=2, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                         callbacks=[lightning_lorafa.LoraFA(r=4, alpha=8, dropout=0.1)])
    trainer.fit(module, DataLoader(TensorDataset(x, x[:, 0] % 2), batch_size=4))
    trainer.save_checkpoint("tests/data/lorafa-0.2-roberta-tiny.ckpt")
    lightning_lorafa.save_adapter(module.model, "tests/data/lorafa-0.2-adapter")
    with torch.no_grad():
        torch.save({"logits": module.model.eval()(input_ids=TOKENS).logits}, "tests/data/lorafa-0.2-expected.pt")
