"""``chunked_loss``: a causal LM's training loss without its logits equals transformers' loss, and keeps no
(tokens x vocabulary) tensor for backward."""

from __future__ import annotations

import copy
import importlib.util
import logging
import sys

import pytest
import torch
import transformers as tf
from conftest import ROOT, VOCAB, Tuner, quiet_trainer, tiny_llama, tiny_roberta
from torch.utils.data import DataLoader, TensorDataset

from lightning_lorafa import LoraFA, prepare_model
from lightning_lorafa.adapters.find import lorafa_layers
from lightning_lorafa.adapters.linear import LoraFALinear
from lightning_lorafa.model.chunked_loss import (
    KNOWN_CAUSAL_LMS,
    LogitsNotKept,
    chunked_loss_support,
    disable_chunked_loss,
    enable_chunked_loss,
)
from lightning_lorafa.model.linear_cross_entropy import chunk_rows, fused_kernel, linear_cross_entropy
from lightning_lorafa.profiling import measure_saved_activations

sys.path.insert(0, str(ROOT / "benchmarks"))
from models_table import ARCHS  # noqa: E402

CAUSAL_LMS = [name for name, arch in ARCHS.items() if arch.task_type == "CAUSAL_LM"]


def converted_pair(model: torch.nn.Module, **settings) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``model`` converted with B's drawn at random, and a copy of it that keeps transformers' own loss."""
    prepare_model(model, r=4, attn_implementation=None, chunked_loss=False, **settings)
    generator = torch.Generator().manual_seed(1)
    for layer in lorafa_layers(model).values():
        layer.lora_B.data.normal_(0.0, 0.1, generator=generator)
    reference = copy.deepcopy(model)
    enable_chunked_loss(model)
    return model.train(), reference.train()


def lm_batch(batch: int = 2, seq: int = 12, masked: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tokens; the first ``masked`` labels of each row are ``-100`` (a prompt the loss ignores)."""
    input_ids = torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))
    labels = input_ids.clone()
    labels[:, :masked] = -100
    return {"input_ids": input_ids, "labels": labels}


def assert_same_loss_and_gradients(model, reference, batch: dict, rtol: float = 1e-5) -> torch.Tensor:
    loss = model(**batch).loss
    expected = reference(**batch).loss
    torch.testing.assert_close(loss, expected, rtol=rtol, atol=0.0)
    loss.backward()
    expected.backward()
    checked = 0
    for (name, param), ref in zip(model.named_parameters(), reference.parameters(), strict=True):
        if ref.grad is not None:
            scale = ref.grad.abs().max()
            torch.testing.assert_close(param.grad / scale, ref.grad / scale, rtol=rtol, atol=rtol, msg=name)
            checked += 1
    assert checked > 0
    return loss


def test_every_known_causal_lm_is_one_the_tests_build():
    assert {type(ARCHS[name].build(0.0)).__name__ for name in CAUSAL_LMS} == KNOWN_CAUSAL_LMS


@pytest.mark.parametrize("name", CAUSAL_LMS)
def test_loss_and_gradients_equal_transformers(name):
    model, reference = converted_pair(ARCHS[name].build(0.0))
    assert chunked_loss_support(model) is None
    loss = assert_same_loss_and_gradients(model, reference, lm_batch())
    assert loss.dtype == torch.float32


def test_gemma2_final_logit_softcapping():
    model = ARCHS["Gemma2"].build(0.0)
    model.config.final_logit_softcapping = 0.05  # small enough to change the loss
    model, reference = converted_pair(model)
    loss = assert_same_loss_and_gradients(model, reference, lm_batch())
    reference.config.final_logit_softcapping = None
    assert abs(reference(**lm_batch()).loss.item() - loss.item()) > 1e-3


def test_adapted_lm_head_and_its_B_gradient():
    model, reference = converted_pair(tiny_llama(), target_modules=["q_proj", "lm_head"], modules_to_save=[])
    assert isinstance(model.lm_head, LoraFALinear)
    assert_same_loss_and_gradients(model, reference, lm_batch())
    assert model.lm_head.lora_B.grad.abs().sum() > 0


def test_lm_head_trained_fully_and_tied_embeddings():
    model, reference = converted_pair(tiny_llama(), modules_to_save=["lm_head"])
    assert model.lm_head.weight.requires_grad
    assert_same_loss_and_gradients(model, reference, lm_batch())
    assert model.lm_head.weight.grad.abs().sum() > 0
    tied = ARCHS["Gemma"].build(0.0)  # ties lm_head to the embeddings
    assert tied.lm_head.weight is tied.get_input_embeddings().weight
    model, reference = converted_pair(tied)
    assert_same_loss_and_gradients(model, reference, lm_batch())


def test_gradient_accumulation_num_items_in_batch_and_packing():
    model, reference = converted_pair(tiny_llama())
    batch = lm_batch(batch=1, seq=16)
    batch["position_ids"] = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9]])  # two packed rows
    batch["num_items_in_batch"] = torch.tensor(29)
    assert_same_loss_and_gradients(model, reference, batch)
    shifted = lm_batch(batch=1, seq=16, seed=1)
    shifted["shift_labels"] = torch.roll(shifted.pop("labels"), -1, dims=1)
    shifted["shift_labels"][:, -1] = -100
    shifted["labels"] = shifted["input_ids"]  # a caller passing shift_labels passes labels too
    assert_same_loss_and_gradients(model, reference, shifted)


def test_bf16_autocast_close_to_transformers():
    model, reference = converted_pair(tiny_llama())
    batch = lm_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss
        expected = reference(**batch).loss
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-2, atol=0.0)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(model.lm_head.weight.grad, reference.lm_head.weight.grad, rtol=0.05, atol=1e-3)


def test_no_saved_tensor_has_the_vocabulary_dimension():
    model, reference = converted_pair(tiny_llama())
    batch = lm_batch(batch=2, seq=64, masked=0)
    ours = measure_saved_activations(lambda: model(**batch).loss, model)
    theirs = measure_saved_activations(lambda: reference(**batch).loss, reference)
    # activations only: the frozen head's weight is kept for its (empty) call, as a weight
    assert not any(VOCAB in entry.shape for entry in ours.tensors if not entry.is_weight)
    assert any(VOCAB in entry.shape for entry in theirs.tensors if not entry.is_weight)
    # transformers keeps the (tokens x vocabulary) float32 log-probabilities; ours the gradient of the 126 counted
    # tokens' hidden states (tokens x hidden) and their 126 int64 indices, nothing else for the loss
    assert sum(e.nbytes for e in theirs.tensors if VOCAB in e.shape and not e.is_weight) >= 2 * 63 * VOCAB * 4
    assert ours.by_op["LinearCrossEntropy"] == 2 * 63 * 32 * 4
    loss_bytes = 2 * 63 * 32 * 4 + 2 * 63 * 8
    assert theirs.total_bytes - ours.total_bytes == theirs.by_op["cross_entropy"] - loss_bytes


def test_eval_no_grad_and_calls_without_labels_return_logits():
    model, reference = converted_pair(tiny_llama())
    batch = lm_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits)
    model.eval(), reference.eval()
    out, expected = model(**batch), reference(**batch)
    torch.testing.assert_close(out.logits, expected.logits)
    torch.testing.assert_close(out.loss, expected.loss)
    model.train(), reference.train()
    torch.testing.assert_close(
        model(input_ids=batch["input_ids"]).logits, reference(input_ids=batch["input_ids"]).logits
    )
    generated = model.eval().generate(batch["input_ids"][:1, :4], max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 7)


def test_training_logits_say_which_setting_to_change():
    model, _ = converted_pair(tiny_llama())
    out = model(**lm_batch())
    assert isinstance(out.logits, LogitsNotKept)
    assert out.to_tuple()[0] is out.loss  # the loss stays the output's first item
    copied = copy.deepcopy(out.logits)  # copying an output is no use of the logits
    with pytest.raises(AttributeError, match="chunked_loss=False"):
        copied.sum()
    for use in (lambda x: x.argmax(-1), lambda x: torch.argmax(x), lambda x: x[:, -1], lambda x: x.float(), len):
        with pytest.raises((AttributeError, RuntimeError), match="chunked_loss=False"):
            use(out.logits)


def test_disable_gives_the_model_back_its_own_logits():
    model, reference = converted_pair(tiny_llama())
    assert disable_chunked_loss(model) and not disable_chunked_loss(model)
    out = model(**lm_batch())
    torch.testing.assert_close(out.logits, reference(**lm_batch()).logits)
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_models_whose_loss_is_unknown_are_refused_or_named(caplog):
    config = tf.GraniteConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        logits_scaling=4.0,
    )
    granite = tf.GraniteForCausalLM(config)
    with pytest.raises(ValueError, match="GraniteForCausalLM is not one of the causal LMs"):
        prepare_model(granite, r=4, chunked_loss=True)
    assert not lorafa_layers(granite)  # refused before anything changed
    own = tiny_llama()
    own.loss_function = lambda logits, labels, **kwargs: logits.sum()  # a user's own loss (transformers' setter)
    with caplog.at_level(logging.INFO):
        done = prepare_model(own, r=4)
    assert done.own_loss == {"LlamaForCausalLM": "LlamaForCausalLM has a loss_function of its own"}
    assert not hasattr(own, "lorafa_chunked_loss")
    assert isinstance(own(**lm_batch()).logits, torch.Tensor)
    lines = done.summary(own)
    assert any("keeps its own loss and logits (chunked_loss): LlamaForCausalLM has a loss_function" in x for x in lines)
    with pytest.raises(ValueError, match="chunked_loss must be one of"):
        LoraFA(chunked_loss="yes")
    with pytest.raises(ValueError, match="RobertaForSequenceClassification holds no causal LM"):
        prepare_model(tiny_roberta(), r=4, chunked_loss=True)
    assert prepare_model(tiny_roberta(), r=4).chunked_loss == []  # "auto": nothing to do, nothing said


def test_prepare_model_turns_it_on_by_default_and_logs_it():
    model = tiny_llama()
    done = prepare_model(model, r=4)
    assert done.chunked_loss == ["LlamaForCausalLM"]
    assert any("computes its training loss in chunks" in line for line in done.summary(model))
    done = prepare_model(model, r=4, chunked_loss=False)  # the same adapter settings: the model is adopted
    assert done.chunked_loss == [] and not hasattr(model, "lorafa_chunked_loss")


def test_torch_compile_equals_eager():
    model, reference = converted_pair(tiny_llama())
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # no graph break: ignored tokens weigh 0
    assert_same_loss_and_gradients(compiled, reference, lm_batch())
    assert isinstance(compiled(**lm_batch()).logits, LogitsNotKept)


def test_a_users_training_step_gets_it_through_the_callback(tmp_path):
    class Recording(Tuner):
        def on_before_backward(self, loss):
            self.losses.append(loss.detach())

    tokens = torch.randint(3, VOCAB, (8, 12), generator=torch.Generator().manual_seed(0))
    module = Recording(tiny_llama().train())
    module.losses = []
    reference = copy.deepcopy(module.model)
    trainer = quiet_trainer(tmp_path, max_steps=1, callbacks=[LoraFA(r=4, attn_implementation=None)])
    trainer.fit(module, DataLoader(TensorDataset(tokens, tokens), batch_size=4))
    assert hasattr(module.model, "lorafa_chunked_loss")
    expected = reference.train()(input_ids=tokens[:4], labels=tokens[:4]).loss  # B is zero at the first step
    torch.testing.assert_close(module.losses[0], expected.detach(), rtol=1e-5, atol=0.0)


def test_chunks_and_function_match_cross_entropy():
    assert chunk_rows(2048, 2048, 128256) == 256  # at least 256 rows: the head's matmuls stay compute-bound
    assert chunk_rows(65536, 2048, 128256) == 2048  # one chunk's logits about the size of the hidden states
    assert chunk_rows(100, 2048, 128256) == 100 and chunk_rows(10**7, 4096, 4096) == 4096
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(37, 16, generator=generator, requires_grad=True)
    weight = torch.randn(50, 16, generator=generator, requires_grad=True)
    bias = torch.randn(50, generator=generator, requires_grad=True)
    h = torch.randn(37, 4, generator=generator, requires_grad=True)
    lora_B = torch.randn(50, 4, generator=generator, requires_grad=True)
    targets = torch.randint(0, 50, (37,), generator=generator)
    inputs = (x, weight, bias, h, lora_B)

    def ours(x, weight, bias, h, lora_B):
        return linear_cross_entropy(x, weight, targets, bias=bias, h=h, lora_B=lora_B, softcap=3.0, chunk=8)

    def theirs(x, weight, bias, h, lora_B):
        logits = 3.0 * torch.tanh((x @ weight.T + bias + h @ lora_B.T) / 3.0)
        return torch.nn.functional.cross_entropy(logits, targets)

    torch.testing.assert_close(ours(*inputs), theirs(*inputs))
    for mine, expected in zip(
        torch.autograd.grad(ours(*inputs) * 2.5, inputs),
        torch.autograd.grad(theirs(*inputs) * 2.5, inputs),
        strict=True,
    ):
        torch.testing.assert_close(mine, expected, rtol=1e-5, atol=1e-6)


def test_the_fused_kernel_is_chosen_only_on_cuda_without_a_branch():
    x = torch.zeros(2, 4)
    assert fused_kernel(x, None) is None  # CPU: the pure-PyTorch chunks
    if torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None:
        assert fused_kernel(x.cuda(), None) is not None and fused_kernel(x.cuda(), x.cuda()) is None


@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None, reason="CUDA and liger-kernel"
)
def test_liger_kernel_equals_the_chunks_on_cuda():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(300, 64, generator=generator).cuda().requires_grad_()
    weight = torch.randn(1000, 64, generator=generator).cuda().requires_grad_()
    targets = torch.randint(0, 1000, (300,), generator=generator).cuda()
    for softcap in (None, 5.0):
        fused = linear_cross_entropy(x, weight, targets, softcap=softcap, normalizer=250)
        chunks = linear_cross_entropy(x, weight, targets, softcap=softcap, normalizer=250, chunk=64)
        torch.testing.assert_close(fused, chunks, rtol=1e-4, atol=1e-5)
        for a, b in zip(torch.autograd.grad(fused, (x, weight)), torch.autograd.grad(chunks, (x, weight)), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_a_moe_models_router_loss_is_added_as_the_model_adds_it():
    model = ARCHS["Mixtral"].build(0.0)
    model.config.output_router_logits = True
    model.config.router_aux_loss_coef = 0.5  # large enough to show
    model, reference = converted_pair(model)
    out = model(**lm_batch())
    assert out.aux_loss is not None and out.aux_loss > 0
    assert_same_loss_and_gradients(model, reference, lm_batch())
