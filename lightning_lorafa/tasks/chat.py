"""Chat fine-tuning scored on MT-Bench: train a causal LM on multi-turn conversations (loss on the assistant turns
only) and grade its greedy answers to MT-Bench's two-turn questions with a judge model (`tasks.mt_bench`).

Training rows hold a conversation in ShareGPT's format (column `conversations`: `{"from": "human"|"gpt"|"system",
"value": ...}` messages, as in WizardLM-Evol-Instruct, the hub data set `WizardLMTeam/WizardLM_evol_instruct_V2_196k`)
or OpenAI's (column `messages`: `{"role": "user"|"assistant"|"system", "content": ...}`), from the hub or local
json/jsonl files. They are rendered with the tokenizer's chat template; the labels are the tokens the template puts
after each assistant turn's generation prompt, up to and including its end-of-turn tokens, and -100 elsewhere.

Validation and test answer each MT-Bench question's first turn greedily (batched, left-padded, chat template with
the generation prompt), then its second turn with the first turn and the model's own answer as history. FastChat
samples the answers of some categories (writing and roleplay at temperature 0.7); greedy answers make the score
reproducible. The judge
grades both turns (rank 0 only, after the answers of all processes are gathered) and the means are logged as
`{stage}/mt_bench/score` (all graded turns), `{stage}/mt_bench/turn1`, `{stage}/mt_bench/turn2`,
`{stage}/mt_bench/{category}` and `{stage}/mt_bench/unparsed` (verdicts without a rating, which no mean counts),
with `{stage}/mt_bench/questions`, the number of questions answered.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerBase

from lightning_lorafa.tasks.common import (
    TaskDataModule,
    TaskModule,
    check_data_files,
    check_positive,
    gather_objects,
    load_pretrained,
    load_splits,
    load_tokenizer,
)
from lightning_lorafa.tasks.mt_bench import (
    MTBenchJudge,
    MTBenchQuestion,
    judge_answers,
    load_judge_prompts,
    load_questions,
    summarize,
)
from lightning_lorafa.tasks.packing import pack_dataset, training_collator

log = logging.getLogger(__name__)

#: Per conversation column: the message's role key, its text key and the role names mapped to the chat template's.
CHAT_FORMATS: dict[str, tuple[str, str, dict[str, str]]] = {
    "conversations": ("from", "value", {"human": "user", "gpt": "assistant", "system": "system"}),
    "messages": ("role", "content", {"user": "user", "assistant": "assistant", "system": "system"}),
}
Message = dict[str, str]


def chat_column(columns: Sequence[str]) -> str:
    """The conversation column of the data: `conversations` (ShareGPT) when present, else `messages` (OpenAI).

    Raises:
        ValueError: the data has neither column.
    """
    for column in CHAT_FORMATS:
        if column in columns:
            return column
    raise ValueError(
        f"the chat data has no conversation column (columns: {list(columns)}); give a 'conversations' column of "
        "ShareGPT messages ({'from': 'human'|'gpt'|'system', 'value': ...}) or a 'messages' column of OpenAI "
        "messages ({'role': 'user'|'assistant'|'system', 'content': ...})."
    )


def to_messages(turns: Sequence[dict[str, Any]], column: str) -> list[Message]:
    """A conversation of the column `column` as chat-template messages (`role`: user, assistant or system;
    `content`).

    Raises:
        ValueError: a message's role is not one of the format's.
    """
    role_key, text_key, roles = CHAT_FORMATS[column]
    messages = []
    for turn in turns:
        if turn[role_key] not in roles:
            raise ValueError(
                f"'{column}' message role {role_key}={turn[role_key]!r} is unknown; use one of {sorted(roles)}."
            )
        messages.append({"role": roles[turn[role_key]], "content": turn[text_key]})
    return messages


def check_chat_template(tokenizer: PreTrainedTokenizerBase, name: str) -> None:
    """Raises ValueError when the tokenizer of checkpoint `name` has no chat template."""
    if tokenizer.chat_template is None:
        raise ValueError(
            f"the tokenizer of '{name}' has no chat template (tokenizer.chat_template is None), which renders the "
            "conversations and MT-Bench prompts; set the data module's chat_template (data.init_args.chat_template, "
            "a Jinja template such as the one in configs/llama/wizardlm_mt_bench.yaml) or use a checkpoint that "
            "ships one."
        )


def render(tokenizer: PreTrainedTokenizerBase, messages: list[Message], generation_prompt: bool = False) -> list[int]:
    """Token ids of `messages` rendered with the chat template (the template writes any special tokens), with the
    assistant's generation prompt at the end when `generation_prompt`."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, return_dict=False)


def encode_chat(messages: list[Message], tokenizer: PreTrainedTokenizerBase, max_length: int) -> dict[str, list[int]]:
    """Token ids of a conversation rendered with the chat template, cut at `max_length`, and labels that are -100
    except on the assistant turns.

    Assistant turn i's labels are the tokens of `messages[: i + 1]` after those of `messages[:i]` with the generation
    prompt: the answer and the end-of-turn tokens the template writes, what the model generates at MT-Bench time. An
    assistant message that opens the conversation has no prompt and is not learned.

    Raises:
        ValueError: the template renders a conversation's beginning as tokens that are not a prefix of the whole
            conversation's, so the assistant turns cannot be located.
    """
    if not messages:
        return {"input_ids": [], "attention_mask": [], "labels": []}
    ids = render(tokenizer, messages)
    labels = [-100] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i == 0:
            continue
        prompt = render(tokenizer, messages[:i], generation_prompt=True)
        turn = render(tokenizer, messages[: i + 1])
        checks = (
            (prompt, turn, f"messages 0-{i - 1} with the generation prompt", f"messages 0-{i}"),
            (turn, ids, f"messages 0-{i}", "the whole conversation"),
        )
        for part, whole, part_name, whole_name in checks:
            if whole[: len(part)] != part:
                at = next((j for j, (a, b) in enumerate(zip(part, whole, strict=False)) if a != b), len(whole))
                raise ValueError(
                    f"the chat template renders {part_name} (message {i} is an assistant turn) as tokens that are "
                    f"not a prefix of those of {whole_name} (token {at}: "
                    f"{tokenizer.convert_ids_to_tokens(part[at : at + 3])} against "
                    f"{tokenizer.convert_ids_to_tokens(whole[at : at + 3])}), so the assistant turns cannot be "
                    "located; use a chat template whose generation prompt ends at a token boundary (e.g. without a "
                    "trailing space) and that renders earlier turns the same whatever follows them."
                )
        labels[len(prompt) : len(turn)] = turn[len(prompt) :]
    ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def collate_questions(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """A batch of MT-Bench questions: a list per field (`index`, `question_id`, `category`, `turns`, `reference`)."""
    return {key: [row[key] for row in rows] for key in rows[0]}


class ChatDataModule(TaskDataModule):
    """Conversations for training and MT-Bench questions for validation and test.

    Args:
        dataset, dataset_config, data_files: the training data (hub name and config, or local files `{train: ...}`)
            with a `conversations` (ShareGPT) or `messages` (OpenAI) column.
        chat_template: a Jinja chat template that replaces the tokenizer's (a base model's tokenizer has none); the
            `ChatTuner` trained with this data module answers MT-Bench with it too.
        mt_bench_dataset, mt_bench_split: the hub data set of MT-Bench questions and its split.
        mt_bench_file: a local jsonl file of questions used instead (FastChat's `question.jsonl` format, or the hub
            set's columns).
        max_questions: ask only the first questions.
        packing: concatenate training rows into packs of up to `max_length` tokens (`tasks.packing`).
        **kwargs: `TaskDataModule` options (`max_length` cuts training rows; rows left without an assistant token
            are dropped).

    Raises:
        ValueError: the tokenizer has no chat template and `chat_template` is None.
    """

    def __init__(
        self,
        model_name_or_path: str,
        dataset: str = "WizardLMTeam/WizardLM_evol_instruct_V2_196k",
        dataset_config: str | None = None,
        data_files: dict[str, str] | None = None,
        chat_template: str | None = None,
        mt_bench_dataset: str = "HuggingFaceH4/mt_bench_prompts",
        mt_bench_split: str = "train",
        mt_bench_file: str | None = None,
        max_questions: int | None = None,
        batch_size: int = 4,
        eval_batch_size: int = 16,
        max_length: int = 1024,
        max_train_samples: int | None = None,
        seed: int = 42,
        num_workers: int = 0,
        packing: bool = False,
    ) -> None:
        check_data_files(data_files)
        check_positive("max_questions", max_questions)
        super().__init__(
            model_name_or_path, batch_size, eval_batch_size, max_length, max_train_samples, None, seed, num_workers
        )
        if chat_template is not None:
            self.tokenizer.chat_template = chat_template
        check_chat_template(self.tokenizer, model_name_or_path)
        self.dataset = dataset
        self.dataset_config = dataset_config
        self.data_files = data_files
        self.mt_bench_dataset = mt_bench_dataset
        self.mt_bench_split = mt_bench_split
        self.mt_bench_file = mt_bench_file
        self.max_questions = max_questions
        self.packing = packing
        self.collate = training_collator(self.tokenizer, packing)
        self.questions: list[MTBenchQuestion] = []

    def setup(self, stage: str) -> None:
        if stage == "fit" and "train" not in self.datasets:
            splits = load_splits(self.dataset, self.dataset_config, self.data_files)
            if "train" not in splits:
                raise ValueError(f"the training data has no 'train' split (splits: {sorted(splits)}).")
            train = self.subsample_train(splits)["train"]
            column = chat_column(train.column_names)

            def encode(row: dict, index: int) -> dict[str, list[int]]:
                try:
                    return encode_chat(to_messages(row[column], column), self.tokenizer, self.max_length)
                except ValueError as err:
                    raise ValueError(f"training row {index}: {err}") from None

            train = train.map(encode, with_indices=True, remove_columns=train.column_names)
            train = train.filter(lambda row: any(y != -100 for y in row["labels"]))
            self.datasets["train"] = pack_dataset(train, self.max_length) if self.packing else train
        if stage in ("fit", "validate", "test") and not self.questions:
            self.questions = load_questions(
                self.mt_bench_dataset, self.mt_bench_split, self.mt_bench_file, self.max_questions
            )
            rows = [{"index": i, **dataclasses.asdict(q)} for i, q in enumerate(self.questions)]
            self.datasets["val"] = self.datasets["test"] = rows

    def val_dataloader(self) -> DataLoader:
        return self.loader("val", collate_fn=collate_questions)

    def test_dataloader(self) -> DataLoader:
        return self.loader("test", collate_fn=collate_questions)


class ChatTuner(TaskModule):
    """Fine-tunes an `AutoModelForCausalLM` on conversations; validation and test answer MT-Bench and have `judge`
    grade the answers (see the module's docstring for what is logged).

    The answers are rendered with the chat template of the `ChatDataModule` the trainer runs with (its
    `chat_template` option), else with the checkpoint's.

    Args:
        dtype: dtype the weights are loaded in ("float32", "bfloat16", ...).
        max_new_tokens: the longest answer to one turn (FastChat's default: 1024).
        lr_schedule: "cosine" or "linear" decay after the warm-up.
        judge: the judge model (`OpenAIJudge`, `TransformersJudge`); None generates the answers without grading
            them (only `{stage}/mt_bench/questions` is logged).
        output_dir: write each validation's and test's answers and verdicts to
            `{output_dir}/{stage}_mt_bench_step{global_step}.jsonl` (one line per question).
        **kwargs: `TaskModule` options.

    With several processes (DDP), each answers its share of the questions; the answers are gathered (the copies
    that the distributed sampler adds to even out the shares are dropped), rank 0 has them graded and the scores are
    broadcast, so every rank logs the same values.
    """

    def __init__(
        self,
        model_name_or_path: str,
        learning_rate: float = 2e-5,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.03,
        dtype: str = "float32",
        max_new_tokens: int = 1024,
        lr_schedule: Literal["cosine", "linear"] = "cosine",
        judge: MTBenchJudge | None = None,
        output_dir: str | None = None,
    ) -> None:
        super().__init__(model_name_or_path, learning_rate, weight_decay, warmup_ratio)
        self.save_hyperparameters(ignore=["judge"])
        check_positive("max_new_tokens", max_new_tokens)
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype '{dtype}' is not a torch dtype; use e.g. 'float32' or 'bfloat16'.")
        self.lr_schedule = lr_schedule
        self.max_new_tokens = max_new_tokens
        self.judge = judge
        self.output_dir = output_dir
        self.model = load_pretrained(AutoModelForCausalLM, model_name_or_path, "chat", dtype=getattr(torch, dtype))
        self.tokenizer = load_tokenizer(model_name_or_path)
        self.answers: list[dict[str, Any]] = []

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if isinstance(datamodule, ChatDataModule):
            self.tokenizer = datamodule.tokenizer

    def generation_config(self) -> GenerationConfig:
        """Greedy decoding of at most `max_new_tokens` tokens, stopping at the tokenizer's end-of-sequence token or
        any of the model's generation config (which lists the end-of-turn tokens of chat models)."""
        stops = self.model.generation_config.eos_token_id
        stops = [] if stops is None else [stops] if isinstance(stops, int) else list(stops)
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=sorted({self.tokenizer.eos_token_id, *stops} - {None}),
        )

    @torch.no_grad()
    def generate(self, conversations: list[list[Message]]) -> list[str]:
        """The assistant's next message after each conversation (decoded, special tokens dropped, stripped), generated
        greedily for the batch of left-padded prompts at once."""
        check_chat_template(self.tokenizer, self.model_name_or_path)
        prompts = []
        for messages in conversations:
            ids = render(self.tokenizer, messages, generation_prompt=True)
            prompts.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
        batch = self.tokenizer.pad(prompts, padding_side="left", return_tensors="pt").to(self.device)
        output = self.model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            generation_config=self.generation_config(),
        )
        texts = self.tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        return [text.strip() for text in texts]

    def answer(self, turns: list[list[str]]) -> list[list[str]]:
        """The model's answers to both turns of each question: turn 2 is asked after turn 1 and the first answer."""
        firsts = self.generate([[{"role": "user", "content": q[0]}] for q in turns])
        seconds = self.generate(
            [
                [
                    {"role": "user", "content": q[0]},
                    {"role": "assistant", "content": first},
                    {"role": "user", "content": q[1]},
                ]
                for q, first in zip(turns, firsts, strict=True)
            ]
        )
        return [list(pair) for pair in zip(firsts, seconds, strict=True)]

    def evaluate(self, batch: dict[str, list[Any]]) -> None:
        """Answers a batch of questions and keeps the answers for the end of the stage."""
        answers = self.answer(batch["turns"])
        for i, pair in enumerate(answers):
            self.answers.append({**{key: values[i] for key, values in batch.items()}, "answers": pair})

    def gathered_answers(self) -> list[dict[str, Any]]:
        """Every process's answers, once per question, in question order."""
        parts = gather_objects(self.answers)
        unique = {row["index"]: row for part in parts for row in part}
        return [unique[i] for i in sorted(unique)]

    def grade(self, stage: str) -> None:
        """Has the judge grade the stage's answers (rank 0), logs the number of questions answered
        (`{stage}/mt_bench/questions`) and the scores on every rank, and resets the answers."""
        rows, self.answers = self.gathered_answers(), []
        if self.trainer.sanity_checking:
            return
        summary = self.judge_and_write(rows, stage) if self.trainer.is_global_zero else None
        summary = self.trainer.strategy.broadcast(summary)
        self.log(f"{stage}/mt_bench/questions", float(len(rows)))
        for key, value in (summary or {}).items():
            self.log(f"{stage}/mt_bench/{key}", value, prog_bar=key == "score")

    def judge_and_write(self, rows: list[dict[str, Any]], stage: str) -> dict[str, float] | None:
        """The judge's summary of `rows` (`mt_bench.summarize`; None without a judge), with answers and verdicts
        written under `output_dir` when it is set."""
        questions = [MTBenchQuestion(r["question_id"], r["category"], r["turns"], r["reference"]) for r in rows]
        answers = [r["answers"] for r in rows]
        if self.judge is None:
            log.warning("MT-Bench: ChatTuner has no judge, so the %s answers are not graded.", stage)
            judgments = []
        else:
            judgments = judge_answers(self.judge, questions, answers, load_judge_prompts())
        if self.output_dir is not None:
            path = Path(self.output_dir) / f"{stage}_mt_bench_step{self.global_step}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            verdicts = {(j.question_id, j.turn): j for j in judgments}
            with path.open("w", encoding="utf-8") as file:
                for question, pair in zip(questions, answers, strict=True):
                    graded = [verdicts.get((question.question_id, turn)) for turn in (1, 2)]
                    line = {
                        **dataclasses.asdict(question),
                        "answers": pair,
                        "judgments": [None if j is None else dataclasses.asdict(j) for j in graded],
                    }
                    file.write(json.dumps(line, ensure_ascii=False) + "\n")
        return None if self.judge is None else summarize(judgments)

    def on_validation_epoch_start(self) -> None:
        self.answers = []

    def validation_step(self, batch: dict[str, list[Any]], batch_idx: int) -> None:
        self.evaluate(batch)

    def on_validation_epoch_end(self) -> None:
        self.grade("val")

    def on_test_epoch_start(self) -> None:
        self.answers = []

    def test_step(self, batch: dict[str, list[Any]], batch_idx: int) -> None:
        self.evaluate(batch)

    def on_test_epoch_end(self) -> None:
        self.grade("test")
