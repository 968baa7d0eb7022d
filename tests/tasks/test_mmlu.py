"""MMLU: the standard 5-shot prompt, the question files, letter log-likelihoods and accuracy."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tiny_checkpoints import build_tokenizer

from lightning_lorafa.tasks.mmlu import (
    MMLUAccuracy,
    Question,
    answer_log_likelihoods,
    encode_questions,
    few_shot_prompt,
    letter_token_ids,
    read_questions,
)

DATA = Path(__file__).resolve().parents[2] / "data" / "mmlu"
SHOT_1 = Question("abstract_algebra", "What is 1+1?", ("1", "2", "3", "4"), 1)
SHOT_2 = Question("abstract_algebra", "Which is even?", ("3", "5", "4", "7"), 2)
ASKED = Question("abstract_algebra", "What is 2+2?", ("4", "3", "2", "1"), 0)


def test_prompt_matches_the_standard_few_shot_format() -> None:
    expected = (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
        "Which is even?\nA. 3\nB. 5\nC. 4\nD. 7\nAnswer: C\n\n"
        "What is 2+2?\nA. 4\nB. 3\nC. 2\nD. 1\nAnswer:"
    )
    assert few_shot_prompt(ASKED, [SHOT_1, SHOT_2]) == expected


def test_five_shot_prompt_from_the_shipped_files() -> None:
    dev = read_questions(str(DATA), "dev", ["anatomy"])["anatomy"]
    test = read_questions(str(DATA), "test", ["anatomy"])["anatomy"]
    prompt = few_shot_prompt(test[0], dev)
    assert prompt.startswith(
        "The following are multiple choice questions (with answers) about anatomy.\n\n"
        "What is the embryological origin of the hyoid bone?\nA. The first pharyngeal arch\n"
    )
    assert prompt.count("\nAnswer: ") == 5 and prompt.endswith("\nAnswer:")
    assert "Answer: D\n\n" in prompt  # the first dev answer is 3


def test_read_questions_reads_every_subject() -> None:
    dev = read_questions(str(DATA), "dev")
    test = read_questions(str(DATA), "test")
    assert len(dev) == len(test) == 57
    assert {len(q) for q in dev.values()} == {5} and {len(q) for q in test.values()} == {5}
    assert dev["anatomy"][0].answer == 3 and len(dev["anatomy"][0].choices) == 4


def test_read_questions_accepts_letter_answers_and_names_missing_subjects(tmp_path: Path) -> None:
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "logic_test.csv").write_text(
        "question,choice0,choice1,choice2,choice3,answer\nIs it?,yes,no,maybe,never,C\n"
    )
    assert read_questions(str(tmp_path), "test")["logic"][0].answer == 2
    with pytest.raises(FileNotFoundError, match="MMLU subject 'anatomy' has no file in"):
        read_questions(str(tmp_path), "test", ["anatomy"])
    with pytest.raises(FileNotFoundError, match=r"no MMLU files '\*_dev.csv'"):
        read_questions(str(tmp_path), "dev")


def test_encode_questions_drops_shots_until_the_prompt_fits() -> None:
    tokenizer = build_tokenizer()
    questions = {"abstract_algebra": [ASKED]}
    shots = {"abstract_algebra": [SHOT_1, SHOT_2]}
    lengths = [len(tokenizer(few_shot_prompt(ASKED, [SHOT_1, SHOT_2][:k]))["input_ids"]) for k in range(3)]
    assert lengths[0] < lengths[1] < lengths[2]
    [fits_one] = encode_questions(questions, shots, tokenizer, num_shots=2, max_length=lengths[1])
    assert len(fits_one["input_ids"]) == lengths[1]
    assert (fits_one["answer"], fits_one["subject"]) == (0, 0)
    with pytest.raises(ValueError, match="even with no shots"):
        encode_questions(questions, shots, tokenizer, num_shots=2, max_length=lengths[0] - 1)
    with pytest.raises(ValueError, match="has 2 dev questions, 5 needed"):
        encode_questions(questions, shots, tokenizer, num_shots=5, max_length=1000)


def test_letter_tokens_and_their_log_likelihoods() -> None:
    tokenizer = build_tokenizer()
    ids = letter_token_ids(tokenizer)
    assert tokenizer.convert_ids_to_tokens(ids) == ["A", "B", "C", "D"]
    logits = torch.zeros(1, 10)
    logits[0, 2] = math.log(4.0)  # probabilities: 4/13 for token 2, 1/13 for the other nine
    scores = answer_log_likelihoods(logits, [2, 3, 4, 5])
    expected = torch.log(torch.tensor([[4 / 13, 1 / 13, 1 / 13, 1 / 13]]))
    torch.testing.assert_close(scores, expected)


def test_accuracy_is_averaged_over_questions_and_reported_per_subject() -> None:
    metric = MMLUAccuracy(["anatomy", "astronomy", "virology"])
    metric.update(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 3]), torch.tensor([0, 0, 1]))
    metric.update(torch.tensor([3]), torch.tensor([2]), torch.tensor([1]))
    scores = {k: v.item() for k, v in metric.compute().items()}
    assert scores == {"average": 0.5, "anatomy": 1.0, "astronomy": 0.0}
    metric.reset()
    metric.update(torch.tensor([1]), torch.tensor([1]), torch.tensor([2]))
    assert {k: v.item() for k, v in metric.compute().items()} == {"average": 1.0, "virology": 1.0}
