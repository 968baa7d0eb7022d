"""Math reasoning: fine-tune a causal LM on MetaMathQA (loss on the response only) and score GSM8K by greedy
generation, as PEFT's MetaMathQA benchmark and the LoRA-FA v2 paper do.

Training rows have MetaMathQA's columns (`query`, `response`; the hub data set `meta-math/MetaMathQA` or local
json/jsonl files). Validation and test rows have GSM8K's (`question`, `answer` ending in `#### N`; the hub data set
`openai/gsm8k`, config `main`, or local files). The model continues each question's prompt greedily (batched,
left-padded, at most `max_new_tokens` new tokens); the number after the last answer marker ("The answer is: N",
MetaMathQA's; "#### N", GSM8K's) is compared to GSM8K's answer as an exact rational number, and the fraction of
matches is logged as `val/gsm8k/acc` (validation) and `test/gsm8k/acc` (test).
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerBase

from lightning_lorafa.tasks.common import (
    LeftPaddedPrompts,
    TaskDataModule,
    TaskModule,
    check_columns,
    check_data_files,
    check_positive,
    load_pretrained,
    load_splits,
    load_tokenizer,
)
from lightning_lorafa.tasks.instruction import encode_instruction
from lightning_lorafa.tasks.packing import pack_dataset, training_collator

#: PEFT's MetaMathQA benchmark prompt (`query_template`); the response follows after a space.
QUERY_TEMPLATE = "Question: {query} Think step by step.\nAnswer:"
#: Markers of the final answer, most specific first: MetaMathQA's responses end in "The answer is: N", GSM8K's
#: solutions in "#### N". The number after the last occurrence of the first marker found is the answer.
ANSWER_MARKERS = ("The answer is: ", "The answer is ", "The final answer is: ", "The final answer is ", "#### ")
_LATEX_FRACTION = re.compile(r"\\d?frac\{([^{}]*)\}\{([^{}]*)\}")
_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?(?:/\d[\d,]*)?|[-+]?\.\d+")
TRAIN_COLUMNS = ("query", "response")
EVAL_COLUMNS = ("question", "answer")


def extract_answer(text: str) -> Fraction | None:
    """The final number of a solution: the first number after the last answer marker (`ANSWER_MARKERS`), as an
    exact `Fraction`; None when there is no marker or no number after it.

    Thousands separators are dropped ("1,250" is 1250), decimals and fractions are read exactly ("0.5" == "1/2"),
    LaTeX fractions are read as fractions ("\\frac{5}{8}" is 5/8), and a leading "$" and trailing units or "%" are
    ignored ("$1,000.50 per week" is 1000.5), as MetaMath's evaluation and PEFT's benchmark parse GSM8K answers.
    """
    for marker in ANSWER_MARKERS:
        if marker in text:
            tail = text.rpartition(marker)[2]
            break
    else:
        return None
    match = _NUMBER.search(_LATEX_FRACTION.sub(r"\1/\2", tail.split("\n", 1)[0]))
    if match is None:
        return None
    number = match.group().replace(",", "")
    try:
        return Fraction(number)
    except (ValueError, ZeroDivisionError):
        return None


def gsm8k_answer(solution: str) -> Fraction:
    """The number after `#### ` that ends a GSM8K solution.

    Raises:
        ValueError: the solution has no `#### N` line.
    """
    value = extract_answer(solution) if "#### " in solution else None
    if value is None:
        raise ValueError(
            f"GSM8K answer {solution[-80:]!r} does not end in '#### N'; give GSM8K rows (columns question, answer)."
        )
    return value


def encode_question(prompt: str, tokenizer: PreTrainedTokenizerBase) -> dict[str, list[int]]:
    """Token ids of a generation prompt (special tokens as the tokenizer adds them)."""
    ids = tokenizer(prompt)["input_ids"]
    return {"input_ids": ids, "attention_mask": [1] * len(ids)}


class MathDataModule(TaskDataModule):
    """MetaMathQA-format training rows and GSM8K-format questions for validation and test.

    Args:
        dataset, dataset_config, data_files: training data (hub name and config, or local files `{train: ...}`)
            with columns `query` and `response`.
        eval_dataset, eval_dataset_config, eval_data_files: GSM8K (hub name and config, or local files
            `{test: ...}`) with columns `question` and `answer`.
        val_split, test_split: the evaluation splits that validation and test score.
        max_val_samples: score only a seeded random subset of this many validation questions.
        max_test_samples: score only the first questions of the test split.
        prompt_template: the prompt, with `{query}` where the question goes (default: PEFT's benchmark prompt);
            training appends " " + response + end-of-sequence and learns the response only.
        packing: concatenate training rows into packs of up to `max_length` tokens (`tasks.packing`).
        **kwargs: `TaskDataModule` options (`max_length` cuts training rows; prompts are kept whole).
    """

    def __init__(
        self,
        model_name_or_path: str,
        dataset: str = "meta-math/MetaMathQA",
        dataset_config: str | None = None,
        data_files: dict[str, str] | None = None,
        eval_dataset: str = "openai/gsm8k",
        eval_dataset_config: str | None = "main",
        eval_data_files: dict[str, str] | None = None,
        val_split: str = "test",
        test_split: str = "test",
        max_val_samples: int | None = None,
        max_test_samples: int | None = None,
        prompt_template: str = QUERY_TEMPLATE,
        batch_size: int = 4,
        eval_batch_size: int = 16,
        max_length: int = 768,
        max_train_samples: int | None = None,
        seed: int = 42,
        num_workers: int = 0,
        packing: bool = False,
    ) -> None:
        check_data_files(data_files)
        check_data_files(eval_data_files)
        check_positive("max_val_samples", max_val_samples)
        check_positive("max_test_samples", max_test_samples)
        if "{query}" not in prompt_template:
            raise ValueError(
                f"prompt_template must contain '{{query}}' where the question goes, got {prompt_template!r}."
            )
        super().__init__(
            model_name_or_path, batch_size, eval_batch_size, max_length, max_train_samples, None, seed, num_workers
        )
        self.dataset = dataset
        self.dataset_config = dataset_config
        self.data_files = data_files
        self.eval_dataset = eval_dataset
        self.eval_dataset_config = eval_dataset_config
        self.eval_data_files = eval_data_files
        self.val_split = val_split
        self.test_split = test_split
        self.max_val_samples = max_val_samples
        self.max_test_samples = max_test_samples
        self.prompt_template = prompt_template
        self.packing = packing
        self.collate = training_collator(self.tokenizer, packing)
        self.prompt_collate = LeftPaddedPrompts(self.tokenizer, ["answer"])  # batch["answer"]: the gold answers

    def setup(self, stage: str) -> None:
        if stage == "fit" and "train" not in self.datasets:
            splits = load_splits(self.dataset, self.dataset_config, self.data_files)
            if "train" not in splits:
                raise ValueError(f"the training data has no 'train' split (splits: {sorted(splits)}).")
            train = self.subsample_train(splits)["train"]
            check_columns(train, TRAIN_COLUMNS, "MetaMathQA", "give rows with 'query' and 'response' (MetaMathQA).")

            def encode(row: dict) -> dict[str, list[int]]:
                prompt = self.prompt_template.format(query=row["query"])
                return encode_instruction(prompt, " " + row["response"], self.tokenizer, self.max_length)

            train = train.map(encode, remove_columns=train.column_names)
            train = train.filter(lambda row: any(y != -100 for y in row["labels"]))
            self.datasets["train"] = pack_dataset(train, self.max_length) if self.packing else train
        needed = {"fit": ("val",), "validate": ("val",), "test": ("test",)}.get(stage, ())
        if any(name not in self.datasets for name in needed):
            self.setup_questions(needed)

    def setup_questions(self, names: tuple[str, ...]) -> None:
        """Tokenizes the GSM8K prompts of the validation (`val`) and/or test (`test`) questions."""
        splits = load_splits(self.eval_dataset, self.eval_dataset_config, self.eval_data_files)
        for name in names:
            split_name = self.val_split if name == "val" else self.test_split
            if split_name not in splits:
                raise ValueError(
                    f"the GSM8K data has no '{split_name}' split (splits: {sorted(splits)}); set "
                    f"data.init_args.{name}_split or eval_data_files."
                )
            split = splits[split_name]
            check_columns(split, EVAL_COLUMNS, "GSM8K", "give rows with 'question' and 'answer' (GSM8K).")
            limit = self.max_val_samples if name == "val" else self.max_test_samples
            if limit is not None and name == "val":
                split = split.shuffle(seed=self.seed)
            if limit is not None:
                split = split.select(range(min(limit, len(split))))

            def encode(row: dict) -> dict[str, Any]:
                encoded = encode_question(self.prompt_template.format(query=row["question"]), self.tokenizer)
                return {**encoded, "answer": str(gsm8k_answer(row["answer"]))}

            self.datasets[name] = split.map(encode, remove_columns=split.column_names)

    def val_dataloader(self) -> DataLoader:
        return self.loader("val", collate_fn=self.prompt_collate)

    def test_dataloader(self) -> DataLoader:
        return self.loader("test", collate_fn=self.prompt_collate)


class MathTuner(TaskModule):
    """Fine-tunes an `AutoModelForCausalLM` on math solutions; validation and test generate each GSM8K question's
    solution greedily and log the exact-match accuracy of the final number as `{stage}/gsm8k/acc` (`val`, `test`).

    Args:
        dtype: dtype the weights are loaded in ("float32", "bfloat16", ...).
        max_new_tokens: the longest generated solution.
        lr_schedule: "cosine" (PEFT's benchmark) or "linear" decay after the warm-up.
        **kwargs: `TaskModule` options.
    """

    def __init__(
        self,
        model_name_or_path: str,
        learning_rate: float = 1e-4,
        weight_decay: float = 0.1,
        warmup_ratio: float = 0.1,
        dtype: str = "float32",
        max_new_tokens: int = 512,
        lr_schedule: Literal["cosine", "linear"] = "cosine",
    ) -> None:
        super().__init__(model_name_or_path, learning_rate, weight_decay, warmup_ratio)
        self.save_hyperparameters()
        check_positive("max_new_tokens", max_new_tokens)
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype '{dtype}' is not a torch dtype; use e.g. 'float32' or 'bfloat16'.")
        self.lr_schedule = lr_schedule
        self.max_new_tokens = max_new_tokens
        self.model = load_pretrained(AutoModelForCausalLM, model_name_or_path, "math", dtype=getattr(torch, dtype))
        self.tokenizer = load_tokenizer(model_name_or_path)
        self.accuracy = torch.nn.ModuleDict({"val": MeanMetric(), "test": MeanMetric()})

    def generation_config(self) -> GenerationConfig:
        """Greedy decoding of at most `max_new_tokens` tokens, stopping at the end-of-sequence token."""
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )

    @torch.no_grad()
    def generate(self, batch: dict[str, Any]) -> list[str]:
        """The completions (decoded, special tokens dropped) of a batch of left-padded prompts (B, S)."""
        output = self.model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            generation_config=self.generation_config(),
        )
        return self.tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)

    def evaluate(self, batch: dict[str, Any], stage: str) -> list[bool]:
        """Generates the batch's solutions and adds their exact matches to the stage's accuracy."""
        completions = self.generate(batch)
        correct = [
            extract_answer(text) == Fraction(gold) for text, gold in zip(completions, batch["answer"], strict=True)
        ]
        self.accuracy[stage].update(torch.tensor(correct, dtype=torch.float32, device=self.device))
        self.log(f"{stage}/gsm8k/acc", self.accuracy[stage], prog_bar=True, batch_size=len(correct))
        return correct

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.evaluate(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.evaluate(batch, "test")
