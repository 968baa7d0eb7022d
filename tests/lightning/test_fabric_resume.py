"""Lightning Fabric: ``fabric.save`` / ``fabric.load`` with ``TrainingState(model)`` resume LoRA-FA training exactly
(the adapter, the optimizer and the RNG state that draws the dropout seeds), as the ``LoraFA`` callback does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import VOCAB, tiny_roberta
from lightning.fabric import Fabric

from lightning_lorafa import TrainingState, attach_gradient_correction, prepare_model

STEPS, SAVE_AT = 6, 3


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(3, VOCAB, (STEPS, 4, 10), generator=generator)
    return [(x[i], x[i, :, 0] % 2) for i in range(STEPS)]


def setup(fabric: Fabric, seed: int):
    torch.manual_seed(seed)  # the RNG state a fresh process starts with
    model = tiny_roberta(dropout=0.1).train()
    prepare_model(model, r=4, alpha=8, dropout=0.1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    attach_gradient_correction(optimizer, model)
    model, optimizer = fabric.setup(model, optimizer)
    return model, optimizer


def train(fabric: Fabric, model, optimizer, steps: range) -> None:
    data = batches()
    for step in steps:
        input_ids, labels = data[step]
        fabric.backward(model(input_ids=input_ids, labels=labels).loss)
        optimizer.step()
        optimizer.zero_grad()


def trained(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("with_rng", [True, False])
def test_save_at_step_k_and_resume_equals_the_uninterrupted_run(tmp_path: Path, with_rng: bool):
    fabric = Fabric(accelerator="cpu", devices=1)
    model, optimizer = setup(fabric, seed=0)
    train(fabric, model, optimizer, range(STEPS))
    straight = trained(model)

    model, optimizer = setup(fabric, seed=0)
    train(fabric, model, optimizer, range(SAVE_AT))
    state = {"lorafa": TrainingState(model), "optimizer": optimizer, "step": SAVE_AT}
    fabric.save(tmp_path / "run.ckpt", state)
    saved = torch.load(tmp_path / "run.ckpt", weights_only=True)
    adapter = saved["lorafa"]["adapter"]
    assert all(key.endswith(("lora_A", "lora_B")) or key.startswith("classifier.") for key in adapter)
    if not with_rng:  # what a checkpoint without the RNG state resumes from
        del saved["lorafa"]["rng"]
        torch.save(saved, tmp_path / "run.ckpt")

    model, optimizer = setup(fabric, seed=1)  # another process: other RNG state, adapter as freshly drawn
    state = {"lorafa": TrainingState(model), "optimizer": optimizer, "step": 0}
    fabric.load(tmp_path / "run.ckpt", state)
    assert state["step"] == SAVE_AT
    train(fabric, model, optimizer, range(state["step"], STEPS))
    resumed = trained(model)
    assert resumed.keys() == straight.keys() and any(name.endswith("lora_B") for name in resumed)
    same = all(torch.equal(resumed[name], straight[name]) for name in straight)
    assert same == with_rng  # exact with the RNG state; the dropout masks differ without it


def test_a_state_from_other_settings_is_refused(tmp_path: Path):
    fabric = Fabric(accelerator="cpu", devices=1)
    model, optimizer = setup(fabric, seed=0)
    fabric.save(tmp_path / "run.ckpt", {"lorafa": TrainingState(model)})
    other = tiny_roberta()
    prepare_model(other, r=2, alpha=8)
    with pytest.raises(ValueError, match=r"trained with r=4, alpha=8, use_rslora=False; the model is converted with "
                       r"r=2, alpha=8"):
        fabric.load(tmp_path / "run.ckpt", {"lorafa": TrainingState(other)})
