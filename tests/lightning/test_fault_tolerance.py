"""A run killed (SIGKILL) mid-epoch while writing a checkpoint resumes from its last complete checkpoint, exactly.

Runs tests/workers/fault_tolerance_worker.py three times as separate processes (about 8 s each): straight through,
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
from lightning_lorafa.tasks.common import stateful_loader

WORKER = Path(__file__).parents[1] / "workers" / "fault_tolerance_worker.py"


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

    assert last["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["_num_yielded"] == 4  # the data position

    resumed = run("resume", tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result, full = load(tmp_path / "resume.pt"), load(tmp_path / "straight.pt")
    assert result["global_step"] == 8
    # The StatefulDataLoader continues the interrupted epoch: steps 4-7 see its batches 4-7 (shuffled, as before the
    # kill), and with the dropout RNG restored too the run ends exactly where the uninterrupted one did.
    assert [(step, idx) for step, idx, _ in full["seen"]] == [(i, i) for i in range(8)]
    assert result["seen"] == full["seen"][4:]
    assert result["B"].keys() == full["B"].keys() and len(full["B"]) == 12
    assert all(torch.equal(result["B"][key], full["B"][key]) for key in full["B"])
    assert not any(torch.equal(last["state_dict"][key], full["B"][key]) for key in full["B"])  # steps 5-8 trained


def test_task_loader_continues_mid_epoch_and_leaves_the_global_rng_alone():
    dataset = list(range(10))
    loader = stateful_loader(dataset, batch_size=2, shuffle=True, seed=3)
    batches = iter(loader)
    first = [next(batches).tolist() for _ in range(2)]
    state = loader.state_dict()
    rest = [batch.tolist() for batch in batches]
    assert sorted(sum(first + rest, [])) == dataset and sum(first + rest, []) != dataset  # one shuffled epoch

    rng = torch.get_rng_state()
    again = stateful_loader(dataset, batch_size=2, shuffle=True, seed=3)
    again.load_state_dict(state)
    assert [batch.tolist() for batch in again] == rest
    assert torch.equal(torch.get_rng_state(), rng)  # the dropout masks drawn after a resume stay the same
    assert [batch.tolist() for batch in again] != first + rest  # the next epoch is shuffled anew


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
