"""torch.compile sees through LoRA-FA: no graph breaks in train mode, compiled steps equal eager ones."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from conftest import VOCAB, Tuner, quiet_trainer, tiny_llama, tiny_roberta
from torch.utils.data import DataLoader, TensorDataset

from lightning_lorafa import LoraFA
from lightning_lorafa.adapters.find import lorafa_layers
from lightning_lorafa.model.attention import RECOMPUTED_DROPOUT_SDPA


def _llama_with_dropout() -> torch.nn.Module:
    model = tiny_llama()
    model.config.attention_dropout = 0.1
    for module in model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.1
    return model


def converted_by_the_callback(build, tmp_path) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A tiny model converted and trained one step by ``Trainer(callbacks=[LoraFA(dropout=0.1)])``."""
    model = build().train()
    ids = torch.randint(3, VOCAB, (4, 12), generator=torch.Generator().manual_seed(0))
    labels = ids if model.config.model_type == "llama" else ids[:, 0] % 2
    trainer = quiet_trainer(tmp_path, max_steps=1, callbacks=[LoraFA(r=4, alpha=8, dropout=0.1)])
    trainer.fit(Tuner(model), DataLoader(TensorDataset(ids, labels), batch_size=2))
    assert lorafa_layers(model) and model.config._attn_implementation == RECOMPUTED_DROPOUT_SDPA
    assert not any(type(m) is torch.nn.Dropout for m in model.modules())  # RoBERTa's are RecomputedDropout now
    return model.train(), ids[:2], labels[:2]


BUILDS = [pytest.param(lambda: tiny_roberta(dropout=0.1), id="roberta"), pytest.param(_llama_with_dropout, id="llama")]


@pytest.mark.parametrize("build", BUILDS)
def test_no_graph_breaks_in_train_mode(build, tmp_path):
    model, ids, labels = converted_by_the_callback(build, tmp_path)
    explanation = torch._dynamo.explain(lambda i, y: model(input_ids=i, labels=y).loss)(ids, labels)
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    assert explanation.graph_count == 1


@pytest.mark.parametrize("build", BUILDS)
def test_compiled_step_equals_eager(build, tmp_path):
    """Dynamo and AOTAutograd trace the seed draws in eager order, so even dropout masks agree exactly."""
    model, ids, labels = converted_by_the_callback(build, tmp_path)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    model.eval()
    torch.testing.assert_close(compiled(input_ids=ids, labels=labels).loss, model(input_ids=ids, labels=labels).loss)
    model.train()
    grads = []
    for run in (compiled, model):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        loss = run(input_ids=ids, labels=labels).loss
        loss.backward()
        grads.append((loss.detach(), [layer.lora_B.grad.clone() for layer in lorafa_layers(model).values()]))
    (loss, grad), (eager_loss, eager_grad) = grads
    # the same dropout masks; AOTAutograd decomposes the chunked loss's logsumexp, which may round one ulp apart
    torch.testing.assert_close(loss, eager_loss, rtol=5e-7, atol=0)
    assert len(grad) == len(eager_grad) > 0
    for g, e in zip(grad, eager_grad, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in grad)


def test_inductor_compiled_model_matches_eval_and_trains(tmp_path):
    model, ids, labels = converted_by_the_callback(lambda: tiny_roberta(dropout=0.1), tmp_path)
    compiled = torch.compile(model)
    model.eval()
    torch.testing.assert_close(compiled(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    model.train()
    layer = next(iter(lorafa_layers(model).values()))
    before = layer.lora_B.detach().clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = compiled(input_ids=ids, labels=labels).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and not torch.equal(layer.lora_B, before)


class CompiledClassifier(pl.LightningModule):
    """A user's module that compiles its model in ``__init__``: ``self.model = torch.compile(...)``."""

    def __init__(self, model_name_or_path: str | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        base = tiny_roberta(dropout=0.1) if model_name_or_path is None else _from_pretrained(model_name_or_path)
        self.model = torch.compile(base.train(), backend="aot_eager")

    def training_step(self, batch, batch_idx):
        input_ids, labels = batch
        return self.model(input_ids=input_ids, labels=labels).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def _from_pretrained(path: str) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(path)


def test_a_compiled_model_exports_saves_loads_and_merges_like_the_plain_one(tmp_path):
    """Every function that takes the model gives on ``torch.compile(model)`` what it gives on the model itself: no
    ``_orig_mod.`` in names, the head in the adapter, and no dynamo warning from the library's code."""
    import json
    import warnings

    from safetensors.torch import load_file

    from lightning_lorafa import export_peft, load_adapter, load_from_checkpoint, merge_lorafa, save_adapter
    from lightning_lorafa.model.merge import merged_state_dict

    tiny_roberta().save_pretrained(tmp_path / "base")
    module = CompiledClassifier(str(tmp_path / "base"))
    ids = torch.randint(3, VOCAB, (8, 12), generator=torch.Generator().manual_seed(0))
    trainer = quiet_trainer(tmp_path, max_steps=2, callbacks=[LoraFA(r=4, alpha=8)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, DataLoader(TensorDataset(ids, ids[:, 0] % 2), batch_size=4))
    ours = [str(w.message) for w in caught if "lightning_lorafa" in w.filename or "lru_cache" in str(w.message)]
    assert ours == []
    compiled, plain = module.model, module.model._orig_mod
    assert plain.lorafa_config.modules_to_save == ["classifier"] and "_orig_mod" not in str(plain.lorafa_config)
    plain.eval()
    with torch.no_grad():
        expected = plain(input_ids=ids).logits

    export_peft(compiled, tmp_path / "peft-compiled")
    export_peft(plain, tmp_path / "peft-plain")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        a, b = tmp_path / "peft-compiled" / name, tmp_path / "peft-plain" / name
        if name.endswith(".json"):
            assert json.loads(a.read_text()) == json.loads(b.read_text())
        else:
            got, want = load_file(a), load_file(b)
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    save_adapter(compiled, tmp_path / "adapter")
    reloaded = load_adapter(torch.compile(_from_pretrained(str(tmp_path / "base")), backend="aot_eager"),
                            tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(reloaded._orig_mod.eval()(input_ids=ids).logits, expected)
    assert merged_state_dict(compiled).keys() == merged_state_dict(plain).keys()

    trainer.save_checkpoint(tmp_path / "run.ckpt")
    state = torch.load(tmp_path / "run.ckpt", weights_only=True)["state_dict"]
    assert "model._orig_mod.classifier.out_proj.weight" in state  # the head travels with the adapter
    restored = load_from_checkpoint(CompiledClassifier, tmp_path / "run.ckpt")
    with torch.no_grad():
        assert torch.equal(restored.model._orig_mod.eval()(input_ids=ids).logits, expected)

    from lightning_lorafa.tasks.export import build_trained_model

    config = {
        "model": {"class_path": "test_compile.CompiledClassifier",
                  "init_args": {"model_name_or_path": str(tmp_path / "base")}},
        "trainer": {"callbacks": [{"class_path": "lightning_lorafa.LoraFA", "init_args": {"r": 4, "alpha": 8}}]},
    }
    exported, _ = build_trained_model(config, tmp_path / "run.ckpt")  # what `lorafa export` loads
    with torch.no_grad():
        assert torch.equal(exported(input_ids=ids).logits, expected)

    assert merge_lorafa(compiled) is compiled and not lorafa_layers(compiled)
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
