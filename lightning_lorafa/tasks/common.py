"""What every task shares: loading pretrained models and data sets, the data module and the optimizer."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from datasets import Dataset, DatasetDict, load_dataset
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import (
    AutoConfig,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lightning_lorafa.tasks.packing import is_packed, packed_model_inputs

DataFiles = Mapping[str, str | Sequence[str]]

# Builder and reader options of `datasets` per file suffix. GLUE's tsv files contain stray quotes and
# words such as "null", so quoting is off and no string is read as a missing value.
_FILE_BUILDERS: dict[str, tuple[str, dict[str, Any]]] = {
    ".tsv": ("csv", {"delimiter": "\t", "quoting": 3, "keep_default_na": False}),
    ".csv": ("csv", {"keep_default_na": False}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".txt": ("text", {}),
    ".parquet": ("parquet", {}),
}


def local_path(name_or_path: str) -> str:
    """Expands a leading `~` so cached model copies can be named as `~/.cache/...` in YAML."""
    return os.path.expanduser(name_or_path) if name_or_path.startswith("~") else name_or_path


def check_positive(name: str, value: int | None) -> None:
    """Raises ValueError when a length or size option is not a positive integer."""
    if value is not None and value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value}.")


def load_pretrained(auto_class: type, name_or_path: str, task: str, **kwargs: Any) -> PreTrainedModel:
    """`auto_class.from_pretrained(name_or_path, **kwargs)` in training mode (`from_pretrained` returns
    it in eval mode, which Lightning keeps), with a clear error when the checkpoint's architecture cannot
    serve the task (e.g. a BERT encoder given to a translation task).

    Raises:
        ValueError: the architecture has no `auto_class` head.
    """
    path = local_path(name_or_path)
    config = AutoConfig.from_pretrained(path)
    try:
        model = auto_class.from_pretrained(path, **kwargs)
    except ValueError as err:
        if "Unrecognized configuration class" not in str(err):
            raise
        raise ValueError(
            f"model '{name_or_path}' is a {config.model_type!r} model, which {auto_class.__name__} cannot "
            f"load, so it does not fit the {task} task; choose a checkpoint with that kind of head."
        ) from None
    return model.train()


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer; causal LMs without a pad token pad with their end-of-sequence token."""
    tokenizer = AutoTokenizer.from_pretrained(local_path(name_or_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_data_files(data_files: DataFiles | None) -> None:
    """Raises FileNotFoundError naming the split whose local file is missing."""
    for split, paths in (data_files or {}).items():
        for path in [paths] if isinstance(paths, str) else paths:
            if not Path(path).is_file():
                raise FileNotFoundError(
                    f"data_files['{split}'] = '{path}' does not exist; give the path of a tsv, csv, json, "
                    "jsonl, txt or parquet file (relative to the working directory)."
                )


def load_splits(dataset: str, dataset_config: str | None, data_files: DataFiles | None) -> DatasetDict:
    """Local `data_files` (split -> file or files, read by suffix) when given, else the hub data set.

    Raises:
        FileNotFoundError: a local file is missing.
        ValueError: a local file has a suffix `datasets` cannot read.
    """
    if not data_files:
        return load_dataset(dataset, dataset_config)
    check_data_files(data_files)
    suffixes = {Path(p).suffix for v in data_files.values() for p in ([v] if isinstance(v, str) else v)}
    if len(suffixes) != 1 or next(iter(suffixes)) not in _FILE_BUILDERS:
        raise ValueError(
            f"data_files must all have one suffix out of {sorted(_FILE_BUILDERS)}, got {sorted(suffixes)}."
        )
    builder, options = _FILE_BUILDERS[suffixes.pop()]
    return load_dataset(
        builder,
        data_files={k: v if isinstance(v, str) else list(v) for k, v in data_files.items()},
        **options,
    )


def check_columns(split: Dataset, columns: Sequence[str], what: str, hint: str) -> None:
    """Raises ValueError naming a missing column and the columns present, followed by `hint` (what to do)."""
    for column in columns:
        if column not in split.column_names:
            raise ValueError(
                f"{what} column '{column}' is not in the data (columns: {split.column_names}); {hint}"
            )


def carve_validation(splits: DatasetDict, validation_size: int | None, seed: int) -> DatasetDict:
    """Moves a seeded random `validation_size` rows of `train` into a new `validation` split."""
    if not validation_size:
        return splits
    if "train" not in splits:
        raise ValueError(
            "validation_size carves the validation split from 'train', but there is no 'train' split."
        )
    parts = splits["train"].train_test_split(test_size=validation_size, seed=seed)
    return DatasetDict({**splits, "train": parts["train"], "validation": parts["test"]})


def gather_objects(obj: Any) -> list[Any]:
    """`obj` from every process of the process group, in rank order (`[obj]` without one): the evaluation tasks
    gather their generations this way so that the first process scores them all."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


class LeftPaddedPrompts:
    """Collates generation prompts: `input_ids` and `attention_mask` left-padded (B, S), so every prompt ends at the
    last column and generation continues all of them at once.

    Args:
        carried: columns passed on as lists of the rows' values (`batch[column]`), or, with `grouped_as`, as one
            list of per-row dicts of those columns (`batch[grouped_as]`).
        constants: entries added to every batch as they are.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        carried: Sequence[str] = (),
        grouped_as: str | None = None,
        constants: Mapping[str, Any] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.carried, self.grouped_as, self.constants = tuple(carried), grouped_as, dict(constants or {})

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        prompts = [{"input_ids": f["input_ids"], "attention_mask": f["attention_mask"]} for f in features]
        batch = dict(self.tokenizer.pad(prompts, padding_side="left", return_tensors="pt"))
        if self.grouped_as is not None:
            batch[self.grouped_as] = [{c: f[c] for c in self.carried} for f in features]
        else:
            batch.update({c: [f[c] for f in features] for c in self.carried})
        return batch | self.constants


def stateful_loader(
    dataset: Any,
    batch_size: int,
    shuffle: bool = False,
    collate_fn: Callable | None = None,
    num_workers: int = 0,
    seed: int = 0,
) -> StatefulDataLoader:
    """A torchdata ``StatefulDataLoader``: Lightning saves its position in checkpoints and restores it, so a run
    resumed from a checkpoint written mid-epoch continues with the next batch of the same order.

    Shuffling (and the workers' base seed) draw from the loader's own generator, seeded with ``seed``, never from
    the global torch RNG: creating the loader on resume then leaves that RNG, which the checkpoint restored and
    which draws the dropout masks, exactly where the uninterrupted run had it.
    """
    return StatefulDataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=collate_fn,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
    )


class TaskDataModule(L.LightningDataModule):
    """Common options of the task data modules: tokenizer, batch sizes, loaders.

    Subclasses fill `self.datasets` (split name -> tokenized `Dataset`) in `setup` and set `self.collate`.

    Args:
        model_name_or_path: checkpoint whose tokenizer encodes the text (linked to the model's in the CLI).
        batch_size: training batch size.
        eval_batch_size: batch size of validation, test and predict loaders.
        max_length: tokens kept per example.
        max_train_samples: keep only this many training rows (after shuffling with `seed`).
        validation_size: carve a seeded validation split of this many rows from `train`.
        seed: seed of the validation split, the training subset and the training order.
        num_workers: data loader worker processes.

    Loaders are ``StatefulDataLoader``s (``stateful_loader``): a run resumed mid-epoch continues exactly.
    """

    def __init__(
        self,
        model_name_or_path: str,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        max_length: int = 128,
        max_train_samples: int | None = None,
        validation_size: int | None = None,
        seed: int = 42,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        for name, value in [
            ("batch_size", batch_size),
            ("eval_batch_size", eval_batch_size),
            ("max_length", max_length),
            ("max_train_samples", max_train_samples),
            ("validation_size", validation_size),
        ]:
            check_positive(name, value)
        self.model_name_or_path = model_name_or_path
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.max_length = max_length
        self.max_train_samples = max_train_samples
        self.validation_size = validation_size
        self.seed = seed
        self.num_workers = num_workers
        self.tokenizer = load_tokenizer(model_name_or_path)
        self.datasets: dict[str, Dataset] = {}
        self.collate: Callable[[list[dict]], dict[str, torch.Tensor]] | None = None

    def subsample_train(self, splits: DatasetDict) -> DatasetDict:
        """Keeps `max_train_samples` seeded-random training rows."""
        if self.max_train_samples is None or "train" not in splits:
            return splits
        train = splits["train"].shuffle(seed=self.seed)
        return DatasetDict({**splits, "train": train.select(range(min(self.max_train_samples, len(train))))})

    def loader(self, split: str, shuffle: bool = False, collate_fn: Callable | None = None) -> DataLoader:
        """Data loader over the tokenized split `split`: training batches when `shuffle`, else evaluation batches;
        collated by `collate_fn` (default: `self.collate`)."""
        if split not in self.datasets:
            raise ValueError(f"the data has no '{split}' split (splits: {sorted(self.datasets)}).")
        return stateful_loader(
            self.datasets[split],
            batch_size=self.batch_size if shuffle else self.eval_batch_size,
            shuffle=shuffle,
            collate_fn=collate_fn or self.collate,
            num_workers=self.num_workers,
            seed=self.seed,
        )

    def train_dataloader(self) -> DataLoader:
        return self.loader("train", shuffle=True)


class TaskModule(L.LightningModule):
    """A Hugging Face model in `self.model`, trained with AdamW and a linear warm-up/decay schedule.

    The `LoraFA` callback converts `self.model` and swaps in its optimizer, keeping the learning rate,
    weight decay and the schedule configured here (`lr_schedule`: "linear", or "cosine" decay after the warm-up).

    Args:
        model_name_or_path: hub name or local directory of the pretrained checkpoint.
        learning_rate: peak learning rate.
        weight_decay: decoupled weight decay.
        warmup_ratio: fraction of the training steps spent warming up linearly.
    """

    def __init__(
        self,
        model_name_or_path: str,
        learning_rate: float = 5e-4,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.06,
    ) -> None:
        super().__init__()
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}.")
        self.model_name_or_path = model_name_or_path
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.warmup_ratio = warmup_ratio
        self.lr_schedule = "linear"  # or "cosine" (subclasses may expose it)
        self.model: PreTrainedModel

    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        """The model's output (with `.loss` when the batch has labels) for a collated batch; a packed batch
        (`position_ids`, no `attention_mask`, see `tasks.packing`) runs with its rows kept apart."""
        if is_packed(batch):
            return self.model(**packed_model_inputs(self.model, batch))
        return self.model(**batch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self(batch).loss
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.learning_rate, weight_decay=self.weight_decay)
        total = self.trainer.estimated_stepping_batches
        # transformers.optimization imports peft and bitsandbytes where installed (seconds): only when fitting.
        from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

        schedule = get_cosine_schedule_with_warmup if self.lr_schedule == "cosine" else get_linear_schedule_with_warmup
        scheduler = schedule(optimizer, int(self.warmup_ratio * total), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
