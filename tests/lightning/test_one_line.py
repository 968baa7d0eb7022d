"""The one-line promise: ``LoraFA(r=8)`` alone trains a fresh task head, saves it and reloads it; errors name what
is wrong and say what to do."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import VOCAB, TwoLayerNet, quiet_trainer, tiny_llama, tiny_roberta
from peft import PeftModel
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import BertConfig, BertForMaskedLM, BertForQuestionAnswering, BertForTokenClassification

from lightning_lorafa import LoraFA, apply_lorafa, export_peft, load_from_checkpoint
from lightning_lorafa.adapters.find import lorafa_layers
from lightning_lorafa.model.select import find_task_heads

ROOT = Path(__file__).resolve().parents[2]


def tiny_bert_config(num_labels: int = 3) -> BertConfig:
    torch.manual_seed(0)
    return BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, num_labels=num_labels,
    )


BUILDERS = {
    "sequence classification": lambda: tiny_roberta(),
    "token classification": lambda: BertForTokenClassification(tiny_bert_config()),
    "question answering": lambda: BertForQuestionAnswering(tiny_bert_config(num_labels=2)),
}


class Tuner(pl.LightningModule):
    """A user's module around a transformers model: ``kind`` picks the model and its loss."""

    def __init__(self, kind: str = "sequence classification") -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = BUILDERS[kind]().train()

    def training_step(self, batch, batch_idx):
        (input_ids,) = batch
        kind = self.hparams.kind
        if kind == "question answering":
            return self.model(input_ids=input_ids, start_positions=input_ids[:, 0] % 8,
                              end_positions=input_ids[:, 1] % 8).loss
        labels = input_ids[:, 0] % 2 if kind == "sequence classification" else input_ids % 3
        return self.model(input_ids=input_ids, labels=labels).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def data() -> DataLoader:
    x = torch.randint(3, VOCAB, (16, 8), generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(x), batch_size=4)


def fit(tmp_path: Path, module: pl.LightningModule, callback: LoraFA, steps: int = 4, **kwargs) -> pl.Trainer:
    trainer = quiet_trainer(tmp_path, max_steps=steps, callbacks=[callback], **kwargs)
    trainer.fit(module, data())
    return trainer


def outputs(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = model(input_ids=input_ids)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.start_logits


@pytest.mark.parametrize("kind, head", [("sequence classification", "classifier"), ("token classification",
                         "classifier"), ("question answering", "qa_outputs")])
def test_lorafa_alone_trains_the_fresh_head_saves_it_and_reloads_the_trained_outputs(tmp_path, kind, head, caplog):
    module = Tuner(kind)
    before = {n: p.detach().clone() for n, p in getattr(module.model, head).named_parameters()}
    with caplog.at_level("INFO"):
        trainer = fit(tmp_path, module, LoraFA(r=8))
    assert module.model.lorafa_config.modules_to_save == [head]
    assert f"fully trained: {head}" in caplog.text
    assert all(not torch.equal(p, before[n]) for n, p in getattr(module.model, head).named_parameters())
    path = tmp_path / "trained.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["state_dict"]  # our checkpoints load weights-only
    assert {k for k in state if k.startswith(f"model.{head}.")} == {f"model.{head}.{n}" for n in before}
    assert all(k.endswith((".lora_A", ".lora_B")) or k.startswith(f"model.{head}.") for k in list(state)[1:])

    input_ids = torch.randint(3, VOCAB, (3, 8), generator=torch.Generator().manual_seed(1))
    expected = outputs(module.model, input_ids)
    reloaded = load_from_checkpoint(Tuner, path)
    assert torch.equal(outputs(reloaded.model, input_ids), expected)
    assert lorafa_layers(reloaded.model).keys() == lorafa_layers(module.model).keys()


def test_resume_restores_the_trained_head_exactly(tmp_path):
    torch.manual_seed(0)
    straight = Tuner()
    fit(tmp_path / "a", straight, LoraFA(r=8), steps=-1, max_epochs=2)  # two epochs of 4 batches
    torch.manual_seed(0)
    first = Tuner()
    trainer = fit(tmp_path / "b", first, LoraFA(r=8), steps=-1, max_epochs=1)  # a checkpoint at the epoch's end
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    resumed = Tuner()
    trainer = quiet_trainer(tmp_path, max_epochs=2, callbacks=[LoraFA(r=8)])
    trainer.fit(resumed, data(), ckpt_path=tmp_path / "half.ckpt")
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_export_peft_of_the_default_head_loads_in_peft_with_the_trained_logits(tmp_path):
    module = Tuner()
    fit(tmp_path, module, LoraFA(r=8))
    export_peft(module.model, tmp_path / "adapter", task_type="SEQ_CLS")
    input_ids = torch.randint(3, VOCAB, (3, 8), generator=torch.Generator().manual_seed(1))
    expected = outputs(module.model, input_ids)
    peft_model = PeftModel.from_pretrained(tiny_roberta(), tmp_path / "adapter")
    torch.testing.assert_close(outputs(peft_model, input_ids), expected, rtol=1e-5, atol=1e-6)


def test_language_model_heads_tied_or_pretrained_stay_frozen():
    llama = tiny_llama()
    assert find_task_heads(llama) == []
    apply_lorafa(llama, r=4)
    assert llama.lorafa_config.modules_to_save == [] and not llama.lm_head.weight.requires_grad
    assert find_task_heads(BertForMaskedLM(tiny_bert_config())) == []  # cls holds the tied decoder
    assert find_task_heads(TwoLayerNet()) == ["head"]  # a plain torch model's output layer is its head


# ---------------------------------------------------------------- errors that say what is wrong
@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"alpha": "32"}, TypeError, r"LoraFA\(alpha='32'\): alpha must be a number, got str"),
        ({"r": 8.0}, TypeError, r"LoraFA\(r=8.0\): r must be an integer, got float"),
        ({"r": 0}, ValueError, r"LoraFA\(r=0\): r must be >= 1"),
        ({"dropout": 1.0}, ValueError, r"LoraFA\(dropout=1.0\): dropout must be in \[0, 1\)"),
        ({"seed": -1}, ValueError, r"LoraFA\(seed=-1\): seed must be >= 0"),
        ({"use_rslora": "yes"}, TypeError, r"LoraFA\(use_rslora='yes'\): use_rslora must be True or False"),
        ({"target_modules": None}, ValueError, r"LoraFA\(target_modules=None\): pass 'all-linear'"),
        ({"target_modules": [1]}, TypeError, r"target_modules must be a list of module names"),
        ({"modules_to_save": [""]}, TypeError, r"modules_to_save must be a list of module names"),
        ({"recompute": "full"}, ValueError, r"LoraFA\(recompute='full'\): recompute must be one of"),
        ({"attn_implementation": "flash"}, ValueError, r"attn_implementation must be one of"),
        ({"lr": -1.0}, ValueError, r"LoraFA\(lr=-1.0\): lr must be a positive number"),
        ({"report_memory": 1}, TypeError, r"report_memory must be True or False"),
    ],
)
def test_every_argument_is_checked_and_named(kwargs, error, message):
    with pytest.raises(error, match=message):
        LoraFA(**kwargs)


def test_apply_lorafa_names_its_arguments_and_rejects_unknown_ones():
    with pytest.raises(TypeError, match=r"LoraFASettings\(alpha='32'\): alpha must be a number, got str"):
        apply_lorafa(tiny_roberta(), alpha="32")
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['rank'\]; its settings are \['r', 'alpha'"):
        apply_lorafa(tiny_roberta(), rank=4)


def test_a_plain_string_target_that_is_a_suffix_says_to_pass_a_list():
    with pytest.raises(ValueError, match=r"A string is a regex that must match whole module names; 2 layers end in "
                       r"'query': to match them by suffix pass a list, target_modules=\['query'\]"):
        apply_lorafa(tiny_roberta(), r=4, target_modules="query")


def test_suggestions_come_from_the_models_own_layers():
    with pytest.raises(ValueError, match=r"suffixes \['down_proj', 'gate_proj'.*\(e.g. \['down_proj', 'gate_proj'\]\)"):
        apply_lorafa(tiny_llama(), r=4, target_modules=["query"])


def test_a_model_without_linear_layers_is_told_so():
    with pytest.raises(ValueError, match=r"It has no nn.Linear layers, so there is nothing LoRA-FA can adapt\.$"):
        apply_lorafa(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()), r=1)


def test_layers_of_a_sequential_are_named_by_their_index():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 3), nn.Linear(3, 8)))
    with pytest.raises(ValueError, match=r"exceeds min\(in_features, out_features\) of: model\[2\]\[0\] \(8 -> 3\)"):
        apply_lorafa(model, r=4)


def test_resuming_from_a_checkpoint_of_plain_training_says_it_holds_no_adapter(tmp_path):
    plain = Tuner()
    trainer = quiet_trainer(tmp_path, max_steps=1)
    trainer.fit(plain, data())
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    with pytest.raises(ValueError, match=r"holds no LoRA-FA adapter .* training without LoraFA\. To start LoRA-FA from "
                       r"its weights"):
        pl.Trainer(max_steps=2, callbacks=[LoraFA(r=4)], logger=False, enable_progress_bar=False,
                   enable_checkpointing=False, default_root_dir=tmp_path).fit(
            Tuner(), data(), ckpt_path=tmp_path / "plain.ckpt")
    with pytest.raises(ValueError, match="holds no LoraFA callback state"):
        load_from_checkpoint(Tuner, tmp_path / "plain.ckpt")


def test_a_cli_typo_is_one_line_with_the_closest_options():
    done = subprocess.run(
        [sys.executable, "-m", "lightning_lorafa.tasks.cli", "fit", "--config", "configs/demo.yaml",
         "--trainer.max_stepz", "3"], capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    at = next(i for i, line in enumerate(lines) if "error:" in line)
    assert lines[at].endswith(" fit: error: unrecognized arguments: --trainer.max_stepz 3"), done.stderr
    assert "did you mean --trainer.max_steps" in lines[at + 1] and "--help" in lines[at + 2]
    assert len(lines) - at == 3 and "usage:" not in done.stderr
