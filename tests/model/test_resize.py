"""Token embeddings resized for new tokens (``resize_token_embeddings``): the new rows are in no checkpoint of the
base model, so the resized weights travel with the adapter and a reload gives the trained logits exactly; a resize
the reloading code does not repeat is named with where to do it."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import VOCAB, quiet_trainer, randomize_lora_B, tiny_llama
from peft import PeftModel
from torch.utils.data import DataLoader, TensorDataset
from transformers import AutoModelForCausalLM

from lightning_lorafa import LoraFA, apply_lorafa, export_peft, load_adapter, load_from_checkpoint, save_adapter

NEW = 4  # tokens added, e.g. special tokens of a chat template


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("llama") / "base"
    tiny_llama().save_pretrained(path)
    return str(path)


def resized(base: str, seed: int) -> torch.nn.Module:
    """The base with NEW tokens added, their rows drawn by ``resize_token_embeddings`` (different for each seed)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    model.resize_token_embeddings(VOCAB + NEW)
    return model


def ids() -> torch.Tensor:
    return torch.tensor([[1, 5, VOCAB, VOCAB + 3, 7, VOCAB + 1]])  # new tokens among old ones


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids()).logits


def test_resized_rows_are_saved_with_the_adapter_and_reload_exactly(base, tmp_path):
    model = resized(base, seed=1)
    apply_lorafa(model, r=4, alpha=8)
    assert model.lorafa_config.vocabulary_rows == {"model.embed_tokens.weight": VOCAB, "lm_head.weight": VOCAB}
    randomize_lora_B(model)
    expected = logits(model)
    save_adapter(model, tmp_path / "adapter")
    fresh = resized(base, seed=2)
    assert not torch.equal(fresh.model.embed_tokens.weight[VOCAB:], model.model.embed_tokens.weight[VOCAB:])
    assert torch.equal(logits(load_adapter(fresh, tmp_path / "adapter")), expected)

    with pytest.raises(ValueError, match=r"holds model\.embed_tokens\.weight with 100 rows, but the model has 96: its "
                       r"token embeddings were resized in training \(resize_token_embeddings\)\. Resize them the same "
                       r"way before loading"):
        load_adapter(AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter")

    export_peft(model, tmp_path / "peft")  # PEFT's save_embedding_layers: into a base resized the same way
    peft_model = PeftModel.from_pretrained(resized(base, seed=3), tmp_path / "peft")
    torch.testing.assert_close(logits(peft_model), expected, rtol=1e-5, atol=1e-5)


def test_a_model_without_resize_keeps_the_adapter_small(base, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(base)
    apply_lorafa(model, r=4, alpha=8)
    save_adapter(model, tmp_path / "adapter")
    from safetensors.torch import load_file

    assert all(key.endswith(("lora_A", "lora_B")) for key in load_file(tmp_path / "adapter" / "adapter.safetensors"))


class Tuner(pl.LightningModule):
    """Loads the base and adds tokens where the user's code does: in ``__init__``, ``setup`` or ``on_fit_start``."""

    def __init__(self, base: str, resize_in: str = "__init__", seed: int = 1) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(seed)
        self.model = AutoModelForCausalLM.from_pretrained(base)
        if resize_in == "__init__":
            self.model.resize_token_embeddings(VOCAB + NEW)

    def setup(self, stage: str) -> None:
        if self.hparams.resize_in == "setup" and self.model.get_input_embeddings().num_embeddings == VOCAB:
            self.model.resize_token_embeddings(VOCAB + NEW)

    def on_fit_start(self) -> None:
        if self.hparams.resize_in == "on_fit_start":
            self.model.resize_token_embeddings(VOCAB + NEW)

    def training_step(self, batch, batch_idx):
        (input_ids,) = batch
        return self.model(input_ids=input_ids, labels=input_ids).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def fit(module: Tuner, root: Path, steps: int = 2, ckpt_path: Path | None = None) -> pl.Trainer:
    tokens = torch.randint(0, VOCAB + NEW, (8, 10), generator=torch.Generator().manual_seed(0))
    trainer = quiet_trainer(root, max_steps=steps, callbacks=[LoraFA(r=4, alpha=8)])
    trainer.fit(module, DataLoader(TensorDataset(tokens), batch_size=4), ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("resize_in", ["__init__", "setup", "on_fit_start"])
def test_a_lightning_run_that_adds_tokens_reloads_exactly_or_says_where_to_resize(base, tmp_path, resize_in):
    module = Tuner(base, resize_in)
    trainer = fit(module, tmp_path)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    expected = logits(module.model)
    if resize_in == "__init__":
        assert torch.equal(logits(load_from_checkpoint(Tuner, tmp_path / "run.ckpt", seed=2).model), expected)
    else:  # the module's __init__ does not add the tokens: the message says where to
        with pytest.raises(ValueError, match=r"model\.embed_tokens\.weight with 100 rows, but the model has 96.*in the "
                           r"LightningModule's __init__ or setup"):
            load_from_checkpoint(Tuner, tmp_path / "run.ckpt")
    if resize_in != "on_fit_start":  # resuming restores the new rows (after setup, where the model was resized)
        resumed = Tuner(base, resize_in, seed=3)
        fit(resumed, tmp_path / "resumed", steps=2, ckpt_path=tmp_path / "run.ckpt")
        assert torch.equal(logits(resumed.model), expected)
