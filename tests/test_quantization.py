"""Quantized frozen bases: errors without CUDA or bitsandbytes here; the 4-bit/8-bit paths on a CUDA GPU."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from conftest import VOCAB, tiny_llama

from lightning_lorafa import apply_lorafa, lorafa_layers
from lightning_lorafa.layer import is_quantized
from lightning_lorafa.memory import measure_saved_activations
from lightning_lorafa.quantization import load_quantized_model, quantization_config

needs_cuda_and_bnb = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None,
    reason="4-bit/8-bit quantization needs CUDA and bitsandbytes",
)


def test_no_quantization_and_unknown_kind():
    assert quantization_config(None) is None
    with pytest.raises(ValueError, match=r"quantization must be one of \('nf4', 'int8'\) or None, got 'fp4'"):
        quantization_config("fp4")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_quantization_without_cuda_is_explained():
    with pytest.raises(RuntimeError, match=r"quantization='nf4' .* no CUDA GPU is available .*quantization=None"):
        quantization_config("nf4")
    with pytest.raises(RuntimeError, match=r"quantization='int8' .*no CUDA GPU"):
        load_quantized_model("unused", "int8")


def test_quantization_without_bitsandbytes_is_explained(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what `import bitsandbytes` sees when it is absent
    with pytest.raises(
        RuntimeError, match=r"bitsandbytes package is not installed \(pip install 'lightning-lorafa\[quant\]'\)"
    ):
        quantization_config("nf4")


def test_plain_linear_is_not_quantized():
    model = tiny_llama()
    apply_lorafa(model, r=2, alpha=4)
    assert not any(is_quantized(layer.base) for layer in lorafa_layers(model).values())


@pytest.fixture
def llama_path(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "llama")
    return str(tmp_path / "llama")


@needs_cuda_and_bnb
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_base_trains_B_in_float32_and_refuses_merging(llama_path, kind):
    model = load_quantized_model(llama_path, kind)
    apply_lorafa(model, r=4, alpha=8)
    layers = lorafa_layers(model)
    assert all(is_quantized(layer.base) for layer in layers.values())
    assert all(layer.lora_B.dtype == torch.float32 and layer.lora_A.dtype == torch.float32 for layer in layers.values())
    input_ids = torch.randint(3, VOCAB, (2, 16), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    assert all(layer.lora_B.grad is not None and layer.lora_B.grad.abs().sum() > 0 for layer in layers.values())
    with pytest.raises(TypeError, match="Cannot merge into a quantized"):
        next(iter(layers.values())).merge()


@needs_cuda_and_bnb
def test_4bit_base_matmul_saves_no_input(llama_path):
    """The frozen 4-bit matmul must not keep x for backward (older bitsandbytes did, undoing LoRA-FA's saving)."""
    model = load_quantized_model(llama_path, "nf4")
    apply_lorafa(model, r=4, alpha=8)
    model.train()
    input_ids = torch.randint(3, VOCAB, (2, 16), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    report = measure_saved_activations(lambda: model(input_ids=input_ids, labels=input_ids).loss, model)
    quantized_ops = {op: n for op, n in report.by_op.items() if "4bit" in op.lower() or "matmul4" in op.lower()}
    assert quantized_ops == {}, report.to_markdown()
    branch = report.by_op["_LoraFABranch"]
    # the LoRA-FA branch keeps h = x A^T: (2, 16, 4) values per adapted linear, in the compute dtype (bf16)
    assert branch == 2 * 16 * 4 * 2 * len(lorafa_layers(model))
