"""The user's optimizer, LR schedule and gradient clipping survive the callback; B's correction runs after clipping."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import VOCAB, quiet_trainer, tiny_roberta
from torch import nn
from torch.optim import lr_scheduler
from torch.utils.data import DataLoader, TensorDataset
from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

from lightning_lorafa import LoraFA, LoraFAOptimizer, apply_lorafa, create_lorafa_optimizer, load_from_checkpoint
from lightning_lorafa.adapters.correction import GradientCorrection
from lightning_lorafa.adapters.find import lorafa_layers
from lightning_lorafa.model.optim import lora_layers_by_parameter

STEPS = 6


def data(n=24, batch_size=4):
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(3, VOCAB, (n, 8), generator=generator)
    return DataLoader(TensorDataset(x, (x[:, 0] % 2)), batch_size=batch_size)


SCHEDULERS = {
    "LambdaLR": lambda opt: lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step)),
    "MultiplicativeLR": lambda opt: lr_scheduler.MultiplicativeLR(opt, lambda step: 0.9),
    "StepLR": lambda opt: lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
    "MultiStepLR": lambda opt: lr_scheduler.MultiStepLR(opt, milestones=[1, 3], gamma=0.3),
    "ConstantLR": lambda opt: lr_scheduler.ConstantLR(opt, factor=0.5, total_iters=3),
    "LinearLR": lambda opt: lr_scheduler.LinearLR(opt, start_factor=0.2, total_iters=4),
    "ExponentialLR": lambda opt: lr_scheduler.ExponentialLR(opt, gamma=0.8),
    "PolynomialLR": lambda opt: lr_scheduler.PolynomialLR(opt, total_iters=5, power=2.0),
    "CosineAnnealingLR": lambda opt: lr_scheduler.CosineAnnealingLR(opt, T_max=4),
    "CosineAnnealingWarmRestarts": lambda opt: lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=2),
    "CyclicLR": lambda opt: lr_scheduler.CyclicLR(opt, base_lr=1e-4, max_lr=1e-2, step_size_up=2, cycle_momentum=False),
    "OneCycleLR": lambda opt: lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=STEPS + 1),
    "SequentialLR": lambda opt: lr_scheduler.SequentialLR(
        opt, [lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=2), lr_scheduler.ConstantLR(opt, factor=0.5)],
        milestones=[2],
    ),
    "ChainedScheduler": lambda opt: lr_scheduler.ChainedScheduler(
        [lr_scheduler.ConstantLR(opt, factor=0.5, total_iters=2), lr_scheduler.ExponentialLR(opt, gamma=0.9)]
    ),
    "ReduceLROnPlateau": lambda opt: lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5),
    "transformers_linear_warmup": lambda opt: get_linear_schedule_with_warmup(opt, 2, STEPS),
    "transformers_cosine_warmup": lambda opt: get_cosine_schedule_with_warmup(opt, 2, STEPS),
}


class Scheduled(pl.LightningModule):
    """A classifier whose optimizer and LR schedule are the user's; it records the rate of every step."""

    def __init__(self, scheduler: str = "LambdaLR", lr: float = 1e-3, optimizer: str = "adamw", eps: float = 1e-6):
        super().__init__()
        self.save_hyperparameters()
        self.model = tiny_roberta(dropout=0.1).train()
        self.rates: list[list[float]] = []
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        input_ids, labels = batch
        loss = self.model(input_ids=input_ids, labels=labels).loss
        self.log("flat", 1.0)  # never improves: ReduceLROnPlateau's steps do not depend on the loss
        self.losses.append(loss.item())
        return loss

    def on_train_batch_start(self, batch, batch_idx):
        self.rates.append([group["lr"] for group in self.trainer.optimizers[0].param_groups])

    def configure_optimizers(self):
        hp = self.hparams
        if hp.optimizer == "lorafa":
            return create_lorafa_optimizer(self.model, lr=hp.lr, eps=hp.eps)
        optimizer = {
            "adamw": lambda: torch.optim.AdamW(self.parameters(), lr=hp.lr, eps=hp.eps, weight_decay=0.0),
            "adam": lambda: torch.optim.Adam(self.parameters(), lr=hp.lr),
            "sgd": lambda: torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=0.9),
            "custom": lambda: SignSGD(self.parameters(), lr=hp.lr, scale=0.5),
        }[hp.optimizer]()
        if hp.scheduler == "none":
            return optimizer
        config = {"scheduler": SCHEDULERS[hp.scheduler](optimizer), "interval": "step"}
        if hp.scheduler == "ReduceLROnPlateau":
            config["monitor"] = "flat"
        return {"optimizer": optimizer, "lr_scheduler": config}


class SignSGD(torch.optim.Optimizer):
    """A user-defined optimizer: ``p -= lr * scale * sign(grad)``."""

    def __init__(self, params, lr: float, scale: float) -> None:
        super().__init__(params, {"lr": lr, "scale": scale})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"] * group["scale"])
        return loss


def fit(tmp_path, module, callbacks=(), steps=STEPS, **kwargs):
    trainer = quiet_trainer(tmp_path, max_steps=steps, callbacks=list(callbacks), **kwargs)
    trainer.fit(module, data())
    return trainer


def lorafa(**kwargs):
    return LoraFA(**({"r": 4, "alpha": 8, "dropout": 0.1} | kwargs))


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_every_lr_schedule_gives_the_same_rates_with_and_without_the_callback(tmp_path, scheduler):
    plain = Scheduled(scheduler)
    fit(tmp_path / "plain", plain)
    ours = Scheduled(scheduler)
    trainer = fit(tmp_path / "ours", ours, [lorafa()])
    assert ours.rates == plain.rates and len(ours.rates) == STEPS
    assert len({rate[0] for rate in ours.rates}) > 1, "the schedule must change the rate"
    config = trainer.lr_scheduler_configs[0]
    assert config.scheduler.optimizer is trainer.optimizers[0]


def test_sequential_lr_steps_as_its_user_wrote_it(tmp_path):
    """AdamW(lr=1.0), LinearLR(0.1, 2 steps) then ConstantLR(0.5): 0.1, 0.55, 0.5, 0.5 with the callback too."""
    module = Scheduled("SequentialLR", lr=1.0)
    fit(tmp_path, module, [lorafa()], steps=4)
    assert [rate[0] for rate in module.rates] == pytest.approx([0.1, 0.55, 0.5, 0.5])


@pytest.mark.parametrize("optimizer, kind", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam), ("custom", SignSGD)])
def test_optimizers_keep_their_class_and_settings(tmp_path, optimizer, kind):
    module = Scheduled("none", lr=1e-2, optimizer=optimizer)
    trainer = fit(tmp_path, module, [lorafa()], steps=2)
    (used,) = trainer.optimizers
    assert type(used) is kind and used.param_groups[0]["lr"] == 1e-2
    assert used.defaults == kind(nn.Linear(1, 1).parameters(), **_settings(optimizer)).defaults
    assert all(layer.lora_B.abs().sum() > 0 for layer in lorafa_layers(module.model).values())


def _settings(optimizer: str) -> dict:
    return {"sgd": {"lr": 1e-2, "momentum": 0.9}, "adam": {"lr": 1e-2}, "custom": {"lr": 1e-2, "scale": 0.5}}[optimizer]


def test_users_adamw_trains_like_lorafa_optimizer(tmp_path):
    """Torch's AdamW and the transformers-style LoraFAOptimizer differ only in where eps enters; with eps
    negligible (1e-20), the same corrected gradients give the same losses and B."""
    torch.manual_seed(0)
    users = Scheduled("none", lr=2e-3, eps=1e-20)
    fit(tmp_path / "a", users, [lorafa()])
    torch.manual_seed(0)
    reference = Scheduled("none", lr=2e-3, optimizer="lorafa", eps=1e-20)
    trainer = fit(tmp_path / "b", reference, [lorafa()])
    assert isinstance(trainer.optimizers[0], LoraFAOptimizer)
    assert users.losses == pytest.approx(reference.losses, rel=1e-5)
    for (name, ours), theirs in zip(users.named_parameters(), reference.parameters(), strict=True):
        if ours.requires_grad:
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6, msg=name)


class Mlp(pl.LightningModule):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def test_gradient_clipping_sees_the_raw_gradient_and_the_correction_follows(tmp_path):
    """Lightning clips the raw gradients (as PEFT does), then B's gradient is corrected, then AdamW steps."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)

    def reference(clip_first: bool) -> list[torch.Tensor]:
        model = copy.deepcopy(base)
        apply_lorafa(model, r=2, alpha=4, modules_to_save=[])
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        correction = GradientCorrection(lora_layers_by_parameter(model))
        for xb, yb in loader:
            optimizer.zero_grad()
            nn.functional.mse_loss(model(xb), yb).backward()
            if not clip_first:
                correction.correct(params)
            torch.nn.utils.clip_grad_norm_(params, 0.01)
            if clip_first:
                correction.correct(params)
            optimizer.step()
        return [layer.lora_B.detach() for layer in lorafa_layers(model).values()]

    module = Mlp(copy.deepcopy(base))
    trainer = quiet_trainer(
        tmp_path,
        max_epochs=1,
        gradient_clip_val=0.01,
        callbacks=[LoraFA(r=2, alpha=4, modules_to_save=[], attn_implementation=None)],
    )
    trainer.fit(module, loader)
    ours = [layer.lora_B.detach() for layer in lorafa_layers(module.model).values()]
    for got, want in zip(ours, reference(clip_first=True), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert not all(torch.allclose(got, want) for got, want in zip(ours, reference(clip_first=False), strict=True))


def test_correction_without_a_closure_runs_before_the_step():
    """Plain PyTorch: ``optimizer.step()`` without a closure corrects right before stepping."""
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 3))
    apply_lorafa(model, r=2, alpha=4)
    sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    GradientCorrection(lora_layers_by_parameter(model)).attach(sgd)
    model(torch.randn(4, 6)).sum().backward()
    layer = lorafa_layers(model)["0"]
    grad = layer.lora_B.grad.clone()
    expected = -(grad @ torch.linalg.inv(layer.lora_A @ layer.lora_A.t() + 1e-8 * torch.eye(2)) / layer.scaling**2)
    sgd.step()
    torch.testing.assert_close(layer.lora_B.detach(), expected, rtol=1e-4, atol=1e-6)


def test_a_second_lorafa_with_other_settings_is_refused_and_the_same_settings_continue(tmp_path):
    module = Scheduled("none")
    fit(tmp_path, module, [lorafa()], steps=1)
    with pytest.raises(ValueError, match=r"already converted to LoRA-FA with other settings \(r: converted with 4, "
                       r"asked for 16, alpha: converted with 8.0, asked for 32.0.*load a fresh model"):
        fit(tmp_path, module, [LoraFA(r=16, alpha=32, dropout=0.1)], steps=1)
    trained = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    fit(tmp_path, module, [lorafa()], steps=1)  # the same settings: the adapter trains on
    assert any(not torch.equal(p, trained[n]) for n, p in module.named_parameters() if n in trained)


LEGACY = Path(__file__).parents[1] / "data" / "lorafa-0.1-roberta-tiny.ckpt"  # tests/data/make_lorafa_0_1_checkpoint.py


def test_checkpoint_of_the_0_1_callback_is_refused_with_how_to_resume_and_resumes_that_way(tmp_path):
    """lightning-lorafa 0.1 replaced the user's optimizer by a LoraFAOptimizer; its checkpoints resume with one."""

    def resume(module: Scheduled) -> None:
        pl.Trainer(
            max_steps=3, logger=False, enable_progress_bar=False, enable_checkpointing=False,
            callbacks=[lorafa(modules_to_save=["classifier"])], default_root_dir=tmp_path,
        ).fit(module, data(), ckpt_path=LEGACY)

    with pytest.raises(ValueError, match=r"written by lightning-lorafa 0.1.*create_lorafa_optimizer\(self.model"):
        resume(Scheduled("none"))
    resumed = Scheduled("none", optimizer="lorafa")
    resume(resumed)
    assert len(resumed.losses) == 1 and math.isfinite(resumed.losses[0])  # steps 3 of 3


def test_load_from_checkpoint_restores_a_0_1_checkpoint_exactly():
    trained = torch.load(LEGACY.with_name("lorafa-0.1-roberta-tiny-trained.pt"), weights_only=True)
    restored = load_from_checkpoint(Scheduled, LEGACY)  # settings from the 0.1 callback state
    state = dict(restored.named_parameters())
    assert {n for n, p in state.items() if p.requires_grad} == set(trained)
    for name, tensor in trained.items():
        torch.testing.assert_close(state[name].detach(), tensor, rtol=0, atol=0, msg=name)
