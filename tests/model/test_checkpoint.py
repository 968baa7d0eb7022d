import json
import re

import pytest
import torch
from conftest import TwoLayerNet, randomize_lora_B, tiny_llama, tiny_roberta
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from lightning_lorafa import apply_lorafa, export_peft, load_adapter, save_adapter
from lightning_lorafa.adapters.find import lorafa_layers
from lightning_lorafa.model.adapter_state import ADAPTER_FILE, CONFIG_FILE, adapter_state_dict, atomic_write


def trained_roberta(r=4, **kwargs):
    model = tiny_roberta()
    apply_lorafa(model, r=r, alpha=8, dropout=0.1, modules_to_save=["classifier"], **kwargs)
    randomize_lora_B(model)
    with torch.no_grad():
        model.classifier.out_proj.weight.add_(1.0)
    return model


def test_adapter_holds_A_B_and_modules_to_save_only():
    model = trained_roberta()
    keys = set(adapter_state_dict(model))
    assert {k for k in keys if not k.startswith("classifier.")} == {
        f"{name}.lora_{ab}" for name in lorafa_layers(model) for ab in "AB"
    }
    assert {k for k in keys if k.startswith("classifier.")} == {
        "classifier.dense.weight",
        "classifier.dense.bias",
        "classifier.out_proj.weight",
        "classifier.out_proj.bias",
    }


def test_save_and_load_into_a_fresh_base_model(tmp_path, input_ids):
    model = trained_roberta()
    expected = model(input_ids).logits
    save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter.safetensors", "lorafa_config.json"]
    fresh = tiny_roberta()  # not converted: load_adapter converts it with the saved settings
    load_adapter(fresh, tmp_path / "adapter")
    assert fresh.lorafa_config == model.lorafa_config
    torch.testing.assert_close(fresh(input_ids).logits, expected)
    for name, layer in lorafa_layers(fresh).items():
        assert torch.equal(layer.lora_A, lorafa_layers(model)[name].lora_A)


def test_load_into_converted_model_with_other_rank_is_rejected(tmp_path):
    save_adapter(trained_roberta(r=4), tmp_path)
    other = tiny_roberta()
    apply_lorafa(other, r=2, alpha=8, modules_to_save=["classifier"])
    with pytest.raises(ValueError, match=r"saved with LoRA rank r=4, but the model has r=2"):
        load_adapter(other, tmp_path)


def test_load_into_model_with_other_layers_names_the_keys(tmp_path):
    save_adapter(trained_roberta(target_modules=["query", "value"]), tmp_path)
    other = tiny_roberta()
    apply_lorafa(other, r=4, alpha=8, target_modules=["query", "key"], modules_to_save=["classifier"])
    with pytest.raises(ValueError, match=r"missing: .*self\.key\.lora_A.*unexpected: .*self\.value\.lora_A"):
        load_adapter(other, tmp_path)


def test_load_into_other_architecture_names_the_keys(tmp_path):
    save_adapter(trained_roberta(), tmp_path)
    with pytest.raises(ValueError, match=r"Adapter .* does not fit TwoLayerNet: .*\['classifier'\] match no module"):
        load_adapter(TwoLayerNet(), tmp_path)


def test_missing_adapter_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="No LoRA-FA adapter at .*adapter.safetensors"):
        load_adapter(tiny_roberta(), tmp_path / "nope")


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda data: data[: len(data) // 2], id="truncated"),
        pytest.param(lambda data: data[:-1], id="last-byte-missing"),
        pytest.param(lambda data: b"", id="zero-bytes"),
        pytest.param(lambda data: b"version https://git-lfs.github.com/spec/v1\n", id="not-safetensors"),
    ],
)
def test_damaged_adapter_file_names_the_file_and_what_to_do(tmp_path, damage):
    save_adapter(trained_roberta(), tmp_path)
    path = tmp_path / ADAPTER_FILE
    path.write_bytes(damage(path.read_bytes()))
    size = path.stat().st_size
    fresh = tiny_roberta()
    for model in (fresh, trained_roberta()):  # to be converted by load_adapter, or converted already
        with pytest.raises(ValueError) as error:
            load_adapter(model, tmp_path)
        message = str(error.value)
        assert f"Cannot read the LoRA-FA adapter file {path} ({size} bytes)" in message
        assert "copy it again, or save the adapter again with save_adapter()" in message
    assert getattr(fresh, "lorafa_config", None) is None and not lorafa_layers(fresh)  # left unchanged


def test_adapter_file_with_other_keys_names_the_file_and_the_keys(tmp_path):
    save_adapter(trained_roberta(), tmp_path)
    path = tmp_path / ADAPTER_FILE
    tensors = load_file(path)
    tensors["roberta.pooler.dense.weight"] = tensors.pop("classifier.dense.weight")  # a key the adapter lacks
    save_file(tensors, path)
    with pytest.raises(
        ValueError,
        match=rf"Adapter {re.escape(str(path))} does not fit this model \(missing: classifier\.dense\.weight; "
        r"unexpected: roberta\.pooler\.dense\.weight\)\. Load it into the same architecture",
    ):
        load_adapter(tiny_roberta(), tmp_path)


@pytest.mark.parametrize(
    "text, problem",
    [
        ('{"r": 4, "alpha": 8', "Expecting"),  # cut off
        ("", "Expecting value"),
        ('{"rank": 4}', r"\['rank'\] are not LoRA-FA settings"),
    ],
)
def test_damaged_adapter_config_names_the_file(tmp_path, text, problem):
    save_adapter(trained_roberta(), tmp_path)
    path = tmp_path / CONFIG_FILE
    path.write_text(text)
    with pytest.raises(
        ValueError, match=rf"Cannot read the LoRA-FA adapter config {re.escape(str(path))}: .*{problem}"
    ):
        load_adapter(tiny_roberta(), tmp_path)
    path.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(str(path))} is missing: save_adapter\(\) writes it"):
        load_adapter(tiny_roberta(), tmp_path)


def test_atomic_write_keeps_old_file_when_writing_fails(tmp_path):
    save_adapter(trained_roberta(), tmp_path)
    before = (tmp_path / ADAPTER_FILE).read_bytes()

    def crash(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(tmp_path / ADAPTER_FILE, crash)
    assert (tmp_path / ADAPTER_FILE).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors", "lorafa_config.json"]


def test_export_peft_loads_in_peft_with_equal_outputs(tmp_path, input_ids):
    from peft import PeftModel

    tiny_roberta().save_pretrained(tmp_path / "base")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base")
    apply_lorafa(model, r=4, alpha=8, dropout=0.1, modules_to_save=["classifier"], use_rslora=True)
    randomize_lora_B(model)
    with torch.no_grad():
        model.classifier.out_proj.bias.add_(0.5)
    model.eval()
    export_peft(model, tmp_path / "peft", base_model_name_or_path=str(tmp_path / "base"), task_type="SEQ_CLS")

    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8 and config["use_rslora"]
    assert set(config["target_modules"]) == set(model.lorafa_config.target_modules)
    keys = load_file(tmp_path / "peft" / "adapter_model.safetensors").keys()
    assert "base_model.model.roberta.encoder.layer.0.attention.self.query.lora_A.weight" in keys

    base = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base")
    peft_model = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    torch.testing.assert_close(peft_model(input_ids).logits, model(input_ids).logits, rtol=1e-5, atol=1e-5)
    peft_layer = peft_model.base_model.model.roberta.encoder.layer[1].output.dense
    assert torch.equal(peft_layer.lora_A["default"].weight, model.roberta.encoder.layer[1].output.dense.lora_A)


def test_export_peft_causal_lm(tmp_path, input_ids):
    from peft import PeftModel

    tiny_llama().save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    apply_lorafa(model, r=8, alpha=16)
    randomize_lora_B(model)
    export_peft(model, tmp_path / "peft", str(tmp_path / "base"), task_type="CAUSAL_LM")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "peft")
    torch.testing.assert_close(peft_model(input_ids).logits, model(input_ids).logits, rtol=1e-5, atol=1e-5)


def test_export_of_merged_or_unconverted_model_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="call apply_lorafa"):
        export_peft(tiny_roberta(), tmp_path)
    model = trained_roberta()
    next(iter(lorafa_layers(model).values())).merge()
    with pytest.raises(ValueError, match="are merged"):
        export_peft(model, tmp_path)
