"""Reading checkpoints: weights-only by default everywhere (a file carrying a pickled call is refused without running
it), ``weights_only=False`` as the caller's explicit choice, and messages that say what to do."""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import VOCAB, quiet_trainer, tiny_roberta
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import PreTrainedTokenizerFast

from lightning_lorafa import LoraFA, load_from_checkpoint
from lightning_lorafa.model.safe_load import load_sharded, read_sharded_state


class Payload:
    """Unpickling it runs ``os.system("touch <path>")``: what a hostile checkpoint would do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


class Tuner(pl.LightningModule):
    def __init__(self, note: object = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = tiny_roberta().train()

    def training_step(self, batch, batch_idx):
        (input_ids,) = batch
        return self.model(input_ids=input_ids, labels=input_ids[:, 0] % 2).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def trained_checkpoint(tmp_path: Path, module: pl.LightningModule | None = None) -> Path:
    x = torch.randint(3, VOCAB, (8, 8), generator=torch.Generator().manual_seed(0))
    trainer = quiet_trainer(tmp_path, max_steps=2, callbacks=[LoraFA(r=4)])
    trainer.fit(module or Tuner(), DataLoader(TensorDataset(x), batch_size=4))
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    return tmp_path / "run.ckpt"


def poisoned(path: Path, marker: Path) -> Path:
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["hyper_parameters"]["note"] = Payload(marker)
    torch.save(checkpoint, path.with_name("poisoned.ckpt"))
    return path.with_name("poisoned.ckpt")


def test_a_checkpoint_carrying_a_pickled_call_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    path = poisoned(trained_checkpoint(tmp_path), marker)
    with pytest.raises(ValueError, match=r"poisoned.ckpt holds objects that weights-only loading refuses .*Loading "
                       r"them would run code from the file\. If you trust it .*pass weights_only=False"):
        load_from_checkpoint(Tuner, path)
    assert not marker.exists()
    load_from_checkpoint(Tuner, path, weights_only=False)  # the caller's explicit choice: it trusts the file
    assert marker.exists()


def test_hyper_parameters_holding_a_tokenizer_are_named_with_the_fix(tmp_path, task_checkpoints):
    tokenizer = PreTrainedTokenizerFast.from_pretrained(task_checkpoints["roberta"])
    path = trained_checkpoint(tmp_path, Tuner(note=tokenizer))
    with pytest.raises(ValueError, match=r"self\.save_hyperparameters\(ignore=\[\.\.\.\]\) keeps it out"):
        load_from_checkpoint(Tuner, path)
    assert isinstance(load_from_checkpoint(Tuner, path, weights_only=False).hparams.note, PreTrainedTokenizerFast)


def test_ours_loads_without_misleading_messages_and_lightnings_own_loader_names_ours(tmp_path):
    path = trained_checkpoint(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "Found keys that are not in the model state dict" for the adapter
        load_from_checkpoint(Tuner, path)
    with pytest.raises(RuntimeError, match=r"LoRA-FA adapter-only checkpoint: load it with "
                       r"lightning_lorafa\.load_from_checkpoint\(MyModule, path\)"):
        Tuner.load_from_checkpoint(path)


def test_a_model_built_in_setup_is_refused_with_advice_that_helps(tmp_path):
    class BuildsInSetup(Tuner):
        def __init__(self) -> None:
            pl.LightningModule.__init__(self)

        def setup(self, stage: str) -> None:
            self.model = tiny_roberta()

    trainer = pl.Trainer(max_steps=1, callbacks=[LoraFA(r=4)], logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=r"Lightning runs before LightningModule.setup, so a model built in setup\(\) "
                       r"does not exist yet\. Build it in __init__, or in configure_model") as error:
        trainer.fit(BuildsInSetup(), DataLoader(TensorDataset(torch.zeros(4, 8, dtype=torch.long)), batch_size=4))
    assert "model_attr" not in str(error.value)


def test_sharded_checkpoints_are_read_weights_only_too(tmp_path):
    state = {"state_dict": {"model.w": torch.arange(6.0).view(2, 3)}, "step": 3}
    dcp.save(state, checkpoint_id=tmp_path / "good", no_dist=True)
    assert torch.equal(read_sharded_state(tmp_path / "good")["model.w"], state["state_dict"]["model.w"])
    marker = tmp_path / "ran"
    dcp.save({"state_dict": {"model.w": torch.zeros(2)}, "note": Payload(marker)}, checkpoint_id=tmp_path / "entry",
             no_dist=True)
    with pytest.raises(ValueError, match=r"The checkpoint entry note holds objects that weights-only loading refuses"):
        load_sharded({"note": None}, tmp_path / "entry")
    assert not marker.exists()
    metadata = (tmp_path / "good" / ".metadata").read_bytes()
    (tmp_path / "good" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))  # a pickle that is not DCP's
    with pytest.raises(ValueError, match=r"\.metadata holds objects that weights-only loading refuses \(the "
                       r"checkpoint metadata names posix\.system, which is not part of its format\)"):
        read_sharded_state(tmp_path / "good")
    assert not marker.exists()
    (tmp_path / "good" / ".metadata").write_bytes(metadata)
    assert read_sharded_state(tmp_path / "good", weights_only=False).keys() == {"model.w"}


def test_the_unwrapped_model_is_what_tests_compare(tmp_path):
    """A module without the callback's model attribute is converted itself: its keys carry no prefix."""

    class Bare(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.encoder = nn.Linear(8, 8)
            self.out = nn.Linear(8, 2)

        def forward(self, x):
            return self.out(torch.relu(self.encoder(x)))

        def training_step(self, batch, batch_idx):
            return self(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module = Bare()
    trainer = quiet_trainer(tmp_path, max_steps=2, callbacks=[LoraFA(r=4)])
    trainer.fit(module, DataLoader(TensorDataset(torch.randn(8, 8)), batch_size=4))
    trainer.save_checkpoint(tmp_path / "bare.ckpt")
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(load_from_checkpoint(Bare, tmp_path / "bare.ckpt")(x), module(x))
