"""Causal-LM instruction tuning (Alpaca, FLAN v2) with the loss on the response only, evaluated by
5-shot MMLU."""

from __future__ import annotations

from typing import Literal

import torch
from datasets import Dataset
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, DataCollatorWithPadding

from lightning_lorafa.tasks.common import (
    TaskDataModule,
    TaskModule,
    carve_validation,
    check_columns,
    check_data_files,
    check_positive,
    load_pretrained,
    load_splits,
    load_tokenizer,
)
from lightning_lorafa.tasks.mmlu import (
    MMLUAccuracy,
    answer_log_likelihoods,
    encode_questions,
    letter_token_ids,
    read_questions,
)
from lightning_lorafa.tasks.packing import pack_dataset, training_collator

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_COLUMNS = {"alpaca": ("instruction", "input", "output"), "flan": ("inputs", "targets")}


def prompt_and_response(row: dict, prompt_format: str) -> tuple[str, str]:
    """The prompt (Stanford Alpaca's template, or FLAN's `inputs` followed by a blank line) and the response."""
    if prompt_format == "alpaca":
        template = ALPACA_PROMPT if row["input"] else ALPACA_PROMPT_NO_INPUT
        return template.format(instruction=row["instruction"], input=row["input"]), row["output"]
    return row["inputs"] + "\n\n", row["targets"]


def encode_instruction(prompt: str, response: str, tokenizer, max_length: int) -> dict[str, list[int]]:
    """Token ids of prompt + response + end-of-sequence, cut at `max_length`, with labels -100 on the
    prompt so that the loss covers the response only."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (prompt_ids + response_ids)[:max_length]
    labels = ([-100] * len(prompt_ids) + response_ids)[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


class InstructionDataModule(TaskDataModule):
    """Instruction data for training and MMLU questions for validation and test.

    Training rows come from the hub data set or local `data_files` (json/jsonl/csv) with the
    columns of `prompt_format`: alpaca (`instruction`, `input`, `output`) or flan (`inputs`,
    `targets`). Rows whose prompt fills `max_length` (no response token left) are dropped.
    MMLU comes from `mmlu_dir` (folders `dev/` and `{mmlu_split}/` of per-subject csv files) or
    the hub data set `cais/mmlu` when it is None.

    Args:
        prompt_format: "alpaca" or "flan".
        mmlu_split: the MMLU split that validation and test score.
        mmlu_shots: answered dev questions before each question.
        mmlu_subjects: subjects to score (default: all).
        mmlu_questions_per_subject: score only the first questions of each subject.
        mmlu_max_length: longest MMLU prompt in tokens; shots are dropped to fit.
        packing: concatenate the training rows into packs of up to `max_length` tokens (`tasks.packing`):
            no padding, `position_ids` restart per row and rows do not attend to each other. `batch_size`
            then counts packs.
        **kwargs: `TaskDataModule` options.
    """

    def __init__(
        self,
        model_name_or_path: str,
        dataset: str = "tatsu-lab/alpaca",
        dataset_config: str | None = None,
        data_files: dict[str, str] | None = None,
        prompt_format: Literal["alpaca", "flan"] = "alpaca",
        mmlu_dir: str | None = None,
        mmlu_split: str = "test",
        mmlu_shots: int = 5,
        mmlu_subjects: list[str] | None = None,
        mmlu_questions_per_subject: int | None = None,
        mmlu_max_length: int = 2048,
        batch_size: int = 4,
        eval_batch_size: int = 4,
        max_length: int = 512,
        max_train_samples: int | None = None,
        seed: int = 42,
        num_workers: int = 0,
        packing: bool = False,
    ) -> None:
        if prompt_format not in PROMPT_COLUMNS:
            raise ValueError(
                f"unknown prompt_format '{prompt_format}'; choose one of {sorted(PROMPT_COLUMNS)}."
            )
        check_data_files(data_files)
        check_positive("mmlu_max_length", mmlu_max_length)
        check_positive("mmlu_questions_per_subject", mmlu_questions_per_subject)
        if mmlu_shots < 0:
            raise ValueError(f"mmlu_shots must be zero or positive, got {mmlu_shots}.")
        super().__init__(
            model_name_or_path,
            batch_size,
            eval_batch_size,
            max_length,
            max_train_samples,
            None,
            seed,
            num_workers,
        )
        self.dataset = dataset
        self.dataset_config = dataset_config
        self.data_files = data_files
        self.prompt_format = prompt_format
        self.mmlu_dir = mmlu_dir
        self.mmlu_split = mmlu_split
        self.mmlu_shots = mmlu_shots
        self.mmlu_subjects = mmlu_subjects
        self.mmlu_questions_per_subject = mmlu_questions_per_subject
        self.mmlu_max_length = mmlu_max_length
        self.subjects: list[str] = []
        self.packing = packing
        self.collate = training_collator(self.tokenizer, packing)
        self.mmlu_collate = DataCollatorWithPadding(self.tokenizer)

    def setup(self, stage: str) -> None:
        if stage == "fit" and "train" not in self.datasets:
            splits = load_splits(self.dataset, self.dataset_config, self.data_files)
            train = self.subsample_train(carve_validation(splits, None, self.seed))["train"]
            columns = PROMPT_COLUMNS[self.prompt_format]
            formats = ", ".join(f"'{k}' reads {list(v)}" for k, v in PROMPT_COLUMNS.items())
            check_columns(
                train,
                columns,
                f"{self.prompt_format} prompt",
                f"set data.init_args.prompt_format ({formats}).",
            )

            def encode(row: dict) -> dict[str, list[int]]:
                return encode_instruction(
                    *prompt_and_response(row, self.prompt_format), self.tokenizer, self.max_length
                )

            train = train.map(encode, remove_columns=train.column_names)
            train = train.filter(lambda row: any(y != -100 for y in row["labels"]))
            self.datasets["train"] = pack_dataset(train, self.max_length) if self.packing else train
        if "mmlu" not in self.datasets:
            self.setup_mmlu()

    def setup_mmlu(self) -> None:
        """Reads and tokenizes the MMLU prompts; sets `subjects` (sorted), which the metrics index."""
        questions = read_questions(self.mmlu_dir, self.mmlu_split, self.mmlu_subjects)
        if self.mmlu_questions_per_subject:
            questions = {s: q[: self.mmlu_questions_per_subject] for s, q in questions.items()}
        shots = read_questions(self.mmlu_dir, "dev", sorted(questions)) if self.mmlu_shots else {}
        self.subjects = sorted(questions)
        examples = encode_questions(questions, shots, self.tokenizer, self.mmlu_shots, self.mmlu_max_length)
        self.datasets["mmlu"] = Dataset.from_list(examples)

    def val_dataloader(self) -> DataLoader:
        return self.loader("mmlu", collate_fn=self.mmlu_collate)

    def test_dataloader(self) -> DataLoader:
        return self.loader("mmlu", collate_fn=self.mmlu_collate)


class InstructionTuner(TaskModule):
    """Fine-tunes an `AutoModelForCausalLM` on instructions; validation and test score 5-shot MMLU by
    comparing the log-likelihoods of ' A'..' D' after 'Answer:', logging `{stage}/mmlu` (average over
    questions) and `{stage}/mmlu/{subject}`.

    Args:
        dtype: dtype the weights are loaded in ("float32", "bfloat16", ...).
        **kwargs: `TaskModule` options.
    """

    def __init__(
        self,
        model_name_or_path: str,
        learning_rate: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.03,
        dtype: str = "float32",
    ) -> None:
        super().__init__(model_name_or_path, learning_rate, weight_decay, warmup_ratio)
        self.save_hyperparameters()
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype '{dtype}' is not a torch dtype; use e.g. 'float32' or 'bfloat16'.")
        self.model = load_pretrained(
            AutoModelForCausalLM, model_name_or_path, "instruction tuning", dtype=getattr(torch, dtype)
        )
        self.letter_ids = letter_token_ids(load_tokenizer(model_name_or_path))
        self.mmlu = torch.nn.ModuleDict()

    def setup(self, stage: str) -> None:
        subjects = getattr(self.trainer.datamodule, "subjects", [])
        for split in ("val", "test"):
            if split not in self.mmlu or self.mmlu[split].subjects != subjects:
                self.mmlu[split] = MMLUAccuracy(subjects)

    def answer_scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Log-likelihoods `(B, 4)` of the answer letters after each right-padded prompt `(B, S)`."""
        hidden = self.model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        last = batch["attention_mask"].sum(-1) - 1
        states = hidden.last_hidden_state[torch.arange(len(last), device=last.device), last]
        return answer_log_likelihoods(self.model.get_output_embeddings()(states), self.letter_ids)

    def evaluate(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        predictions = self.answer_scores(batch).argmax(-1)
        self.mmlu[stage].update(predictions, batch["answer"], batch["subject"])

    def log_mmlu(self, stage: str) -> None:
        """Logs the average and per-subject accuracy of the finished stage and resets them."""
        scores = self.mmlu[stage].compute()
        average = scores.pop("average")
        self.log(f"{stage}/mmlu", average, prog_bar=True)
        self.log_dict({f"{stage}/mmlu/{subject}": value for subject, value in scores.items()})
        self.mmlu[stage].reset()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self.log_mmlu("val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        self.log_mmlu("test")
