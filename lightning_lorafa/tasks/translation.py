"""Translation (WMT16 En-Ro) on any `AutoModelForSeq2SeqLM`, scored with sacreBLEU and ROUGE-L."""

from __future__ import annotations

from pathlib import Path

import torch
from datasets import Dataset, DatasetDict, load_dataset
from torchmetrics.text import ROUGEScore, SacreBLEUScore
from transformers import AutoModelForSeq2SeqLM, DataCollatorForSeq2Seq

from lightning_lorafa.tasks.common import (
    TaskDataModule,
    TaskModule,
    carve_validation,
    check_columns,
    check_positive,
    load_pretrained,
    load_splits,
    load_tokenizer,
)

TABLE_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".parquet")


def read_text_pairs(stem: str, source_lang: str, target_lang: str) -> Dataset:
    """Line-aligned plain text files `{stem}.{source_lang}` and `{stem}.{target_lang}` as two columns.

    Raises:
        FileNotFoundError: one side is missing.
        ValueError: the two files have different numbers of lines.
    """
    sides = {}
    for lang in (source_lang, target_lang):
        path = Path(f"{stem}.{lang}")
        if not path.is_file():
            raise FileNotFoundError(
                f"'{path}' does not exist; plain text pairs are given as a path stem with one file per "
                f"language: '{stem}.{source_lang}' and '{stem}.{target_lang}'."
            )
        sides[lang] = load_dataset("text", data_files=str(path), split="train")["text"]
    if len(sides[source_lang]) != len(sides[target_lang]):
        raise ValueError(
            f"'{stem}.{source_lang}' has {len(sides[source_lang])} lines but '{stem}.{target_lang}' has "
            f"{len(sides[target_lang])}; the files must be line-aligned."
        )
    return Dataset.from_dict(sides)


class TranslationDataModule(TaskDataModule):
    """Sentence pairs with a task prefix on the source, e.g. "translate English to Romanian: ".

    Reads the hub data set (`wmt/wmt16`, configuration `ro-en`, a `translation` column of
    language -> text), or local `data_files`: split -> a path stem of line-aligned plain text pairs
    (`{stem}.en`, `{stem}.ro`), or a json/jsonl/csv/tsv file with a `translation` column or one
    column per language.

    Args:
        source_lang: source language code.
        target_lang: target language code.
        prefix: text put before every source sentence (T5's task prefix).
        max_target_length: target tokens kept (`max_length` bounds the source).
        **kwargs: `TaskDataModule` options.
    """

    def __init__(
        self,
        model_name_or_path: str,
        dataset: str = "wmt/wmt16",
        dataset_config: str | None = "ro-en",
        data_files: dict[str, str] | None = None,
        source_lang: str = "en",
        target_lang: str = "ro",
        prefix: str = "translate English to Romanian: ",
        batch_size: int = 32,
        eval_batch_size: int = 64,
        max_length: int = 128,
        max_target_length: int = 128,
        max_train_samples: int | None = None,
        validation_size: int | None = None,
        seed: int = 42,
        num_workers: int = 0,
    ) -> None:
        check_positive("max_target_length", max_target_length)
        for split, stem in (data_files or {}).items():
            if Path(stem).suffix not in TABLE_SUFFIXES:
                for lang in (source_lang, target_lang):
                    if not Path(f"{stem}.{lang}").is_file():
                        raise FileNotFoundError(f"data_files['{split}']: '{stem}.{lang}' does not exist.")
            elif not Path(stem).is_file():
                raise FileNotFoundError(f"data_files['{split}'] = '{stem}' does not exist.")
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
        self.dataset_config = dataset_config
        self.data_files = data_files
        self.source_lang = source_lang
        self.target_lang = target_lang
        self.prefix = prefix
        self.max_target_length = max_target_length
        self.collate = DataCollatorForSeq2Seq(self.tokenizer, label_pad_token_id=-100)

    def read(self) -> DatasetDict:
        """The raw splits with one column per language."""
        files = self.data_files or {}
        stems = {k: v for k, v in files.items() if Path(v).suffix not in TABLE_SUFFIXES}
        tables = {k: v for k, v in files.items() if k not in stems}
        splits = DatasetDict(
            {k: read_text_pairs(v, self.source_lang, self.target_lang) for k, v in stems.items()}
        )
        if tables or not files:
            splits.update(load_splits(self.dataset, self.dataset_config, tables or None))
        for name, split in splits.items():
            if "translation" in split.column_names:
                pairs = split["translation"]
                splits[name] = Dataset.from_dict(
                    {lang: [p[lang] for p in pairs] for lang in (self.source_lang, self.target_lang)}
                )
            check_columns(
                splits[name],
                [self.source_lang, self.target_lang],
                "language",
                "set data.init_args.source_lang and target_lang.",
            )
        return splits

    def setup(self, stage: str) -> None:
        if self.datasets:
            return
        splits = self.subsample_train(carve_validation(self.read(), self.validation_size, self.seed))

        def encode(rows: dict[str, list]) -> dict[str, list]:
            sources = [self.prefix + text for text in rows[self.source_lang]]
            encoded = self.tokenizer(sources, truncation=True, max_length=self.max_length)
            targets = self.tokenizer(
                text_target=rows[self.target_lang], truncation=True, max_length=self.max_target_length
            )
            encoded["labels"] = targets["input_ids"]
            return encoded

        self.datasets = {
            name: split.map(encode, batched=True, remove_columns=split.column_names)
            for name, split in splits.items()
        }

    def val_dataloader(self):
        return self.loader("validation")

    def test_dataloader(self):
        return self.loader("test" if "test" in self.datasets else "validation")


class Translator(TaskModule):
    """Fine-tunes an `AutoModelForSeq2SeqLM`; validation and test generate translations and log
    `{stage}/bleu` (sacreBLEU, 13a tokenization, 0..1) and `{stage}/rougeL` (F-measure).

    Args:
        num_beams: beams used when generating in validation and test.
        max_new_tokens: longest generated translation.
        **kwargs: `TaskModule` options.
    """

    def __init__(
        self,
        model_name_or_path: str,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.0,
        num_beams: int = 1,
        max_new_tokens: int = 128,
    ) -> None:
        check_positive("num_beams", num_beams)
        check_positive("max_new_tokens", max_new_tokens)
        super().__init__(model_name_or_path, learning_rate, weight_decay, warmup_ratio)
        self.save_hyperparameters()
        self.num_beams = num_beams
        self.max_new_tokens = max_new_tokens
        self.model = load_pretrained(AutoModelForSeq2SeqLM, model_name_or_path, "translation")
        self.tokenizer = load_tokenizer(model_name_or_path)
        self.bleu = torch.nn.ModuleDict({s: SacreBLEUScore(tokenize="13a") for s in ("val", "test")})
        self.rouge = torch.nn.ModuleDict({s: ROUGEScore(rouge_keys="rougeL") for s in ("val", "test")})

    def translate(self, batch: dict[str, torch.Tensor]) -> list[str]:
        """Generated target sentences for a batch of tokenized sources `(B, S)`."""
        generated = self.model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            num_beams=self.num_beams,
            max_new_tokens=self.max_new_tokens,
        )
        return self.tokenizer.batch_decode(generated, skip_special_tokens=True)

    def references(self, labels: torch.Tensor) -> list[str]:
        """Reference sentences from padded label ids `(B, T)` (-100 marks padding)."""
        ids = labels.masked_fill(labels == -100, self.tokenizer.pad_token_id)
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)

    def evaluate(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        size = len(batch["input_ids"])
        self.log(f"{stage}/loss", self(batch).loss, batch_size=size)
        predictions = self.translate(batch)
        references = self.references(batch["labels"])
        self.bleu[stage].update(predictions, [[r] for r in references])
        self.rouge[stage].update(predictions, references)

    def log_scores(self, stage: str) -> None:
        """Logs the corpus-level scores of the finished stage and resets them."""
        self.log(f"{stage}/bleu", self.bleu[stage].compute(), prog_bar=True)
        self.log(f"{stage}/rougeL", self.rouge[stage].compute()["rougeL_fmeasure"], prog_bar=True)
        self.bleu[stage].reset()
        self.rouge[stage].reset()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self.log_scores("val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        self.log_scores("test")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> list[str]:
        return self.translate(batch)
