"""MT-Bench single-answer grading: the questions, FastChat's judge prompts, the judges and the score parser.

Each question has two turns. The model's answer to turn 1 is graded with FastChat's `single-v1` prompt, its answer to
turn 2 (given turn 1 and its own first answer as history) with `single-v1-multi-turn`; questions of the categories
that need a reference answer (math, reasoning, coding) are graded with `single-math-v1` and
`single-math-v1-multi-turn`, which show the judge the reference answers. The prompts ship, unchanged, in
`data/mt_bench_judge_prompts.jsonl` (see `data/NOTICE`). The judge's verdict ends in "Rating: [[N]]"; `parse_score`
reads it as FastChat does, and a verdict without a score is counted as unparsed, never given one.

A judge is anything with `judge(system_prompt, user_prompt) -> str`: `OpenAIJudge` (an OpenAI-compatible endpoint,
GPT-4 as in MT-Bench) or `TransformersJudge` (a local causal LM with a chat template).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerBase

from lightning_lorafa.tasks.common import check_positive, load_pretrained, load_tokenizer

log = logging.getLogger(__name__)

#: FastChat's single-answer grading prompts (`single-v1`, `single-math-v1` and their `-multi-turn` versions).
JUDGE_PROMPTS_FILE = Path(__file__).parent / "data" / "mt_bench_judge_prompts.jsonl"
#: Categories graded against a reference answer (FastChat's `NEED_REF_CATS`).
NEED_REF_CATS = ("math", "reasoning", "coding")
#: The prompt names per (turn, graded against a reference).
PROMPT_NAMES = {
    (1, False): "single-v1",
    (1, True): "single-math-v1",
    (2, False): "single-v1-multi-turn",
    (2, True): "single-math-v1-multi-turn",
}
#: FastChat's rating patterns: "[[N]]", else "[N]" (N an integer or a decimal).
_SCORE = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_SCORE_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")
#: Column names of the question formats: FastChat's `question.jsonl`, the hub set `HuggingFaceH4/mt_bench_prompts`.
QUESTION_FORMATS = {
    "fastchat": {"question_id": "question_id", "turns": "turns"},
    "h4": {"question_id": "prompt_id", "turns": "prompt"},
}


@dataclass
class MTBenchQuestion:
    """A two-turn question; `reference` holds the reference answers of its turns (empty when there are none)."""

    question_id: int | str
    category: str
    turns: list[str]
    reference: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class JudgePrompt:
    """One line of the judge prompt file: the system prompt and the user prompt template."""

    name: str
    system_prompt: str
    prompt_template: str


@dataclass
class Judgment:
    """The judge's verdict on one turn of one answer: `score` is None when the verdict holds no rating."""

    question_id: int | str
    category: str
    turn: int
    prompt_name: str
    user_prompt: str
    judgment: str
    score: float | None


def parse_score(judgment: str) -> float | None:
    """The rating in a verdict, as FastChat reads it: the first "[[N]]", else the first "[N]"; None without one.

    N is a non-negative integer or decimal ("[[8.5]]" is 8.5). Like FastChat, a rating outside 1-10 ("[[11]]") is
    kept as written; negative numbers and words ("[[-1]]", "[[ten]]") are not ratings.
    """
    match = _SCORE.search(judgment) or _SCORE_BACKUP.search(judgment)
    return float(match.group(1)) if match else None


def load_judge_prompts(path: str | Path = JUDGE_PROMPTS_FILE) -> dict[str, JudgePrompt]:
    """The judge prompts of a FastChat `judge_prompts.jsonl` file by name.

    Raises:
        ValueError: one of the four single-answer prompts (`PROMPT_NAMES`) is missing.
    """
    prompts = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            prompts[row["name"]] = JudgePrompt(row["name"], row["system_prompt"], row["prompt_template"])
    missing = sorted(set(PROMPT_NAMES.values()) - set(prompts))
    if missing:
        raise ValueError(
            f"judge prompt file '{path}' lacks the prompts {missing}; give FastChat's judge_prompts.jsonl."
        )
    return prompts


def uses_reference(question: MTBenchQuestion, turn: int) -> bool:
    """Whether turn `turn` of `question` is graded against its reference answers (its category needs them and the
    question has one per turn up to `turn`)."""
    return question.category in NEED_REF_CATS and len(question.reference) >= turn


def judge_prompt(
    question: MTBenchQuestion, answers: Sequence[str], turn: int, prompts: Mapping[str, JudgePrompt]
) -> tuple[JudgePrompt, str]:
    """The prompt that grades turn `turn` (1 or 2) of the model's `answers` to `question`, and its user prompt.

    Turn 1 shows the first question and answer; turn 2 the whole conversation, asking for a grade of the second
    answer. The reference answers are shown for the categories in `NEED_REF_CATS` (see `uses_reference`).
    """
    if turn not in (1, 2):
        raise ValueError(f"MT-Bench grades turns 1 and 2, got turn {turn}.")
    reference = uses_reference(question, turn)
    prompt = prompts[PROMPT_NAMES[turn, reference]]
    fields = {f"ref_answer_{i + 1}": text for i, text in enumerate(question.reference[:turn])} if reference else {}
    if turn == 1:
        fields |= {"question": question.turns[0], "answer": answers[0]}
    else:
        fields |= {
            "question_1": question.turns[0],
            "question_2": question.turns[1],
            "answer_1": answers[0],
            "answer_2": answers[1],
        }
    return prompt, prompt.prompt_template.format(**fields)


def questions_from_rows(rows: Iterable[Mapping[str, Any]], source: str) -> list[MTBenchQuestion]:
    """MT-Bench questions from rows in FastChat's format (`question_id`, `category`, `turns`, optional `reference`)
    or the hub set's (`prompt_id`, `category`, `prompt`, `reference`), in order.

    Raises:
        ValueError: a row has neither format's columns, a question has not two turns, or an id repeats.
    """
    questions: list[MTBenchQuestion] = []
    seen: set[str] = set()
    for number, row in enumerate(rows):
        names = next((n for n in QUESTION_FORMATS.values() if set(n.values()) | {"category"} <= set(row)), None)
        if names is None:
            raise ValueError(
                f"MT-Bench question {number} of {source} has the columns {sorted(row)}; give FastChat's "
                "(question_id, category, turns, reference) or HuggingFaceH4/mt_bench_prompts' (prompt_id, category, "
                "prompt, reference)."
            )
        question_id, turns = row[names["question_id"]], row[names["turns"]]
        if not isinstance(turns, list) or len(turns) != 2 or not all(isinstance(t, str) for t in turns):
            raise ValueError(f"MT-Bench question {question_id} of {source} needs 2 turns (strings), got {turns!r}.")
        if str(question_id) in seen:
            raise ValueError(f"MT-Bench question id {question_id} appears twice in {source}; ids must be unique.")
        seen.add(str(question_id))
        questions.append(MTBenchQuestion(question_id, row["category"], list(turns), list(row.get("reference") or [])))
    return questions


def read_questions(path: str | Path) -> list[MTBenchQuestion]:
    """The questions of a local jsonl file (FastChat's `question.jsonl` format or the hub set's columns).

    Raises:
        FileNotFoundError: there is no such file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"MT-Bench question file '{path}' does not exist; give a jsonl file in FastChat's question.jsonl format "
            "(question_id, category, turns, reference)."
        )
    lines = path.read_text(encoding="utf-8").splitlines()
    return questions_from_rows((json.loads(line) for line in lines if line.strip()), f"'{path}'")


def load_questions(
    dataset: str, split: str, path: str | None = None, max_questions: int | None = None
) -> list[MTBenchQuestion]:
    """The first `max_questions` (all when None) MT-Bench questions of the local file `path`, or of the split `split`
    of the hub data set `dataset` when `path` is None."""
    check_positive("max_questions", max_questions)
    if path is not None:
        questions = read_questions(path)
    else:
        splits = load_dataset(dataset)
        if split not in splits:
            raise ValueError(
                f"MT-Bench data set '{dataset}' has no split '{split}' (splits: {sorted(splits)}); set mt_bench_split."
            )
        questions = questions_from_rows(splits[split], f"'{dataset}' ({split})")
    return questions[:max_questions]


class MTBenchJudge(ABC):
    """A judge model: `judge(system_prompt, user_prompt)` returns its verdict (text ending in "Rating: [[N]]")."""

    @abstractmethod
    def judge(self, system_prompt: str, user_prompt: str) -> str:
        """The judge's reply to a system prompt and a user prompt."""


class OpenAIJudge(MTBenchJudge):
    """A model behind an OpenAI-compatible chat completions endpoint (OpenAI's own by default), asked with the
    system prompt and the user prompt as two messages, as FastChat asks GPT-4.

    Args:
        model: the judge model's name at the endpoint ("gpt-4" in MT-Bench).
        base_url: the endpoint, e.g. "http://localhost:8000/v1" for a local server (default: OpenAI's).
        api_key_env: the environment variable holding the API key.
        temperature: sampling temperature (MT-Bench: 0).
        max_tokens: the longest verdict in tokens (MT-Bench: 2048).
        max_retries: retries of a failed request (the `openai` client waits between them); the last error is raised.
        timeout: seconds before a request is abandoned.

    Raises:
        ModuleNotFoundError: the `openai` package is not installed.
        ValueError: the environment variable `api_key_env` is not set.
    """

    def __init__(
        self,
        model: str = "gpt-4",
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        temperature: float = 0.0,
        max_tokens: int = 2048,
        max_retries: int = 5,
        timeout: float = 600.0,
    ) -> None:
        check_positive("max_tokens", max_tokens)
        try:
            import openai  # noqa: F401  (only checks that the client is installed)
        except ModuleNotFoundError:
            raise ModuleNotFoundError(
                "OpenAIJudge needs the openai package, which is not installed: "
                'pip install "lightning-lorafa[mt-bench]" (or pip install openai).',
                name="openai",
            ) from None
        if not os.environ.get(api_key_env):
            raise ValueError(
                f"OpenAIJudge reads its API key from the environment variable {api_key_env}, which is not set; "
                f"export {api_key_env}=... (any non-empty value for a local server that checks no key) or name "
                "another variable with api_key_env."
            )
        self.model = model
        self.base_url = base_url
        self.api_key_env = api_key_env
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.max_retries = max_retries
        self.timeout = timeout
        self._client: Any = None

    def client(self) -> Any:
        """The `openai.OpenAI` client, created on first use (the key is read from the environment then)."""
        if self._client is None:
            from openai import OpenAI

            self._client = OpenAI(
                api_key=os.environ[self.api_key_env],
                base_url=self.base_url,
                max_retries=self.max_retries,
                timeout=self.timeout,
            )
        return self._client

    def judge(self, system_prompt: str, user_prompt: str) -> str:
        response = self.client().chat.completions.create(
            model=self.model,
            messages=[{"role": "system", "content": system_prompt}, {"role": "user", "content": user_prompt}],
            temperature=self.temperature,
            max_tokens=self.max_tokens,
            n=1,
        )
        return response.choices[0].message.content or ""

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}  # the client holds connections; it is made again on first use


class TransformersJudge(MTBenchJudge):
    """A local causal LM as the judge: the system and user prompts rendered with its chat template, the verdict
    generated greedily. The model is loaded on first use (not when the configuration is read).

    Args:
        model_name_or_path: hub name or local directory of the judge model (it needs a chat template).
        dtype: dtype the weights are loaded in ("float32", "bfloat16", ...).
        max_new_tokens: the longest verdict in tokens.
        device: where the judge runs (default: "cuda" when available, else "cpu").
    """

    def __init__(
        self,
        model_name_or_path: str,
        dtype: str = "float32",
        max_new_tokens: int = 2048,
        device: str | None = None,
    ) -> None:
        check_positive("max_new_tokens", max_new_tokens)
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype '{dtype}' is not a torch dtype; use e.g. 'float32' or 'bfloat16'.")
        self.model_name_or_path = model_name_or_path
        self.dtype = dtype
        self.max_new_tokens = max_new_tokens
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._loaded: tuple[Any, PreTrainedTokenizerBase] | None = None

    def load(self) -> tuple[Any, PreTrainedTokenizerBase]:
        """The judge model (in eval mode, on `device`) and its tokenizer, loaded on first use.

        Raises:
            ValueError: the tokenizer has no chat template.
        """
        if self._loaded is None:
            tokenizer = load_tokenizer(self.model_name_or_path)
            if tokenizer.chat_template is None:
                raise ValueError(
                    f"the judge '{self.model_name_or_path}' has no chat template (tokenizer.chat_template is None), "
                    "which TransformersJudge renders its prompts with; choose an instruction-tuned judge with one."
                )
            dtype = getattr(torch, self.dtype)
            model = load_pretrained(AutoModelForCausalLM, self.model_name_or_path, "MT-Bench judge", dtype=dtype)
            self._loaded = model.to(self.device).eval(), tokenizer
        return self._loaded

    @torch.no_grad()
    def judge(self, system_prompt: str, user_prompt: str) -> str:
        model, tokenizer = self.load()
        messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": user_prompt}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        input_ids = torch.tensor([ids], device=self.device)
        config = GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        output = model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config
        )
        return tokenizer.decode(output[0, len(ids) :], skip_special_tokens=True)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_loaded": None}  # the model is loaded again where it is used


def judge_answers(
    judge: MTBenchJudge,
    questions: Sequence[MTBenchQuestion],
    answers: Sequence[Sequence[str]],
    prompts: Mapping[str, JudgePrompt] | None = None,
) -> list[Judgment]:
    """The judge's verdicts on both turns of every answer (`answers[i]`: the two answers to `questions[i]`), in
    order: question 1 turn 1, question 1 turn 2, question 2 turn 1, ...

    Questions of a category in `NEED_REF_CATS` without reference answers are graded with the general prompts;
    their ids are named in a warning.
    """
    prompts = prompts or load_judge_prompts()
    unreferenced = [q.question_id for q in questions if q.category in NEED_REF_CATS and not uses_reference(q, 2)]
    if unreferenced:
        log.warning(
            "MT-Bench: questions %s (categories %s) have no reference answer for each turn; their turns without one "
            "are graded with the general prompts (single-v1, single-v1-multi-turn), without a reference.",
            unreferenced,
            list(NEED_REF_CATS),
        )
    judgments = []
    for question, pair in zip(questions, answers, strict=True):
        for turn in (1, 2):
            prompt, user_prompt = judge_prompt(question, pair, turn, prompts)
            verdict = judge.judge(prompt.system_prompt, user_prompt)
            judgments.append(
                Judgment(
                    question.question_id,
                    question.category,
                    turn,
                    prompt.name,
                    user_prompt,
                    verdict,
                    parse_score(verdict),
                )
            )
    return judgments


def summarize(judgments: Sequence[Judgment]) -> dict[str, float]:
    """The mean rating of all parsed verdicts (`score`), of each turn (`turn1`, `turn2`) and of each category (both
    turns, by category name), and the number of verdicts without a rating (`unparsed`), which no mean counts. A mean
    over no rating is NaN."""

    def mean(scores: list[float | None]) -> float:
        parsed = [s for s in scores if s is not None]
        return sum(parsed) / len(parsed) if parsed else math.nan

    summary = {
        "score": mean([j.score for j in judgments]),
        "turn1": mean([j.score for j in judgments if j.turn == 1]),
        "turn2": mean([j.score for j in judgments if j.turn == 2]),
    }
    for category in sorted({j.category for j in judgments}):
        summary[category] = mean([j.score for j in judgments if j.category == category])
    summary["unparsed"] = float(sum(j.score is None for j in judgments))
    return summary
