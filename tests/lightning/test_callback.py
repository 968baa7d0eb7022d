import logging
import types

import lightning.pytorch as pl
import pytest
import torch
from conftest import classification_batches, tiny_roberta

from lightning_lorafa import LoraFA, LoraFAOptimizer, apply_lorafa, convert_before_sharding
from lightning_lorafa.adapters.find import lorafa_layers
from lightning_lorafa.lightning.checkpoints import ADAPTER_ONLY_MARKER


class Classifier(pl.LightningModule):
    def __init__(self, lazy: bool = False, optimizer: str = "adamw", lr: float = 1e-3) -> None:
        super().__init__()
        self.lazy, self.optimizer_kind, self.lr = lazy, optimizer, lr
        self.model = None if lazy else tiny_roberta(dropout=0.1).train()

    def training_step(self, batch, batch_idx):
        input_ids, labels = batch
        loss = self.model(input_ids=input_ids, labels=labels).loss
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        if self.optimizer_kind == "none":
            return None
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)
        if self.optimizer_kind == "adamw":
            return optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class LazyClassifier(Classifier):
    def __init__(self) -> None:
        super().__init__(lazy=True)

    def configure_model(self) -> None:
        if self.model is None:
            self.model = tiny_roberta(dropout=0.1).train()


def data(n=16):
    return classification_batches(rows=n)


def trainer(tmp_path, callback, max_steps=3, **kwargs):
    defaults = {
        "max_steps": max_steps,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": tmp_path,
    }
    return pl.Trainer(callbacks=[callback], **(defaults | kwargs))


def lorafa(**kwargs):
    return LoraFA(**({"r": 4, "alpha": 8, "dropout": 0.1, "modules_to_save": ["classifier"]} | kwargs))


def test_fit_trains_only_B_and_head(tmp_path):
    module = Classifier()
    base_weights = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer(tmp_path, lorafa(), enable_checkpointing=False).fit(module, data())
    layers = lorafa_layers(module.model)
    assert len(layers) == 12
    for name, layer in layers.items():
        assert torch.equal(layer.base.weight, base_weights[f"{name}.weight"]), name
        assert layer.lora_B.abs().sum() > 0
    fresh = tiny_roberta()
    apply_lorafa(fresh, r=4, alpha=8, modules_to_save=["classifier"])
    for name, layer in layers.items():  # A is exactly its seeded initial value
        assert torch.equal(layer.lora_A, lorafa_layers(fresh)[name].lora_A)
    assert torch.equal(
        module.model.roberta.embeddings.word_embeddings.weight, fresh.roberta.embeddings.word_embeddings.weight
    )
    assert not torch.equal(module.model.classifier.out_proj.weight, fresh.classifier.out_proj.weight)


def test_user_optimizer_keeps_its_class_and_settings_and_loses_frozen_parameters(tmp_path, caplog):
    module = Classifier(lr=3e-3)
    fit = trainer(tmp_path, lorafa(), max_steps=1, enable_checkpointing=False)
    with caplog.at_level(logging.INFO):
        fit.fit(module, data())
    (optimizer,) = fit.optimizers
    assert type(optimizer) is torch.optim.AdamW
    assert optimizer.param_groups[0]["lr"] == 3e-3 and optimizer.param_groups[0]["weight_decay"] == 0.01
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    assert {id(p) for p in optimizer.param_groups[0]["params"]} == trainable and len(trainable) == 16
    text = caplog.text
    frozen = sum(1 for p in module.parameters() if not p.requires_grad)
    assert f"LoRA-FA: {frozen} frozen parameters left out of AdamW's param groups." in text
    assert "AdamW keeps its settings and LR schedule; B's gradient is corrected before each of its steps" in text
    b_params = sum(layer.lora_B.numel() for layer in lorafa_layers(module.model).values())
    assert f"B = r * sum(d_out) = {b_params:,}" in text
    assert b_params == 2 * 4 * (4 * 32 + 64 + 32)


def test_sgd_with_momentum_stays_sgd_with_momentum(tmp_path):
    module = Classifier(optimizer="none")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9, nesterov=True)

    module.configure_optimizers = types.MethodType(configure_optimizers, module)  # as LightningCLI binds it
    fit = trainer(tmp_path, lorafa(), max_steps=2, enable_checkpointing=False)
    fit.fit(module, data())
    (optimizer,) = fit.optimizers
    assert type(optimizer) is torch.optim.SGD
    group = optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"]) == (0.5, 0.9, True)
    assert all(p.requires_grad for p in group["params"])
    assert all("momentum_buffer" in optimizer.state[p] for p in group["params"])


def test_optimizer_supplied_when_configure_optimizers_returns_none(tmp_path):
    module = Classifier(optimizer="none")
    fit = trainer(tmp_path, lorafa(lr=5e-3), max_steps=1, enable_checkpointing=False)
    fit.fit(module, data())
    assert isinstance(fit.optimizers[0], LoraFAOptimizer) and fit.optimizers[0].param_groups[0]["lr"] == 5e-3
    assert all(layer.lora_B.abs().sum() > 0 for layer in lorafa_layers(module.model).values())


def test_lr_with_an_optimizer_of_the_users_is_named_as_unused(tmp_path):
    with pytest.warns(UserWarning, match=r"LoraFA\(lr=0.5\) applies only when configure_optimizers returns None"):
        trainer(tmp_path, lorafa(lr=0.5), max_steps=1, enable_checkpointing=False).fit(Classifier(), data())


def test_an_optimizer_without_trainable_parameters_is_refused(tmp_path):
    module = Classifier(optimizer="none")

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.roberta.embeddings.parameters(), lr=1e-3)

    module.configure_optimizers = types.MethodType(configure_optimizers, module)
    with pytest.raises(ValueError, match="holds none of the LoRA-FA trainable parameters"):
        trainer(tmp_path, lorafa(), max_steps=1, enable_checkpointing=False).fit(module, data())


def test_trainable_tensors_in_no_optimizer_are_named(tmp_path):
    module = Classifier(optimizer="none")

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.roberta.parameters(), lr=1e-3)  # not the classifier

    module.configure_optimizers = types.MethodType(configure_optimizers, module)
    with pytest.warns(UserWarning, match=r"4 trainable tensors are in no optimizer .* model.classifier.dense.bias"):
        trainer(tmp_path, lorafa(), max_steps=1, enable_checkpointing=False).fit(module, data())


def test_model_built_in_configure_model_is_converted_by_one_call(tmp_path):
    class Converting(LazyClassifier):
        def configure_model(self) -> None:
            super().configure_model()
            convert_before_sharding(self)

    module = Converting()
    trainer(tmp_path, lorafa(), max_steps=1, enable_checkpointing=False).fit(module, data())
    assert len(lorafa_layers(module.model)) == 12
    with pytest.raises(RuntimeError, match=r"builds its model in configure_model.*convert_before_sharding\(self\)"):
        trainer(tmp_path, lorafa(), max_steps=1, enable_checkpointing=False).fit(LazyClassifier(), data())


def test_checkpoint_holds_only_the_adapter_and_resume_is_exact(tmp_path):
    torch.manual_seed(0)
    straight = Classifier(optimizer="scheduled")
    trainer(tmp_path / "a", lorafa(), max_steps=-1, max_epochs=2, enable_checkpointing=False).fit(straight, data())

    torch.manual_seed(0)
    first = Classifier(optimizer="scheduled")
    fit = trainer(tmp_path / "b", lorafa(), max_steps=-1, max_epochs=1)  # one epoch of 4 batches
    fit.fit(first, data())
    path = fit.checkpoint_callback.best_model_path  # written by ModelCheckpoint at the epoch's end
    checkpoint = torch.load(path, weights_only=False)
    state = checkpoint["state_dict"]
    assert next(iter(state)) == ADAPTER_ONLY_MARKER  # what MyModule.load_from_checkpoint's error names
    assert all(k.endswith((".lora_A", ".lora_B")) or k.startswith("model.classifier.") for k in list(state)[1:])
    assert len([k for k in state if k.endswith(".lora_B")]) == 12
    assert checkpoint["optimizer_states"][0]["state"]  # AdamW moments of B and the head are kept

    torch.manual_seed(1)  # another RNG state: the callback restores the one that draws dropout masks
    resumed = Classifier(optimizer="scheduled")
    resume = trainer(tmp_path / "b", lorafa(), max_steps=-1, max_epochs=2)
    resume.fit(resumed, data(), ckpt_path=path)
    assert resume.lr_scheduler_configs[0].scheduler.last_epoch == 8
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    for p, q in zip(first.parameters(), resumed.parameters(), strict=True):  # it did train further
        if p.requires_grad:
            assert not torch.equal(p, q)


def test_resume_with_other_rank_is_rejected(tmp_path):
    fit = trainer(tmp_path, lorafa(), max_steps=1)
    fit.fit(Classifier(), data())
    fit.save_checkpoint(tmp_path / "r4.ckpt")
    with pytest.raises(ValueError, match=r"saved with LoRA rank r=4, but the model has r=2.*LoraFA\(r=4\)"):
        trainer(tmp_path, lorafa(r=2), max_steps=2).fit(Classifier(), data(), ckpt_path=tmp_path / "r4.ckpt")


def test_full_checkpoints_when_asked(tmp_path):
    fit = trainer(tmp_path, lorafa(adapter_only_checkpoints=False), max_steps=1)
    module = Classifier()
    fit.fit(module, data())
    fit.save_checkpoint(tmp_path / "full.ckpt")
    state = torch.load(tmp_path / "full.ckpt", weights_only=False)["state_dict"]
    assert state.keys() == module.state_dict().keys()


def test_missing_model_attr_is_explained(tmp_path):
    with pytest.raises(ValueError, match="has no nn.Module attribute 'backbone'"):
        trainer(tmp_path, lorafa(model_attr="backbone"), max_steps=1).fit(Classifier(), data())


def test_dropout_attention_and_memory_report_options(tmp_path, caplog):
    module = Classifier()
    fit = trainer(tmp_path, lorafa(report_memory=True), max_steps=3, enable_checkpointing=False)
    with caplog.at_level(logging.INFO):
        fit.fit(module, data())
    assert not any(type(m) is torch.nn.Dropout for m in module.modules())
    assert module.model.config._attn_implementation == "sdpa_recomputed_dropout"
    assert "attention implementation sdpa (asked for 'auto')" in caplog.text
    assert "saved for backward in the first training step" in caplog.text
    assert "2 timed steps" in caplog.text and "tokens/s" in caplog.text


def test_options_off_leave_the_model_alone(tmp_path):
    module = Classifier()
    module.model.set_attn_implementation("eager")
    trainer(tmp_path, lorafa(recompute_dropout=False, attn_implementation=None), enable_checkpointing=False).fit(
        module, data()
    )
    assert any(type(m) is torch.nn.Dropout for m in module.modules())
    assert module.model.config._attn_implementation == "eager"
