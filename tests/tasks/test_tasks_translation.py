"""Translation: text-pair files, the task prefix, and sacreBLEU / ROUGE-L over generated translations."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import sacrebleu
import torch
from tiny_checkpoints import write_text_pairs

from lightning_lorafa.tasks import TranslationDataModule, Translator
from lightning_lorafa.tasks.translation import read_text_pairs

WMT = Path(__file__).resolve().parents[2] / "data" / "wmt16_en_ro" / "newstest2016-enro"


def test_shipped_newstest_slice_is_line_aligned() -> None:
    pairs = read_text_pairs(str(WMT), "en", "ro")
    assert len(pairs) == 200 and pairs.column_names == ["en", "ro"]
    assert pairs[0]["ro"] == "Șeful ONU declară că nu există soluții militare în Siria"


def test_misaligned_pairs_are_refused(tmp_path: Path) -> None:
    (tmp_path / "x.en").write_text("a\nb\n")
    (tmp_path / "x.ro").write_text("a\n")
    with pytest.raises(
        ValueError, match="'.*x.en' has 2 lines but '.*x.ro' has 1; the files must be line-aligned"
    ):
        read_text_pairs(str(tmp_path / "x"), "en", "ro")
    with pytest.raises(FileNotFoundError, match=r"data_files\['train'\]: '.*y.en' does not exist"):
        TranslationDataModule("unused", data_files={"train": str(tmp_path / "y")})


def test_sources_get_the_prefix_and_targets_become_labels(
    task_checkpoints: dict[str, str], tmp_path: Path
) -> None:
    stem = write_text_pairs(tmp_path)
    data = TranslationDataModule(
        task_checkpoints["t5"], data_files={"train": stem, "validation": stem}, max_target_length=2
    )
    data.setup("fit")
    row = data.datasets["train"][0]
    assert data.tokenizer.convert_ids_to_tokens(row["input_ids"]) == [
        "translate",
        "English",
        "to",
        "Romanian",
        ":",
        "the",
        "house",
        "is",
        "red",
    ]
    assert data.tokenizer.convert_ids_to_tokens(row["labels"]) == ["casa", "rosu"]
    batch = data.collate([data.datasets["train"][0], data.datasets["train"][5]])
    assert batch["labels"].tolist()[1][1] == -100  # "bun" is one token: the label is padded with -100


def test_validation_scores_match_sacrebleu_and_rouge(
    task_checkpoints: dict[str, str], tmp_path: Path
) -> None:
    stem = write_text_pairs(tmp_path)
    data = TranslationDataModule(task_checkpoints["t5"], data_files={"validation": stem}, eval_batch_size=3)
    model = Translator(task_checkpoints["t5"], max_new_tokens=4)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    [logged] = trainer.validate(model, datamodule=data, verbose=False)
    model.eval()
    predictions, references = [], []
    with torch.no_grad():
        for batch in data.val_dataloader():
            predictions += model.translate(batch)
            references += model.references(batch["labels"])
    assert references[:2] == ["casa rosu", "pisica albastru"]
    expected = sacrebleu.corpus_bleu(predictions, [references], tokenize="13a").score / 100
    assert logged["val/bleu"] == pytest.approx(expected, abs=1e-6)
    assert 0.0 <= logged["val/rougeL"] <= 1.0 and set(logged) == {"val/loss", "val/bleu", "val/rougeL"}


def test_identical_translations_score_one(task_checkpoints: dict[str, str]) -> None:
    model = Translator(task_checkpoints["t5"])
    sentences = ["casa rosu este foarte buna", "pisica albastru doarme acum"]
    model.bleu["val"].update(sentences, [[s] for s in sentences])
    model.rouge["val"].update(sentences, sentences)
    assert model.bleu["val"].compute().item() == pytest.approx(1.0)
    assert model.rouge["val"].compute()["rougeL_fmeasure"].item() == 1.0
