"""A run killed (SIGKILL) mid-epoch while writing a checkpoint resumes from its last complete checkpoint.

Runs tests/fault_tolerance_worker.py three times as separate processes (about 8 s each): straight through,
killed at step 6 while writing that checkpoint, and resumed with ``ckpt_path="last"``.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_lorafa import AtomicCheckpointIO

WORKER = Path(__file__).parent / "fault_tolerance_worker.py"


def run(mode: str, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(WORKER), mode, str(out)], capture_output=True, text=True, timeout=300)


def load(path: Path) -> dict:
    return torch.load(path, weights_only=False)


def test_killed_mid_epoch_run_resumes_from_last_complete_checkpoint(tmp_path):
    straight = run("straight", tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = run("kill", tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]

    ckpts = tmp_path / "kill-ckpts"
    names = sorted(p.name for p in ckpts.iterdir())
    assert names[1:] == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "last.ckpt"]
    assert names[0].startswith(".epoch=0-step=6.ckpt.") and names[0].endswith(".tmp")  # the write it died in
    last = load(ckpts / "last.ckpt")
    assert last["global_step"] == 4
    reference = load(tmp_path / "straight-ckpts" / "epoch=0-step=4.ckpt")["state_dict"]
    assert last["state_dict"].keys() == reference.keys()
    assert all(torch.equal(last["state_dict"][k], reference[k]) for k in reference)  # nothing lost before the kill

    resumed = run("resume", tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result, full = load(tmp_path / "resume.pt"), load(tmp_path / "straight.pt")
    assert result["global_step"] == 8
    # Lightning restarts a plain DataLoader at the start of the interrupted epoch while counting on from step 4:
    # steps 4-7 see the epoch's first four batches, so the result is not the uninterrupted run's.
    assert [step for step, _, _ in result["seen"]] == [4, 5, 6, 7]
    assert [ids for _, _, ids in result["seen"]] == [ids for _, _, ids in full["seen"][:4]]
    assert result["B"].keys() == full["B"].keys() and len(full["B"]) == 12


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("crashed while writing")


def test_atomic_checkpoint_io_keeps_the_previous_file_when_writing_fails(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 4, "weights": torch.arange(3.0)}, path)
    with pytest.raises(RuntimeError, match="crashed while writing"):
        io.save_checkpoint({"global_step": 6, "weights": torch.ones(1000), "bad": Unpicklable()}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    saved = io.load_checkpoint(path)
    assert saved["global_step"] == 4 and torch.equal(saved["weights"], torch.arange(3.0))
