"""Quantized frozen bases (bitsandbytes NF4 with double quantization, LLM.int8()) under LoRA-FA.

bitsandbytes 0.50 runs both on CPU, so these run everywhere bitsandbytes is installed (the ``test`` extra).
"""

from __future__ import annotations

import functools
import gc
import sys

import bitsandbytes as bnb
import pytest
import torch
from conftest import VOCAB, quiet_trainer, tiny_llama
from torch.multiprocessing.reductions import StorageWeakRef

from lightning_lorafa import apply_lorafa, create_lorafa_optimizer, load_adapter, merge_lorafa, save_adapter
from lightning_lorafa.adapters.find import lorafa_layers
from lightning_lorafa.adapters.linear import is_quantized
from lightning_lorafa.model.quantization import (
    Int8LinearKeepingNoInput,
    keep_no_quantized_inputs,
    load_quantized_model,
    quantization_config,
    quantization_device,
)
from lightning_lorafa.profiling import measure_saved_activations

QUANTIZED_TYPES = {"nf4": bnb.nn.Linear4bit, "int8": bnb.nn.Linear8bitLt}
R = 4


def test_no_quantization_and_unknown_kind():
    assert quantization_config(None) is None
    with pytest.raises(ValueError, match=r"quantization must be one of \('nf4', 'int8'\) or None, got 'fp4'"):
        quantization_config("fp4")


def test_quantization_runs_on_cuda_or_on_cpu_here():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert quantization_device("nf4").type == expected
    assert quantization_config("int8").load_in_8bit


def test_bitsandbytes_without_cpu_backend_and_without_cuda_is_explained(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(bnb, "supported_torch_devices", {"cuda"})  # what a CUDA-only bitsandbytes lists
    with pytest.raises(
        RuntimeError,
        match=r"quantization='nf4' .* no CUDA GPU is available .* and bitsandbytes \S+ has no CPU backend"
        r".*quantization=None",
    ):
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
    assert keep_no_quantized_inputs(model) == 0


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama") / "llama"
    tiny_llama().save_pretrained(path)
    return str(path)


def quantized_lorafa(path: str, kind: str) -> torch.nn.Module:
    model = load_quantized_model(path, kind)
    apply_lorafa(model, r=R, alpha=8)
    return model.train()


def token_ids(device: torch.device) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0)).to(device)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_base_trains_B_in_float32_and_refuses_merging(llama_path, kind):
    model = quantized_lorafa(llama_path, kind)
    layers = lorafa_layers(model)
    assert len(layers) == 14 and all(isinstance(layer.base, QUANTIZED_TYPES[kind]) for layer in layers.values())
    assert all(layer.lora_B.dtype == torch.float32 and layer.lora_A.dtype == torch.float32 for layer in layers.values())
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    optimizer = create_lorafa_optimizer(model, lr=1e-2)
    ids = token_ids(quantization_device(kind))
    model(input_ids=ids, labels=ids).loss.backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {f"{name}.lora_B" for name in layers}  # only B, and every B
    assert all(layer.lora_B.grad.abs().sum() > 0 for layer in layers.values())
    optimizer.step()
    assert all(layer.lora_B.abs().sum() > 0 for layer in layers.values())
    assert all(torch.equal(p, frozen[name]) for name, p in model.named_parameters() if name in frozen)
    with pytest.raises(TypeError, match="Cannot merge into a quantized"):
        next(iter(layers.values())).merge()


def test_int8_layers_get_a_subclass_once_and_keep_their_state(llama_path, tmp_path):
    """keep_no_quantized_inputs gives each Linear8bitLt a subclass overriding forward (no instance attribute);
    names, state-dict keys and values stay; a second call changes nothing; torch.save / deepcopy keep it;
    a forward already replaced on the instance is refused by name."""
    import copy

    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(
        llama_path, quantization_config=quantization_config("int8"), device_map={"": "cpu"}
    )
    state = plain.state_dict()
    assert keep_no_quantized_inputs(plain) == 14 and keep_no_quantized_inputs(plain) == 0
    int8 = [m for m in plain.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert len(int8) == 14 and {type(m).__name__ for m in int8} == {"Linear8bitLtKeepingNoInput"}
    assert all("forward" not in vars(m) for m in int8)
    assert plain.state_dict().keys() == state.keys()
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in state.items())
    torch.save(plain, tmp_path / "model.pt")
    for other in (torch.load(tmp_path / "model.pt", weights_only=False), copy.deepcopy(plain)):
        assert isinstance(other.model.layers[0].mlp.down_proj, Int8LinearKeepingNoInput)
        with torch.no_grad():
            ids = token_ids(torch.device("cpu"))
            assert torch.equal(other(input_ids=ids).logits, plain(input_ids=ids).logits)

    wrapped = AutoModelForCausalLM.from_pretrained(
        llama_path, quantization_config=quantization_config("int8"), device_map={"": "cpu"}
    )
    layer = wrapped.model.layers[0].mlp.down_proj
    layer.forward = functools.partial(type(layer).forward, layer)
    with pytest.raises(ValueError, match="Linear8bitLt has its forward replaced on the instance"):
        keep_no_quantized_inputs(wrapped)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_matmul_keeps_no_input(llama_path, kind):
    """After a training forward through a LoRA-FA layer over a quantized base, nothing holds its input x:
    the branch keeps h = x A^T (batch x seq x r) and the quantized matmul only its weight."""
    model = quantized_lorafa(llama_path, kind)
    layer = model.model.layers[0].mlp.down_proj  # 64 -> 32
    leaf = torch.randn(2, 16, 64, dtype=torch.bfloat16, requires_grad=True, device=layer.lora_A.device)

    def forward_and_check():
        x = leaf * 1.0  # an activation, as inside the model
        kept = StorageWeakRef(x.untyped_storage())
        report = measure_saved_activations(functools.partial(layer, x), model)
        y = layer(x)
        del x
        gc.collect()
        return y, kept.expired(), report

    y, freed, report = forward_and_check()
    assert freed
    assert report.tensors and all(t.nbytes < leaf.nbytes for t in report.tensors)  # nothing x-sized saved either
    y.float().square().sum().backward()
    ours = leaf.grad.clone()

    if kind == "int8":  # bitsandbytes' own int8 matmul keeps x: the check above can fail
        assert isinstance(layer.base, Int8LinearKeepingNoInput)
        layer.base.__class__ = bnb.nn.Linear8bitLt  # bitsandbytes' own class again
        leaf.grad = None
        y, freed, _ = forward_and_check()
        assert not freed
        y.float().square().sum().backward()
        assert torch.equal(leaf.grad, ours)  # same input gradient, without keeping x


def test_4bit_base_still_backpropagates_after_a_no_grad_evaluation(llama_path):
    """On AVX512-BF16 CPUs bitsandbytes repacks a Linear4bit's weight on a no-grad eval forward into a layout
    whose matmul has no backward; the loader turns that off, so validation does not break training."""
    model = quantized_lorafa(llama_path, "nf4")
    ids = token_ids(quantization_device("nf4"))

    def input_gradients() -> torch.Tensor:
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
        model(inputs_embeds=embeds, labels=ids).loss.backward()
        return embeds.grad

    before = input_gradients()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    assert torch.equal(input_gradients(), before)


def test_adapter_trained_over_4bit_base_loads_into_the_full_precision_base(llama_path, tmp_path):
    model = quantized_lorafa(llama_path, "nf4")
    optimizer = create_lorafa_optimizer(model, lr=1e-2)
    ids = token_ids(quantization_device("nf4"))
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    save_adapter(model, tmp_path / "adapter")

    full = tiny_llama()  # the same base in float32, not converted: load_adapter converts it
    load_adapter(full, tmp_path / "adapter")
    trained = lorafa_layers(model)
    for name, layer in lorafa_layers(full).items():
        assert torch.equal(layer.lora_A, trained[name].lora_A)
        assert torch.equal(layer.lora_B, trained[name].lora_B.cpu())
        assert layer.lora_B.abs().sum() > 0
    ids = ids.cpu()
    with torch.no_grad():
        adapted = full(input_ids=ids).logits
        merged = merge_lorafa(full)(input_ids=ids).logits
        base = tiny_llama()(input_ids=ids).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(adapted, base, atol=1e-3)  # the adapter changes the output


def test_callback_makes_an_int8_base_from_from_pretrained_keep_no_input(llama_path, tmp_path):
    """A model quantized by from_pretrained itself (not load_quantized_model) is fixed up by the callback."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset
    from transformers import AutoModelForCausalLM

    from lightning_lorafa import LoraFA

    model = AutoModelForCausalLM.from_pretrained(
        llama_path, quantization_config=quantization_config("int8"), device_map={"": "cpu"}
    )
    int8 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert int8 and not any(isinstance(m, Int8LinearKeepingNoInput) for m in int8)

    class Tuned(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch[0], labels=batch[0]).loss

        def configure_optimizers(self):
            return None  # LoraFA supplies its optimizer

    ids = token_ids(torch.device("cpu"))
    trainer = quiet_trainer(tmp_path, max_steps=1, callbacks=[LoraFA(r=R, alpha=8, lr=0.001)])
    trainer.fit(Tuned(), DataLoader(TensorDataset(ids), batch_size=2))
    assert all(type(m).__name__ == "Linear8bitLtKeepingNoInput" for m in int8)
    assert all(isinstance(m, (Int8LinearKeepingNoInput, bnb.nn.Linear8bitLt)) for m in int8)
