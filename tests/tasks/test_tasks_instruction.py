"""Instruction tuning: prompt templates, loss on the response only, and MMLU scoring of a causal LM."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_checkpoints import build_tokenizer, write_alpaca_file

from lightning_lorafa.tasks import InstructionDataModule, InstructionTuner
from lightning_lorafa.tasks.instruction import encode_instruction, prompt_and_response

MMLU = str(Path(__file__).resolve().parents[2] / "data" / "mmlu")


def test_alpaca_and_flan_prompts() -> None:
    prompt, response = prompt_and_response(
        {"instruction": "Sum 2 and 3.", "input": "", "output": "5"}, "alpaca"
    )
    assert prompt == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nSum 2 and 3.\n\n### Response:\n"
    )
    assert response == "5"
    prompt, _ = prompt_and_response(
        {"instruction": "Translate.", "input": "casa", "output": "house"}, "alpaca"
    )
    assert prompt.endswith("### Instruction:\nTranslate.\n\n### Input:\ncasa\n\n### Response:\n")
    assert prompt_and_response({"inputs": "Is it red?", "targets": "yes"}, "flan") == (
        "Is it red?\n\n",
        "yes",
    )


def test_loss_covers_only_the_response_and_end_of_sequence() -> None:
    tokenizer = build_tokenizer()
    encoded = encode_instruction("the cat is", "red", tokenizer, max_length=16)
    red, eos = tokenizer.convert_tokens_to_ids(["red", "</s>"])
    assert encoded["labels"] == [-100, -100, -100, red, eos]
    assert encoded["input_ids"][3:] == [red, eos] and encoded["attention_mask"] == [1] * 5
    cut = encode_instruction("the cat is", "very red", tokenizer, max_length=4)
    assert cut["labels"] == [-100, -100, -100, tokenizer.convert_tokens_to_ids("very")]


def test_rows_without_a_response_token_are_dropped(task_checkpoints: dict[str, str], tmp_path: Path) -> None:
    tokenizer = build_tokenizer()
    rows = (
        {"instruction": "Give three tips for staying healthy", "input": "", "output": ""},
        {"instruction": "translate English to Romanian", "input": "the red cat", "output": ""},
    )
    short, long = (len(tokenizer(prompt_and_response(r, "alpaca")[0])["input_ids"]) for r in rows)
    assert short < long
    data = InstructionDataModule(
        task_checkpoints["llama"],
        data_files={"train": write_alpaca_file(tmp_path)},
        mmlu_dir=MMLU,
        mmlu_subjects=["anatomy"],
        mmlu_questions_per_subject=3,
        max_length=short + 1,
    )
    data.setup("fit")
    assert len(data.datasets["train"]) == 3  # the 3 rows with an input leave no room for the response
    assert all(len(ids) == short + 1 for ids in data.datasets["train"]["input_ids"])
    assert len(data.datasets["mmlu"]) == 3 and data.subjects == ["anatomy"]
    with pytest.raises(ValueError, match="unknown prompt_format 'dolly'"):
        InstructionDataModule(task_checkpoints["llama"], prompt_format="dolly")


def test_answer_scores_read_the_last_prompt_token_of_right_padded_rows(
    task_checkpoints: dict[str, str],
) -> None:
    model = InstructionTuner(task_checkpoints["llama"]).eval()
    data = InstructionDataModule(
        task_checkpoints["llama"],
        mmlu_dir=MMLU,
        mmlu_subjects=["anatomy", "virology"],
        mmlu_questions_per_subject=2,
        mmlu_shots=1,
    )
    data.setup("validate")
    rows = [data.datasets["mmlu"][i] for i in range(4)]
    assert len({len(r["input_ids"]) for r in rows}) > 1
    batch = data.mmlu_collate(rows)
    with torch.no_grad():
        scores = model.answer_scores(batch)
        for row, score in zip(rows, scores, strict=True):
            logits = model.model(input_ids=torch.tensor([row["input_ids"]])).logits[0, -1]
            expected = torch.log_softmax(logits, -1)[model.letter_ids]
            torch.testing.assert_close(score, expected, atol=1e-5, rtol=1e-5)
    assert batch["subject"].tolist() == [0, 0, 1, 1]
