"""5-shot MMLU: the standard prompt, the question files, and accuracy by answer-letter log-likelihood."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import load_dataset
from torch import nn
from torchmetrics.classification import MulticlassAccuracy
from transformers import PreTrainedTokenizerBase

LETTERS = ("A", "B", "C", "D")


@dataclass(frozen=True)
class Question:
    """One multiple-choice question; `answer` indexes `choices`."""

    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: int


def format_subject(subject: str) -> str:
    """'high_school_biology' -> 'high school biology'."""
    return subject.replace("_", " ")


def format_question(question: Question, with_answer: bool) -> str:
    """'question\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:' and, for a shot, ' B\\n\\n'."""
    text = question.question + "".join(
        f"\n{letter}. {c}" for letter, c in zip(LETTERS, question.choices, strict=True)
    )
    text += "\nAnswer:"
    return text + f" {LETTERS[question.answer]}\n\n" if with_answer else text


def few_shot_prompt(question: Question, shots: Sequence[Question]) -> str:
    """The prompt of Hendrycks et al. (2021): a header naming the subject, the answered shots, then the
    question ending in 'Answer:' (single space after 'about', as in lm-evaluation-harness)."""
    header = f"The following are multiple choice questions (with answers) about {format_subject(question.subject)}.\n\n"
    return header + "".join(format_question(s, True) for s in shots) + format_question(question, False)


def read_questions(
    mmlu_dir: str | None, split: str, subjects: Sequence[str] | None = None
) -> dict[str, list[Question]]:
    """Questions per subject, from `{mmlu_dir}/{split}/{subject}_{split}.csv` files (header
    `question,choice0,choice1,choice2,choice3,answer`, answer 0-3 or A-D), or from the hub data set
    `cais/mmlu` when `mmlu_dir` is None.

    Raises:
        FileNotFoundError: the split's folder or a requested subject's file is missing.
        ValueError: a file has other columns.
    """
    if mmlu_dir is None:
        rows = load_dataset("cais/mmlu", "all", split=split)
        by_subject: dict[str, list[Question]] = {}
        for row in rows:
            if subjects is None or row["subject"] in subjects:
                question = Question(
                    row["subject"], row["question"], tuple(row["choices"]), int(row["answer"])
                )
                by_subject.setdefault(row["subject"], []).append(question)
        return by_subject
    folder = Path(mmlu_dir) / split
    files = {p.name.removesuffix(f"_{split}.csv"): p for p in sorted(folder.glob(f"*_{split}.csv"))}
    if not files:
        raise FileNotFoundError(
            f"no MMLU files '*_{split}.csv' in '{folder}'; point mmlu_dir at a folder "
            f"with dev/ and {split}/ subfolders of per-subject csv files."
        )
    for subject in subjects or []:
        if subject not in files:
            raise FileNotFoundError(
                f"MMLU subject '{subject}' has no file in '{folder}' (subjects there: {sorted(files)})."
            )
    wanted = {s: str(p) for s, p in files.items() if subjects is None or s in subjects}
    tables = load_dataset("csv", data_files=wanted, keep_default_na=False)
    expected = ["question", "choice0", "choice1", "choice2", "choice3", "answer"]
    by_subject = {}
    for subject, table in tables.items():
        if table.column_names != expected:
            raise ValueError(f"'{wanted[subject]}' has columns {table.column_names}; expected {expected}.")
        by_subject[subject] = [
            Question(
                subject,
                str(r["question"]),
                tuple(str(r[f"choice{i}"]) for i in range(4)),
                LETTERS.index(a) if (a := str(r["answer"]).strip()) in LETTERS else int(a),
            )
            for r in table
        ]
    return by_subject


def letter_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids of ' A', ' B', ' C', ' D' (the token that follows 'Answer:').

    Raises:
        ValueError: the tokenizer maps two letters to the same token.
    """
    ids = [tokenizer(" " + letter, add_special_tokens=False)["input_ids"][-1] for letter in LETTERS]
    if len(set(ids)) != len(LETTERS):
        raise ValueError(
            f"the tokenizer maps the answer letters {LETTERS} to tokens {ids}; they must differ."
        )
    return ids


def encode_questions(
    questions: dict[str, list[Question]],
    shots: dict[str, list[Question]],
    tokenizer: PreTrainedTokenizerBase,
    num_shots: int,
    max_length: int,
) -> list[dict]:
    """Tokenized k-shot prompts with `answer` and `subject` (index into the sorted subjects). Like the
    reference evaluation, drops shots until the prompt fits in `max_length` tokens.

    Raises:
        ValueError: a subject has fewer than `num_shots` dev questions, or a zero-shot prompt is too long.
    """
    examples = []
    for index, subject in enumerate(sorted(questions)):
        available = shots.get(subject, [])
        if len(available) < num_shots:
            raise ValueError(
                f"MMLU subject '{subject}' has {len(available)} dev questions, {num_shots} needed."
            )
        for question in questions[subject]:
            for k in range(num_shots, -1, -1):
                ids = tokenizer(few_shot_prompt(question, available[:k]))["input_ids"]
                if len(ids) <= max_length:
                    break
            else:
                raise ValueError(
                    f"an MMLU '{subject}' question needs {len(ids)} tokens even with no shots; "
                    f"raise mmlu_max_length above {max_length}."
                )
            examples.append(
                {
                    "input_ids": ids,
                    "attention_mask": [1] * len(ids),
                    "answer": question.answer,
                    "subject": index,
                }
            )
    return examples


def answer_log_likelihoods(logits: torch.Tensor, letter_ids: Sequence[int]) -> torch.Tensor:
    """Log-probabilities `(B, 4)` of the answer letters from next-token logits `(B, V)`."""
    return torch.log_softmax(logits.float(), dim=-1)[:, list(letter_ids)]


class MMLUAccuracy(nn.Module):
    """Accuracy over all questions (`average`) and per subject, as torchmetrics accuracies."""

    def __init__(self, subjects: Sequence[str]) -> None:
        super().__init__()
        self.subjects = list(subjects)
        self.average = MulticlassAccuracy(num_classes=len(LETTERS), average="micro")
        self.per_subject = nn.ModuleList(
            MulticlassAccuracy(num_classes=len(LETTERS), average="micro") for _ in self.subjects
        )

    def update(self, predictions: torch.Tensor, answers: torch.Tensor, subjects: torch.Tensor) -> None:
        """Adds predicted letters `(B,)`, true letters `(B,)` and subject indices `(B,)`."""
        self.average.update(predictions, answers)
        for index in subjects.unique().tolist():
            mask = subjects == index
            self.per_subject[index].update(predictions[mask], answers[mask])

    def compute(self) -> dict[str, torch.Tensor]:
        """{'average': ..., subject: ...} over the subjects that received questions."""
        scores = {"average": self.average.compute()}
        for subject, metric in zip(self.subjects, self.per_subject, strict=True):
            if metric.update_called:
                scores[subject] = metric.compute()
        return scores

    def reset(self) -> None:
        self.average.reset()
        for metric in self.per_subject:
            metric.reset()
