"""GLUE: per-task metrics on hand-computable cases, local data loading and the classifier module."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from tiny_checkpoints import write_glue_files

from lightning_lorafa.tasks import GlueDataModule, SequenceClassifier
from lightning_lorafa.tasks.glue import GLUE_TASKS, glue_metrics

SST2 = Path(__file__).resolve().parents[2] / "data" / "sst2" / "train.tsv"


def scores(task: str, predictions: list[float], targets: list[float]) -> dict[str, float]:
    metrics = glue_metrics(task)
    integer = task != "stsb"
    metrics.update(
        torch.tensor(predictions), torch.tensor(targets, dtype=torch.long if integer else torch.float)
    )
    return {name: round(value.item(), 6) for name, value in metrics.compute().items()}


def test_cola_reports_matthews_correlation() -> None:
    # TP=1 FP=1 TN=2 FN=0: (1*2 - 1*0) / sqrt(2*1*3*2)
    assert scores("cola", [1, 1, 0, 0], [1, 0, 0, 0]) == {"mcc": round(2 / math.sqrt(12), 6)}


def test_stsb_reports_pearson_and_spearman() -> None:
    # x = [1, 2, 3], y = [2, 4, 7]: centred [-1, 0, 1] and [-7/3, -1/3, 8/3]; dot 5, |x| sqrt(2), |y| sqrt(38/3)
    result = scores("stsb", [1.0, 2.0, 3.0], [2.0, 4.0, 7.0])
    assert result == pytest.approx({"pearson": 5 / math.sqrt(2 * 38 / 3), "spearman": 1.0}, abs=2e-6)


@pytest.mark.parametrize("task", ["mrpc", "qqp"])
def test_mrpc_and_qqp_report_accuracy_and_f1(task: str) -> None:
    # TP=2 FP=1 FN=0 TN=1: accuracy 3/4, F1 = 2*2 / (2*2 + 1)
    assert scores(task, [1, 0, 1, 1], [1, 0, 0, 1]) == {"acc": 0.75, "f1": 0.8}


@pytest.mark.parametrize("task", ["sst2", "qnli", "rte"])
def test_binary_tasks_report_accuracy(task: str) -> None:
    assert scores(task, [1, 0, 1, 1, 0], [1, 1, 1, 0, 0]) == {"acc": 0.6}


def test_mnli_reports_three_class_accuracy_per_split() -> None:
    assert scores("mnli", [0, 1, 2, 2], [0, 1, 1, 2]) == {"acc": 0.75}
    assert GLUE_TASKS["mnli"].validation_splits == ("validation_matched", "validation_mismatched")


def test_validation_split_is_carved_from_the_shipped_sst2_file(task_checkpoints: dict[str, str]) -> None:
    def split(seed: int) -> GlueDataModule:
        data = GlueDataModule(
            task_checkpoints["bert"],
            data_files={"train": str(SST2)},
            validation_size=1000,
            max_train_samples=3000,
            seed=seed,
        )
        data.setup("fit")
        return data

    data = split(42)
    assert (len(data.datasets["train"]), len(data.datasets["validation"])) == (3000, 1000)
    assert data.evaluation_splits == ("validation",)
    assert set(data.datasets["validation"]["labels"]) == {0, 1}
    batch = next(iter(data.val_dataloader()[0]))
    assert batch["input_ids"].shape[0] == 64 and batch["labels"].dtype == torch.long
    same, other = split(42), split(7)
    assert same.datasets["validation"]["input_ids"] == data.datasets["validation"]["input_ids"]
    assert other.datasets["validation"]["input_ids"] != data.datasets["validation"]["input_ids"]


def test_sentence_pairs_and_regression_labels(task_checkpoints: dict[str, str], tmp_path: Path) -> None:
    files = write_glue_files(tmp_path, ("sentence1", "sentence2"), ("train", "validation"), regression=True)
    data = GlueDataModule(task_checkpoints["bert"], task="stsb", data_files=files, max_length=6)
    data.setup("fit")
    row = data.datasets["train"][1]
    tokens = data.tokenizer.convert_ids_to_tokens(row["input_ids"])
    assert tokens == ["the", "film", "was", "a", "great", "plot"]  # longest-first truncation of 4 + 3 words
    assert row["labels"] == 0.5
    assert data.collate([row])["labels"].dtype == torch.float32


def test_classifier_validates_on_local_mnli_splits(task_checkpoints: dict[str, str], tmp_path: Path) -> None:
    spec = GLUE_TASKS["mnli"]
    files = write_glue_files(
        tmp_path, spec.text_columns, ("train", *spec.validation_splits), regression=False
    )
    model = SequenceClassifier(task_checkpoints["roberta"], task="mnli")
    assert model.model.config.num_labels == 3 and model.model.training
    data = GlueDataModule(task_checkpoints["roberta"], task="mnli", data_files=files, eval_batch_size=8)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    [matched, mismatched] = trainer.validate(model, datamodule=data, verbose=False)
    assert set(matched) == {"val/loss_matched", "val/acc_matched"}
    assert set(mismatched) == {"val/loss_mismatched", "val/acc_mismatched"}
    # 8 rows of labels 0,1,0,1,...: the accuracy is a multiple of 1/8
    assert (matched["val/acc_matched"] * 8) == round(matched["val/acc_matched"] * 8)


def test_regression_predictions_are_the_single_logit(task_checkpoints: dict[str, str]) -> None:
    model = SequenceClassifier(task_checkpoints["roberta"], task="stsb")
    logits = torch.tensor([[0.25], [-1.5]])
    assert model.predictions(logits).tolist() == [0.25, -1.5]
    assert SequenceClassifier(task_checkpoints["roberta"], task="rte").predictions(
        torch.tensor([[0.1, 0.9], [2.0, -1.0]])
    ).tolist() == [1, 0]
