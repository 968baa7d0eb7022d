"""The compatibility matrix: every listed architecture, as a tiny random model, through conversion, training,
export, merge and the ``LoraFA`` callback (``docs/models.md`` is the table of these results)."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import falcon_calls_the_attention_interface, quiet_trainer, randomize_lora_B
from torch.utils.data import DataLoader

from lightning_lorafa import LoraFA, apply_lorafa, export_peft, merge_lorafa
from lightning_lorafa.adapters.experts import is_fused_experts
from lightning_lorafa.adapters.find import lorafa_experts, lorafa_layers

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import models_table  # noqa: E402
from models_table import ARCHS, build, logits_of  # noqa: E402

NAMES = list(ARCHS)
#: What PEFT LoRA's all-linear adapts and ours does not, by last name component, beyond heads and narrow gates: no
#: weight, but PEFT's nested ParamWrapper for a second expert parameter is "experts.base_layer" (ours: one module).
KNOWN_GAPS = {"Mixtral": {"base_layer"}, "Qwen3-MoE": {"base_layer"}}
MOE = {"Mixtral", "Qwen2-MoE", "Qwen3-MoE"}
HEADS = {"head", "dense", "out_proj", "classifier", "pre_classifier"}  # heads (and their layers) PEFT adapts


def converted(name: str, dropout: float = 0.1) -> torch.nn.Module:
    model = build(name, dropout)
    apply_lorafa(model, r=4, alpha=8, dropout=dropout, modules_to_save=ARCHS[name].modules_to_save)
    return model


@pytest.mark.parametrize("name", NAMES)
def test_adapts_what_peft_lora_adapts(name):
    ours = set(converted(name).lorafa_config.target_modules)
    peft = set(models_table.peft_targets(name))
    assert ours, name
    # ours adapts the fused experts and routers of every MoE; PEFT's all-linear adapts them on Mixtral and Qwen3-MoE
    assert all(n.endswith((".experts", ".mlp.gate")) for n in ours - peft), ours - peft
    if name in MOE:
        assert {n for n in ours if n.endswith(".experts")} == {f"model.layers.{i}.mlp.experts" for i in range(2)}
        assert {n for n in ours if n.endswith(".gate")} == {f"model.layers.{i}.mlp.gate" for i in range(2)}
    # What PEFT adapts beyond ours is a head the user trains with modules_to_save, or a gate narrower than r.
    left = {n.rsplit(".", 1)[-1] for n in peft - ours}
    assert left <= HEADS | {"shared_expert_gate"} | KNOWN_GAPS.get(name, set()), left


@pytest.mark.parametrize("name", NAMES)
def test_init_equal_only_B_trains_export_and_merge(name, tmp_path):
    from peft import PeftModel

    arch = ARCHS[name]
    reference, model = build(name, 0.1).requires_grad_(False), converted(name)
    if name in MOE:  # our experts route tokens as transformers' eager experts forward does
        reference.set_experts_implementation("eager")
    batch = arch.batch()
    # The reference is frozen like the converted model: CPU SDPA takes another kernel for a mask that needs a
    # gradient (T5's position bias), which rounds differently.
    assert torch.equal(logits_of(name, model(**batch)), logits_of(name, reference(**batch)))

    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    for _ in range(2):
        model(**batch)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(n.endswith("lora_B") or ".lora_" not in n for n, p in model.named_parameters() if p.requires_grad)
    moved = [n for n, layer in lorafa_layers(model).items() if layer.lora_B.abs().sum() > 0]
    assert moved == list(lorafa_layers(model))
    assert all(a.lora_B.abs().sum() > 0 for e in lorafa_experts(model).values() for a in e.adapters.values())

    randomize_lora_B(model)
    model.eval()
    expected = logits_of(name, model(**batch))
    export_peft(model, tmp_path / "peft", task_type=arch.task_type)
    peft_model = PeftModel.from_pretrained(build(name, 0.1), tmp_path / "peft").eval()
    torch.testing.assert_close(logits_of(name, peft_model(**batch)), expected, rtol=1e-5, atol=1e-5)

    merged = merge_lorafa(model)
    torch.testing.assert_close(logits_of(name, merged(**batch)), expected, rtol=1e-5, atol=4e-6)


class Module(pl.LightningModule):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.model = build(name, 0.1).train()

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch)["loss"]
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("name", NAMES)
def test_callback_fits(name, precision, tmp_path):
    fit_and_check(name, precision, tmp_path, "cpu")


#: One of each kind of adapted module and attention path, for the GPU: linears, Conv1D, T5's position bias,
#: softcapped attention, fused experts and routers.
CUDA_NAMES = ["LLaMA", "GPT-2", "T5", "BERT", "Gemma2", "Mixtral", "Qwen3-MoE"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("name", CUDA_NAMES)
def test_callback_fits_on_cuda(name, precision, tmp_path):
    fit_and_check(name, precision, tmp_path, "gpu")


def fit_and_check(name: str, precision: str, tmp_path: Path, accelerator: str) -> None:
    """Two steps of ``Trainer(callbacks=[LoraFA(...)])`` on ``accelerator``: every B (linear, router, expert) moves
    and the loss stays finite."""
    module = Module(name)
    fused = any(is_fused_experts(m) for m in module.model.modules())  # transformers 5's MoE experts (3D parameters)
    assert fused or name not in MOE or accelerator != "cpu"  # here, every MoE model has them
    batch = ARCHS[name].batch()
    loader = DataLoader([batch, batch], batch_size=None)
    trainer = quiet_trainer(
        tmp_path,
        callbacks=[LoraFA(r=4, alpha=8, dropout=0.1, modules_to_save=ARCHS[name].modules_to_save)],
        accelerator=accelerator,
        devices=1,
        max_steps=2,
        precision=precision,
    )
    trainer.fit(module, loader)
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
    layers = lorafa_layers(module.model)
    assert layers and all(layer.lora_B.abs().sum() > 0 for layer in layers.values())
    experts = lorafa_experts(module.model)
    assert fused == bool(experts)
    assert all(a.lora_B.abs().sum() > 0 for e in experts.values() for a in e.adapters.values())


#: Models whose attention is their own code, not on transformers' attention interface (tests/model/test_attention.py
#: checks that Falcon, there from transformers 5.25 on, switches like LLaMA).
OWN_ATTENTION = ["DeBERTa-v2", "BLOOM"] + ([] if falcon_calls_the_attention_interface() else ["Falcon"])


@pytest.mark.parametrize("name", OWN_ATTENTION)
def test_attention_that_cannot_switch_is_kept_with_one_log_line(name, tmp_path, caplog):
    import logging

    with caplog.at_level(logging.INFO):
        test_callback_fits(name, "32-true", tmp_path)
    line = f"LoRA-FA: {type(build(name)).__name__} keeps its own attention: "
    messages = [r.getMessage() for r in caplog.records]
    assert sum(message.startswith(line) for message in messages) == 1, messages
    assert not any(" attention keeps its mask: " in message for message in messages)  # its dropout modules seed


OWN_ATTENTION_KEPT_MASKS = {
    "DeBERTa-v2": {},
    "BLOOM": {"transformer.h.0.self_attention": "BloomAttention", "transformer.h.0.mlp": "BloomMLP"},
    "Falcon": {"transformer.h.0": "FalconDecoderLayer", "transformer.h.0.self_attention": "FalconAttention"},
}


@pytest.mark.parametrize("name", OWN_ATTENTION)
def test_own_attention_keeps_masks_only_where_its_code_drops_inline(name):
    """DeBERTa-v2's and BLOOM's own attention drops probabilities through dropout modules, which keep a seed, so no
    tensor of attention shape (B, H, S, S) is kept by a dropout; Falcon's calls scaled_dot_product_attention with
    dropout_p (its CPU path keeps the mask), and that is named."""
    from lightning_lorafa import prepare_model
    from lightning_lorafa.adapters.dropout import RecomputedDropout
    from lightning_lorafa.profiling import measure_saved_activations

    model = build(name, 0.1).train()
    # the test reads the logits of a training forward with labels: the model's own loss (chunked_loss=False)
    done = prepare_model(model, r=4, alpha=8, dropout=0.1, modules_to_save=[], chunked_loss=False)
    assert list(done.own_attention) == [type(model).__name__]
    kept = {key: why.split(".forward", 1)[0] for key, why in done.kept_masks.items()}
    assert kept == OWN_ATTENTION_KEPT_MASKS[name]
    dropouts = [m for n, m in model.named_modules() if n.endswith(("attention_dropout", "attention.self.dropout"))]
    assert dropouts and all(isinstance(m, RecomputedDropout) for m in dropouts)
    batch = ARCHS[name].batch()
    report = measure_saved_activations(lambda: logits_of(name, model(**batch)).sum(), module=model)
    assert not [t for t in report.tensors if "dropout" in t.op and t.shape[-2:] == (12, 12)]  # sequence 12
    if name == "Falcon":  # its mask is inside what scaled_dot_product_attention keeps, and is named
        why = done.kept_masks["transformer.h.0.self_attention"]
        assert why.startswith("FalconAttention.forward calls scaled_dot_product_attention with dropout_p inline")
        assert any(t.op == "scaled_dot_product_attention" and t.shape == (2, 4, 12, 12) for t in report.tensors)


def test_distilbert_seq_cls_export_is_refused_with_what_to_pass(tmp_path):
    from peft import PeftModel

    model = converted("DistilBERT")
    assert "pre_classifier" in model.lorafa_config.target_modules
    with pytest.raises(ValueError, match=r"'classifier' also matches 'pre_classifier'.*Export with task_type=None"):
        export_peft(model, tmp_path / "seq_cls", task_type="SEQ_CLS")
    randomize_lora_B(model)
    torch.nn.init.normal_(model.classifier.weight)  # the trained head travels as modules_to_save
    batch = ARCHS["DistilBERT"].batch()
    expected = model.eval()(**batch).logits
    export_peft(model, tmp_path / "plain")
    config = __import__("json").loads((tmp_path / "plain" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["model.classifier"]  # PEFT's suffix rule matches only the classifier
    peft_model = PeftModel.from_pretrained(build("DistilBERT", 0.1), tmp_path / "plain").eval()
    torch.testing.assert_close(peft_model(**batch).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "name, classes",
    [
        ("BART", {"BartEncoder", "BartEncoderLayer", "BartDecoder", "BartDecoderLayer"}),
        ("Whisper", {"WhisperEncoder", "WhisperEncoderLayer", "WhisperDecoder", "WhisperDecoderLayer"}),
        ("Falcon", {"FalconDecoderLayer"}),  # through its module's dropout_add helper
        ("BLOOM", {"BloomAttention", "BloomMLP"}),  # dropout_add too
        ("BERT", set()),
        ("T5", set()),
        ("LLaMA", set()),
    ],
)
def test_inline_functional_dropouts_that_keep_their_masks_are_named_with_the_reason(name, classes):
    from lightning_lorafa import prepare_model

    model = build(name, 0.1).train()
    done = prepare_model(model, r=4, alpha=8, dropout=0.1, modules_to_save=[])
    inline = {key: why for key, why in done.kept_masks.items() if "functional.dropout" in why}
    assert {why.split(".forward", 1)[0] for why in inline.values()} == classes
    modules = dict(model.named_modules())
    assert all(type(modules[key]).__name__ in classes for key in inline)
    lines = done.summary(model)
    assert all(any(line.startswith(f"LoRA-FA: {key} keeps its mask: ") for line in lines) for key in inline)
    # a model whose dropouts are all 0 keeps no mask, and none is named
    quiet = prepare_model(build(name, 0.0).train(), r=4, alpha=8, modules_to_save=[])
    assert not [why for why in quiet.kept_masks.values() if "functional.dropout" in why]


def test_no_architecture_of_the_matrix_is_warned_about_unknown_fused_experts():
    """The warning for 3D parameters that look like fused experts stays quiet on convolutions (Whisper), position
    embeddings and class tokens (ViT, CLIP) and the experts it adapts."""
    import warnings

    for name in NAMES:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            converted(name)
        assert not [w for w in caught if "fused MoE experts" in str(w.message)], name
