"""``offload_activations``: saved activations wait in CPU memory; loss and gradients are unchanged.

On a CPU-only machine nothing moves, so the copies are exercised by offloading CPU tensors (``device_types``)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import VOCAB, tiny_llama

from lightning_lorafa import prepare_model
from lightning_lorafa.adapters.find import lorafa_layers
from lightning_lorafa.model.offload import ActivationOffload, disable_offload, enable_offload


def tokens(seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def prepared(**settings) -> torch.nn.Module:
    model = tiny_llama().train()
    prepare_model(model, r=4, attn_implementation=None, **settings)
    for layer in lorafa_layers(model).values():
        layer.lora_B.data.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(1))
    return model


@pytest.mark.parametrize("recompute", ["none", "block"])
def test_offloaded_step_equals_the_plain_one(recompute):
    model = prepared(recompute=recompute)
    reference = copy.deepcopy(model)
    offload = enable_offload(model, ActivationOffload(min_bytes=1024, device_types=("cpu",)))
    loss = model(**tokens()).loss
    moved = offload.moved_bytes
    assert moved > 0 and not offload._active  # the hooks are left after the forward
    expected = reference(**tokens()).loss
    loss.backward()
    expected.backward()
    assert torch.equal(loss, expected)
    for (name, param), ref in zip(model.named_parameters(), reference.parameters(), strict=True):
        if ref.grad is not None:
            assert torch.equal(param.grad, ref.grad), name
    offload.reset()
    with torch.no_grad():
        model(**tokens())
    assert offload.moved_bytes == 0  # nothing is saved without grad


def test_parameters_and_small_tensors_stay():
    offload = ActivationOffload(min_bytes=1024, device_types=("cpu",))
    weight = torch.nn.Parameter(torch.zeros(64, 64))
    small = torch.zeros(8)
    large = torch.arange(1024, dtype=torch.float32)
    assert offload.pack(weight) is weight and offload.pack(small) is small
    packed = offload.pack(large)
    assert isinstance(packed, tuple) and packed[1] is not large
    assert torch.equal(offload.unpack(packed), large) and offload.moved_bytes == 4096
    assert ActivationOffload().pack(large) is large  # CUDA tensors only, by default


def test_prepare_model_turns_it_on_and_off_and_says_so():
    model = tiny_llama()
    done = prepare_model(model, r=4, offload_activations=True)
    assert done.offload and isinstance(model.lorafa_offload, ActivationOffload)
    assert any("wait in CPU memory for backward (offload_activations)" in line for line in done.summary(model))
    assert prepare_model(model, r=4).offload is False and not hasattr(model, "lorafa_offload")
    assert not disable_offload(model)


def test_a_failing_forward_leaves_the_hooks():
    model = prepared()
    offload = enable_offload(model, ActivationOffload(min_bytes=0, device_types=("cpu",)))
    with pytest.raises(IndexError):
        model(input_ids=torch.full((1, 4), VOCAB + 5))  # out of the vocabulary
    assert not offload._active
    plain = torch.ones(3, requires_grad=True)
    offload.reset()
    (plain * plain).sum().backward()  # outside the model: nothing is packed
    assert offload.moved_bytes == 0
