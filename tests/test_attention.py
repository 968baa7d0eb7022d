"""Choosing the attention implementation: auto, explicit values honoured or rejected, plain modules."""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch
from conftest import TwoLayerNet, tiny_llama, tiny_roberta, tiny_t5
from torch import nn

from lightning_lorafa.attention import RECOMPUTED_DROPOUT_SDPA, set_attention_implementation
from lightning_lorafa.prepare import keep_dropout_seeds

BUILDERS = {"roberta": tiny_roberta, "t5": tiny_t5, "llama": tiny_llama}
HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None


@pytest.mark.parametrize("name", BUILDERS)
def test_auto_picks_sdpa_on_cpu_and_logs_it(name, caplog):
    model = BUILDERS[name]()
    model.set_attn_implementation("eager")
    with caplog.at_level(logging.INFO, logger="lightning_lorafa.attention"):
        assert set_attention_implementation(model, "auto") == "sdpa"
    assert model.config._attn_implementation == "sdpa"
    assert "attention implementation: sdpa" in caplog.text


@pytest.mark.parametrize("name", BUILDERS)
def test_explicit_eager_and_sdpa_are_honoured(name):
    model = BUILDERS[name]()
    assert set_attention_implementation(model, "eager") == "eager"
    assert model.config._attn_implementation == "eager"
    assert set_attention_implementation(model, "sdpa") == "sdpa"
    assert model.config._attn_implementation == "sdpa"


def test_eager_and_sdpa_give_the_same_outputs(input_ids):
    model = tiny_llama()
    expected = model(input_ids=input_ids).logits
    set_attention_implementation(model, "eager")
    torch.testing.assert_close(model(input_ids=input_ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_t5_never_gets_flash_attention():
    model = tiny_t5()
    with pytest.raises(ValueError, match="T5ForConditionalGeneration does not support flash_attention_2"):
        set_attention_implementation(model, "flash_attention_2")
    assert set_attention_implementation(model, "auto", device="cuda") == "sdpa"
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.skipif(HAS_FLASH_ATTN, reason="flash-attn is installed")
@pytest.mark.parametrize("name", ["roberta", "llama"])
def test_flash_attention_rejected_without_flash_attn(name):
    model = BUILDERS[name]()
    with pytest.raises(ValueError, match=r"needs flash-attn .*lightning-lorafa\[flash\].*use 'sdpa'"):
        set_attention_implementation(model, "flash_attention_2", device="cuda")
    assert model.config._attn_implementation == "sdpa"


def test_unknown_value_is_rejected():
    with pytest.raises(ValueError, match=r"'fast' is not one of \('auto', 'flash_attention_2', 'sdpa', 'eager'\)"):
        set_attention_implementation(tiny_roberta(), "fast")


def test_plain_module_is_unchanged_for_auto_and_rejects_explicit_values():
    net = TwoLayerNet()
    assert set_attention_implementation(net, "auto") == "unchanged"
    with pytest.raises(ValueError, match="needs a transformers PreTrainedModel"):
        set_attention_implementation(net, "sdpa")


def test_wrapped_models_are_found_and_switched():
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder, self.decoder = tiny_roberta(), tiny_llama()

    wrapper = Wrapper()
    assert set_attention_implementation(wrapper, "eager") == "eager"
    assert wrapper.encoder.config._attn_implementation == wrapper.decoder.config._attn_implementation == "eager"


@pytest.mark.parametrize("implementation", ["auto", "sdpa", "eager"])
def test_recomputed_dropout_attention_survives_a_later_choice(implementation):
    model = tiny_roberta(dropout=0.1)
    keep_dropout_seeds(model)
    assert set_attention_implementation(model, implementation) == RECOMPUTED_DROPOUT_SDPA
    assert model.config._attn_implementation == RECOMPUTED_DROPOUT_SDPA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_auto_on_cuda_picks_flash_attention_when_available():
    model = tiny_llama().cuda()
    capable = torch.cuda.get_device_capability()[0] >= 8
    expected = "flash_attention_2" if HAS_FLASH_ATTN and capable else "sdpa"
    assert set_attention_implementation(model, "auto") == expected
    assert set_attention_implementation(tiny_t5().cuda(), "auto") == "sdpa"
