"""``model.save_pretrained(directory)`` of a converted transformers model writes what ``from_pretrained`` loads as the
trained model (the adapters folded into the base weights, under the base model's names), and nothing else changes:
the model, its ``state_dict()`` and Lightning's checkpoints keep the adapters' own layout."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, randomize_lora_B, tiny_llama, tiny_mixtral, tiny_roberta
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from lightning_lorafa import apply_lorafa, merge_lorafa
from lightning_lorafa.adapters.find import lorafa_layers

FOLDED = r"LoRA-FA: save_pretrained writes \w+ with each adapter folded into its base weight \(W \+ s B A\)"


def ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "build, auto",
    [(tiny_llama, AutoModelForCausalLM), (tiny_roberta, AutoModelForSequenceClassification),
     (tiny_mixtral, AutoModelForSequenceClassification)],
    ids=["LLaMA", "RoBERTa", "Mixtral"],
)
def test_save_pretrained_then_from_pretrained_gives_the_trained_logits(tmp_path, build, auto):
    build().save_pretrained(tmp_path / "base")
    model = auto.from_pretrained(tmp_path / "base")
    apply_lorafa(model, r=4, alpha=8)
    randomize_lora_B(model)
    for name, param in model.named_parameters():
        if param.requires_grad and not name.endswith("lora_B"):  # the trained head (RoBERTa, Mixtral)
            torch.nn.init.normal_(param, std=0.2)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids()).logits
    state = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.warns(UserWarning, match=FOLDED):
        model.save_pretrained(tmp_path / "trained")
    reloaded = auto.from_pretrained(tmp_path / "trained").eval()
    assert not lorafa_layers(reloaded)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids()).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(input_ids=ids()).logits, expected, rtol=0, atol=0)  # the model is unchanged
    after = model.state_dict()  # and its own state dict keeps the adapters' layout
    assert after.keys() == state.keys() and all(torch.equal(after[key], state[key]) for key in state)
    assert any(key.endswith(".base.weight") for key in after) and any(key.endswith(".lora_B") for key in after)


def test_the_base_model_inside_saves_folded_too_and_a_merged_model_saves_plainly(tmp_path):
    model = tiny_llama()
    apply_lorafa(model, r=4, alpha=8)
    randomize_lora_B(model)
    with torch.no_grad():
        expected = model.model(input_ids=ids()).last_hidden_state
    with pytest.warns(UserWarning, match=FOLDED):
        model.model.save_pretrained(tmp_path / "inner")  # LlamaModel, a transformers model of its own
    from transformers import AutoModel

    with torch.no_grad():
        reloaded = AutoModel.from_pretrained(tmp_path / "inner").eval()
        torch.testing.assert_close(reloaded(input_ids=ids()).last_hidden_state, expected, rtol=1e-5, atol=1e-5)
    merge_lorafa(model)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.save_pretrained(tmp_path / "merged")  # nothing left to fold: transformers' own save
    with torch.no_grad():
        torch.testing.assert_close(
            AutoModelForCausalLM.from_pretrained(tmp_path / "merged").model(input_ids=ids()).last_hidden_state,
            expected, rtol=1e-5, atol=1e-5,
        )


def test_a_quantized_base_is_refused_at_save_time_with_what_to_do(tmp_path):
    from lightning_lorafa import load_quantized_model

    tiny_llama().save_pretrained(tmp_path / "base")
    model = load_quantized_model(str(tmp_path / "base"), "int8")
    apply_lorafa(model, r=4, alpha=8)
    with pytest.raises(TypeError, match=r"have a quantized base, whose weight is not a float tensor, so "
                       r"save_pretrained cannot fold the adapter into it.*lorafa export --format merged.*export_peft"):
        model.save_pretrained(tmp_path / "trained")
