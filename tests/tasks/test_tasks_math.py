"""Math task: GSM8K answer extraction, the MetaMathQA prompt with the loss on the response only, and greedy
generation of left-padded GSM8K prompts scored as `val/gsm8k/acc`, on a tiny LLaMA and hand-made rows (tests/data)."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import lightning.pytorch as pl
import pytest
from conftest import byte_level_tokenizer, quiet_trainer, tiny_causal_llama

from lightning_lorafa import LoraFA
from lightning_lorafa.tasks import MathDataModule, MathTuner
from lightning_lorafa.tasks.math import QUERY_TEMPLATE, extract_answer, gsm8k_answer

DATA = Path(__file__).parents[1] / "data"
METAMATH = str(DATA / "metamathqa_sample.json")
GSM8K = str(DATA / "gsm8k_sample.jsonl")


@pytest.fixture(scope="module")
def math_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny LLaMA and a byte-level BPE tokenizer trained on the fixture rows, saved with save_pretrained."""
    texts = [row["query"] + " " + row["response"] for row in json.loads(Path(METAMATH).read_text())]
    texts += [json.loads(line)["question"] for line in Path(GSM8K).read_text().splitlines()]
    tokenizer = byte_level_tokenizer(texts, vocab_size=400)
    model = tiny_causal_llama(len(tokenizer))
    path = tmp_path_factory.mktemp("math") / "llama"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Tom has 3 * 12 = 36 pencils.\n#### 29\nThe answer is: 29", Fraction(29)),
        ("The bakery makes $3,000 a week.\nThe answer is: 3,000", Fraction(3000)),
        ("It fell to -5 degrees. The answer is: -5", Fraction(-5)),
        ("There are 5.25 liters left. The answer is: 5.25", Fraction(21, 4)),
        ("The answer is: $1,000.50 per week.", Fraction(200_100, 200)),
        ("The discount is 15%. The answer is 12%.", Fraction(12)),
        ("The final answer is: 7/2", Fraction(7, 2)),
        ("There are 5 slices left.\nThe answer is: \\frac{5}{8}", Fraction(5, 8)),
        ("The answer is: 0.5", Fraction(1, 2)),
        ("The answer is: 4, no wait.\nThe answer is: 5\n\nQuestion: next", Fraction(5)),  # the last marker counts
        ("36 - 7 = <<36-7=29>>29 pencils left.\n#### 29", Fraction(29)),
        ("The answer is: 1,234,567.", Fraction(1_234_567)),
        ("The answer is: .75", Fraction(3, 4)),
        ("He has 29 pencils left.", None),  # no marker
        ("The answer is: twelve", None),
        ("The answer is: 3/0", None),
    ],
)
def test_final_number_extraction(text: str, expected: Fraction | None) -> None:
    assert extract_answer(text) == expected


def test_gsm8k_answers_are_read_from_their_last_line() -> None:
    answers = [json.loads(line)["answer"] for line in Path(GSM8K).read_text().splitlines()]
    assert [gsm8k_answer(a) for a in answers] == [29, 3000, -5, 15, Fraction(21, 4), 17]
    with pytest.raises(ValueError, match=r"does not end in '#### N'; give GSM8K rows"):
        gsm8k_answer("She runs 15 miles. The answer is: 15")


def test_loss_covers_the_response_only(math_checkpoint: str) -> None:
    data = MathDataModule(math_checkpoint, data_files={"train": METAMATH}, eval_data_files={"test": GSM8K})
    data.setup("fit")
    tokenizer = data.tokenizer
    train, val = data.datasets["train"], data.datasets["val"]
    assert len(train) == 6 and len(val) == 6
    rows = {row["query"]: row["response"] for row in json.loads(Path(METAMATH).read_text())}
    prompt_lengths = []
    for encoded in train:
        labels = encoded["labels"]
        start = labels.index(next(y for y in labels if y != -100))
        assert all(y == -100 for y in labels[:start]) and labels[start:] == encoded["input_ids"][start:]
        prompt_lengths.append(start)
        prompt = tokenizer.decode(encoded["input_ids"][:start])
        query = prompt.removeprefix("Question: ").removesuffix(" Think step by step.\nAnswer:")
        assert prompt == QUERY_TEMPLATE.format(query=query) and query in rows
        assert tokenizer.decode(labels[start:]) == " " + rows[query] + "</s>"
    assert val[0]["answer"] == "29" and tokenizer.decode(val[0]["input_ids"]).endswith("step by step.\nAnswer:")
    longest = max(prompt_lengths) + 2  # every row keeps at least 2 response tokens
    files = {"data_files": {"train": METAMATH}, "eval_data_files": {"test": GSM8K}}
    cut = MathDataModule(math_checkpoint, max_length=longest, **files)
    cut.setup("fit")
    assert [len(ids) for ids in cut.datasets["train"]["input_ids"]] == [longest] * 6
    with pytest.raises(ValueError, match="must contain '{query}'"):
        MathDataModule(math_checkpoint, prompt_template="Question:")


def test_bad_columns_and_splits_are_named(math_checkpoint: str) -> None:
    wrong = MathDataModule(math_checkpoint, data_files={"train": GSM8K}, eval_data_files={"test": GSM8K})
    with pytest.raises(ValueError, match=r"MetaMathQA column 'query' is not in the data \(columns: \['question'"):
        wrong.setup("fit")
    no_split = MathDataModule(math_checkpoint, eval_data_files={"train": GSM8K})
    with pytest.raises(ValueError, match=r"the GSM8K data has no 'test' split \(splits: \['train'\]\)"):
        no_split.setup("validate")


def test_generation_round_trip_scores_gsm8k(math_checkpoint: str, tmp_path: Path) -> None:
    """Fit on the MetaMathQA rows until they are memorised, then validate on the GSM8K rows: batched, left-padded
    greedy generation gives each row's own generation, and `val/gsm8k/acc` is the fraction of exact final numbers."""
    data = MathDataModule(
        math_checkpoint,
        data_files={"train": METAMATH},
        eval_data_files={"test": GSM8K},
        batch_size=6,
        eval_batch_size=6,
    )
    pl.seed_everything(0, verbose=False)
    module = MathTuner(math_checkpoint, learning_rate=1e-2, weight_decay=0.0, warmup_ratio=0.0, max_new_tokens=48)
    trainer = quiet_trainer(
        tmp_path,
        accelerator='cpu',
        max_steps=120,
        check_val_every_n_epoch=120,
        num_sanity_val_steps=0,
        callbacks=[LoraFA(r=16, alpha=32)],
    )
    trainer.fit(module, data)
    assert hasattr(module.model, "lorafa_chunked_loss")  # the task trained with the loss without the logits
    (metrics,) = trainer.validate(module, data, verbose=False)

    batch = data.prompt_collate([data.datasets["val"][i] for i in range(6)])
    assert (batch["attention_mask"][:, -1] == 1).all() and (batch["attention_mask"][:, 0] == 0).any()  # left-padded
    module.eval()
    completions = module.generate(batch)
    for i, completion in enumerate(completions):
        row = {key: batch[key][i : i + 1, batch["attention_mask"][i] == 1] for key in ("input_ids", "attention_mask")}
        alone = module.generate(row)
        assert alone == [completion]
    correct = [extract_answer(c) == Fraction(gold) for c, gold in zip(completions, batch["answer"], strict=True)]
    assert metrics["val/gsm8k/acc"] == pytest.approx(sum(correct) / 6)
    # questions asked in training too (rows 0, 1, 2, 5; row 3 nearly) get the memorised number (4 of 6 here), the
    # unseen row 4 does not
    assert sum(correct) >= 3 and not correct[4], completions
