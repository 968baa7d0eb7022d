"""GLUE sequence classification and regression (STS-B) on any `AutoModelForSequenceClassification`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchmetrics import (
    Accuracy,
    F1Score,
    MatthewsCorrCoef,
    MetricCollection,
    PearsonCorrCoef,
    SpearmanCorrCoef,
)
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

from lightning_lorafa.tasks.common import (
    TaskDataModule,
    TaskModule,
    carve_validation,
    check_columns,
    check_data_files,
    load_pretrained,
    load_splits,
)


@dataclass(frozen=True)
class GlueTask:
    """Columns, label count (1 = regression) and evaluation splits of one GLUE task."""

    text_columns: tuple[str, ...]
    num_labels: int
    validation_splits: tuple[str, ...] = ("validation",)


GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask(("sentence",), 2),
    "sst2": GlueTask(("sentence",), 2),
    "mrpc": GlueTask(("sentence1", "sentence2"), 2),
    "qqp": GlueTask(("question1", "question2"), 2),
    "stsb": GlueTask(("sentence1", "sentence2"), 1),
    "mnli": GlueTask(("premise", "hypothesis"), 3, ("validation_matched", "validation_mismatched")),
    "qnli": GlueTask(("question", "sentence"), 2),
    "rte": GlueTask(("sentence1", "sentence2"), 2),
}


def glue_task(name: str) -> GlueTask:
    """The task's description; raises ValueError listing the known tasks for an unknown name."""
    if name not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task '{name}'; choose one of {sorted(GLUE_TASKS)}.")
    return GLUE_TASKS[name]


def glue_metrics(name: str) -> MetricCollection:
    """Matthews correlation (CoLA), Pearson and Spearman (STS-B), accuracy plus F1 (MRPC, QQP) or
    accuracy (the others), as torchmetrics over predictions `(N,)` and targets `(N,)`."""
    task = glue_task(name)
    if name == "stsb":
        return MetricCollection({"pearson": PearsonCorrCoef(), "spearman": SpearmanCorrCoef()})
    if name == "cola":
        return MetricCollection({"mcc": MatthewsCorrCoef(task="binary")})
    if task.num_labels > 2:
        return MetricCollection({"acc": Accuracy(task="multiclass", num_classes=task.num_labels)})
    metrics = {"acc": Accuracy(task="binary")}
    if name in ("mrpc", "qqp"):
        metrics["f1"] = F1Score(task="binary")
    return MetricCollection(metrics)


def split_postfix(split: str) -> str:
    """Metric name suffix of an evaluation split: '' for `validation`, '_matched' for `validation_matched`."""
    return split.removeprefix("validation")


class GlueDataModule(TaskDataModule):
    """GLUE sentences (pairs) tokenized for classification.

    Reads `nyu-mll/glue` from the hub, or local `data_files` (split -> tsv/csv/json file) with
    `text_columns` and `label_column` naming the columns. `evaluation_splits` (known after `setup`)
    are the task's validation splits, or `validation`. Test and predict loaders use them too, since
    GLUE's test labels are hidden.

    Args:
        task: GLUE task name (see `GLUE_TASKS`).
        dataset: hub data set holding the tasks as configurations.
        data_files: local files per split instead of the hub.
        text_columns: one or two text columns (default: the task's).
        label_column: the label column.
        **kwargs: `TaskDataModule` options.
    """

    def __init__(
        self,
        model_name_or_path: str,
        task: str = "sst2",
        dataset: str = "nyu-mll/glue",
        data_files: dict[str, str] | None = None,
        text_columns: list[str] | None = None,
        label_column: str = "label",
        batch_size: int = 32,
        eval_batch_size: int = 64,
        max_length: int = 128,
        max_train_samples: int | None = None,
        validation_size: int | None = None,
        seed: int = 42,
        num_workers: int = 0,
    ) -> None:
        self.task = task
        self.spec = glue_task(task)
        check_data_files(data_files)
        super().__init__(
            model_name_or_path,
            batch_size,
            eval_batch_size,
            max_length,
            max_train_samples,
            validation_size,
            seed,
            num_workers,
        )
        self.dataset = dataset
        self.data_files = data_files
        self.text_columns = tuple(text_columns or self.spec.text_columns)
        if not 1 <= len(self.text_columns) <= 2:
            raise ValueError(f"text_columns takes one or two columns, got {list(self.text_columns)}.")
        self.label_column = label_column
        self.collate = DataCollatorWithPadding(self.tokenizer)
        self.evaluation_splits = self.spec.validation_splits

    def setup(self, stage: str) -> None:
        if self.datasets:
            return
        splits = load_splits(self.dataset, None if self.data_files else self.task, self.data_files)
        splits = self.subsample_train(carve_validation(splits, self.validation_size, self.seed))
        for split in splits.values():
            check_columns(split, self.text_columns, "text", "set data.init_args.text_columns.")
            check_columns(split, [self.label_column], "label", "set data.init_args.label_column.")
        self.evaluation_splits = tuple(s for s in self.spec.validation_splits if s in splits) or (
            "validation",
        )
        regression = self.spec.num_labels == 1

        def encode(rows: dict[str, list]) -> dict[str, list]:
            texts = [[str(t) for t in rows[c]] for c in self.text_columns]
            encoded = self.tokenizer(*texts, truncation=True, max_length=self.max_length)
            encoded["labels"] = [float(y) if regression else int(y) for y in rows[self.label_column]]
            return encoded

        self.datasets = {
            name: split.map(encode, batched=True, remove_columns=split.column_names)
            for name, split in splits.items()
        }

    def val_dataloader(self) -> list:
        return [self.loader(split) for split in self.evaluation_splits]

    def test_dataloader(self) -> list:
        return self.val_dataloader()

    def predict_dataloader(self) -> list:
        return self.val_dataloader()


class SequenceClassifier(TaskModule):
    """Fine-tunes an `AutoModelForSequenceClassification` on one GLUE task.

    Logs `train/loss` and, per validation split, `val/loss` and the task's metrics
    (e.g. `val/acc`, `val/mcc`, `val/pearson`, `val/acc_matched` and `val/acc_mismatched` for MNLI).

    Args:
        task: GLUE task name; sets the number of labels and the metrics.
        **kwargs: `TaskModule` options.
    """

    def __init__(
        self,
        model_name_or_path: str,
        task: str = "sst2",
        learning_rate: float = 5e-4,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.06,
    ) -> None:
        super().__init__(model_name_or_path, learning_rate, weight_decay, warmup_ratio)
        self.save_hyperparameters()
        self.task = task
        self.spec = glue_task(task)
        self.model = load_pretrained(
            AutoModelForSequenceClassification,
            model_name_or_path,
            f"GLUE {task}",
            num_labels=self.spec.num_labels,
            ignore_mismatched_sizes=True,
        )
        self.val_metrics = nn.ModuleList()
        self.test_metrics = nn.ModuleList()

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        data_task = getattr(datamodule, "task", self.task)
        if data_task != self.task:
            raise ValueError(
                f"the model is set up for GLUE task '{self.task}' but the data is '{data_task}'; "
                "set model.init_args.task and data.init_args.task to the same task."
            )
        splits = getattr(datamodule, "evaluation_splits", ("validation",))
        metrics = glue_metrics(self.task)
        for collection, prefix in [(self.val_metrics, "val/"), (self.test_metrics, "test/")]:
            if len(collection) == 0:
                collection.extend(metrics.clone(prefix=prefix, postfix=split_postfix(s)) for s in splits)

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        """Class ids `(N,)` from logits `(N, C)`, or scores `(N,)` for regression `(N, 1)`."""
        return logits.squeeze(-1) if self.spec.num_labels == 1 else logits.argmax(-1)

    def evaluate(
        self, batch: dict[str, torch.Tensor], metrics: nn.ModuleList, stage: str, index: int
    ) -> None:
        output = self(batch)
        collection = metrics[index]
        collection.update(self.predictions(output.logits), batch["labels"])
        name = f"{stage}/loss{collection.postfix or ''}"
        self.log(name, output.loss, add_dataloader_idx=False, batch_size=len(batch["labels"]))
        self.log_dict(collection, add_dataloader_idx=False, prog_bar=True)

    def validation_step(
        self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self.evaluate(batch, self.val_metrics, "val", dataloader_idx)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.evaluate(batch, self.test_metrics, "test", dataloader_idx)

    def predict_step(
        self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> torch.Tensor:
        batch = {k: v for k, v in batch.items() if k != "labels"}
        return self.predictions(self(batch).logits)
