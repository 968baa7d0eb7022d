import json

import pytest
import torch
from conftest import VOCAB, Tuner, classification_batches, quiet_trainer, randomize_lora_B, tiny_roberta

from lightning_lorafa import LoraFA, apply_lorafa, export_peft, load_adapter, save_adapter
from lightning_lorafa.adapters.correction import correction_matrix
from lightning_lorafa.adapters.find import lorafa_layers
from lightning_lorafa.adapters.initialization import draw_lora_A, layer_seed
from lightning_lorafa.adapters.linear import LoraFALinear


def test_kaiming_draw_is_the_layers_own_A():
    layer = LoraFALinear(torch.nn.Linear(24, 10), r=4, alpha=8, seed=123)
    assert torch.equal(draw_lora_A(4, 24, 123, "kaiming"), layer.lora_A)
    kaiming = tiny_roberta()
    apply_lorafa(kaiming, r=4, alpha=8, seed=5)
    default = tiny_roberta()
    apply_lorafa(default, r=4, alpha=8, seed=5, init_a="kaiming")
    for name, layer in lorafa_layers(default).items():
        assert torch.equal(layer.lora_A, lorafa_layers(kaiming)[name].lora_A)
        assert torch.equal(layer.lora_A, draw_lora_A(4, layer.in_features, layer_seed(5, name)))


def test_orthogonal_rows_are_orthonormal_and_seeded():
    a = draw_lora_A(8, 64, seed=3, init_a="orthogonal")
    assert a.shape == (8, 64) and a.dtype == torch.float32
    torch.testing.assert_close(a @ a.t(), torch.eye(8), rtol=0, atol=1e-6)
    assert torch.equal(a, draw_lora_A(8, 64, seed=3, init_a="orthogonal"))
    assert not torch.allclose(a, draw_lora_A(8, 64, seed=4, init_a="orthogonal"))
    square = draw_lora_A(16, 16, seed=0, init_a="orthogonal")  # r = d_in: a full orthogonal matrix
    torch.testing.assert_close(square.t() @ square, torch.eye(16), rtol=0, atol=1e-6)


def test_apply_lorafa_orthogonal_every_layer_and_correction_is_scalar():
    model = tiny_roberta()
    names = apply_lorafa(model, r=4, alpha=8, seed=7, init_a="orthogonal", modules_to_save=["classifier"])
    assert model.lorafa_config.init_a == "orthogonal"
    layers = lorafa_layers(model)
    assert list(layers) == names and len(names) == 12
    for name, layer in layers.items():
        assert torch.equal(layer.lora_A, draw_lora_A(4, layer.in_features, layer_seed(7, name), "orthogonal"))
        # A A^T = I, so the gradient correction (A A^T + ridge I)^{-1} / s^2 is 1 / s^2 = 1/4.
        torch.testing.assert_close(correction_matrix(layer), torch.eye(4) / 4, rtol=0, atol=1e-5)
        assert not layer.lora_A.requires_grad


def test_bad_init_a_is_refused_before_anything_changes():
    model = tiny_roberta()
    with pytest.raises(ValueError, match=r"init_a='svd'\): init_a must be one of \['kaiming', 'orthogonal'\]"):
        apply_lorafa(model, r=4, init_a="svd")
    assert not lorafa_layers(model) and not hasattr(model, "lorafa_config")
    with pytest.raises(ValueError, match="init_a must be one of"):
        LoraFA(r=4, init_a="random")
    with pytest.raises(ValueError, match="needs r <= d_in"):
        draw_lora_A(8, 4, seed=0, init_a="orthogonal")


def test_reset_parameters_redraws_A_in_place_from_the_layers_seed():
    layer = LoraFALinear(torch.nn.Linear(12, 6), r=3, alpha=6, seed=9, init_a="orthogonal")
    buffer = layer.lora_A
    buffer.zero_()
    layer.reset_parameters()
    assert layer.lora_A is buffer
    assert torch.equal(buffer, draw_lora_A(3, 12, 9, "orthogonal"))


def test_orthogonal_adapter_saves_loads_and_exports_to_peft(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    input_ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    tiny_roberta().save_pretrained(tmp_path / "base")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base")
    apply_lorafa(model, r=4, alpha=8, init_a="orthogonal", modules_to_save=["classifier"])
    randomize_lora_B(model)
    model.eval()
    expected = model(input_ids).logits

    save_adapter(model, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "lorafa_config.json").read_text())["init_a"] == "orthogonal"
    fresh = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base").eval()
    load_adapter(fresh, tmp_path / "adapter")
    assert fresh.lorafa_config.init_a == "orthogonal"  # the reloaded config says how A was drawn
    for name, layer in lorafa_layers(fresh).items():
        assert torch.equal(layer.lora_A, lorafa_layers(model)[name].lora_A)
    torch.testing.assert_close(fresh(input_ids).logits, expected)

    export_peft(model, tmp_path / "peft", str(tmp_path / "base"), task_type="SEQ_CLS")
    base = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base")
    peft_model = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    torch.testing.assert_close(peft_model(input_ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_callback_converts_with_orthogonal_A(tmp_path):
    module = Tuner(tiny_roberta(dropout=0.1).train())
    callback = LoraFA(r=4, alpha=8, init_a="orthogonal", modules_to_save=["classifier"])
    quiet_trainer(tmp_path, max_steps=2, callbacks=[callback]).fit(module, classification_batches())
    model = module.model
    assert model.lorafa_config.init_a == "orthogonal"
    for name, layer in lorafa_layers(model).items():
        assert torch.equal(layer.lora_A, draw_lora_A(4, layer.in_features, layer_seed(0, name), "orthogonal"))
        assert layer.lora_B.abs().sum() > 0
