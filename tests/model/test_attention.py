"""Choosing the attention implementation: auto, explicit values honoured or rejected, plain modules; the
seed-kept attention of softcapping models (Gemma2) against their own eager attention."""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch
from conftest import VOCAB, TwoLayerNet, falcon_calls_the_attention_interface, tiny_llama, tiny_roberta, tiny_t5
from torch import nn

from lightning_lorafa.adapters.dropout_masks import draw_seed, dropout_mul
from lightning_lorafa.adapters.seeded_attention import _RecomputedDropoutAttention
from lightning_lorafa.model.attention import (
    RECOMPUTED_DROPOUT_EAGER,
    RECOMPUTED_DROPOUT_SDPA,
    recomputed_dropout_eager,
    set_attention_implementation,
    use_seeded_dropout_attention,
)
from lightning_lorafa.model.dropouts import keep_dropout_seeds
from lightning_lorafa.profiling import measure_saved_activations

BUILDERS = {"roberta": tiny_roberta, "t5": tiny_t5, "llama": tiny_llama}
HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None


@pytest.mark.parametrize("name", BUILDERS)
def test_auto_picks_sdpa_on_cpu_and_logs_it(name, caplog):
    model = BUILDERS[name]()
    model.set_attn_implementation("eager")
    with caplog.at_level(logging.INFO, logger="lightning_lorafa.model.attention"):
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


SOFTCAP, WINDOW = 2.0, 4
BATCH, SEQ, HEADS, KV_HEADS, HEAD_DIM = 2, 12, 4, 2, 8


def tiny_gemma2(dropout: float = 0.1) -> nn.Module:
    """A 2-layer Gemma2 (sliding window 4 < sequence 12, then full) whose scores reach about twice the softcap."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, max_position_embeddings=64, query_pre_attn_scalar=HEAD_DIM,
        sliding_window=WINDOW, attn_logit_softcapping=SOFTCAP, attention_dropout=dropout, initializer_range=0.2,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    model = Gemma2ForCausalLM(config).eval()
    assert model.config._attn_implementation == "eager"  # Gemma2 does not support SDPA
    assert model.config.layer_types == ["sliding_attention", "full_attention"] and WINDOW < SEQ
    return model


def stored_mask_dropout(tensor: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False):
    """``torch.nn.functional.dropout`` drawing the seed as the seed-kept attention does, mask stored."""
    if not training or p == 0.0:
        return tensor
    return tensor * dropout_mul(torch.ones_like(tensor), draw_seed(tensor.device), p)


def _token_ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))


def _loss_and_grads(model: nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
    ids = _token_ids()
    torch.manual_seed(123)
    loss = model(input_ids=ids, labels=ids).loss
    return loss, list(torch.autograd.grad(loss, list(model.parameters())))


def test_gemma2_switches_to_seeded_eager_attention_and_deberta_v2_is_kept_with_its_reason():
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    model = tiny_gemma2()
    assert use_seeded_dropout_attention(model) == (["attn_implementation"], {})
    assert model.config._attn_implementation == RECOMPUTED_DROPOUT_EAGER
    assert use_seeded_dropout_attention(model) == ([], {})  # already switched: nothing to do
    assert set_attention_implementation(model, "auto") == RECOMPUTED_DROPOUT_EAGER  # auto is eager for Gemma2
    with pytest.raises(ValueError, match="Gemma2ForCausalLM does not support sdpa"):
        set_attention_implementation(model, "sdpa")

    config = DebertaV2Config(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, pad_token_id=0, attention_probs_dropout_prob=0.1,
    )  # fmt: skip
    deberta = DebertaV2ForSequenceClassification(config)
    reason = "DebertaV2ForSequenceClassification (eager): does not support SDPA attention"
    assert use_seeded_dropout_attention(deberta) == ([], {"DebertaV2ForSequenceClassification": reason})
    assert deberta.config._attn_implementation == "eager"


def test_gemma2_loss_and_grads_equal_its_own_eager_attention_with_the_same_masks(monkeypatch):
    """Training with attention dropout on CPU: the seed-kept, softcapped attention gives the loss and gradients of
    Gemma2's own eager attention (softcap, sliding-window and causal masks) whose dropout stores the same masks."""
    ours, reference = tiny_gemma2().train(), tiny_gemma2().train()
    use_seeded_dropout_attention(ours)
    loss, grads = _loss_and_grads(ours)
    with monkeypatch.context() as patch:
        patch.setattr(torch.nn.functional, "dropout", stored_mask_dropout)
        ref_loss, ref_grads = _loss_and_grads(reference)
    assert torch.equal(loss, ref_loss)
    assert len(grads) == len(ref_grads) == len(list(ours.parameters()))
    assert all(torch.equal(g, r) for g, r in zip(grads, ref_grads, strict=True))
    torch.manual_seed(0)
    ids = _token_ids()
    assert not torch.equal(ours(input_ids=ids, labels=ids).loss, loss)  # dropout is live
    for module in ours.modules():
        if hasattr(module, "attn_logit_softcapping"):
            module.attn_logit_softcapping = None
    assert not torch.equal(_loss_and_grads(ours)[0], loss)  # the softcap bites


def test_gemma2_without_cpu_dropout_runs_its_own_eager_attention():
    """Eval, or attention dropout 0: the switched Gemma2 runs its own eager function, bit for bit."""
    ids = _token_ids()
    model = tiny_gemma2(dropout=0.1)
    expected = model(input_ids=ids).logits
    use_seeded_dropout_attention(model)
    assert model.config._attn_implementation == RECOMPUTED_DROPOUT_EAGER
    assert torch.equal(model(input_ids=ids).logits, expected)

    plain, switched = tiny_gemma2(dropout=0.0).train(), tiny_gemma2(dropout=0.0).train()
    use_seeded_dropout_attention(switched)
    assert switched.config._attn_implementation == RECOMPUTED_DROPOUT_EAGER
    (loss, grads), (ref_loss, ref_grads) = _loss_and_grads(switched), _loss_and_grads(plain)
    assert torch.equal(loss, ref_loss)
    assert all(torch.equal(g, r) for g, r in zip(grads, ref_grads, strict=True))


def eager_composition(q, k, v, bias, mask, scaling, p, seed, softcap):
    """Gemma2's eager arithmetic, (B, H, S, D) throughout, plus a bias; the dropout mask stored."""
    scores = torch.tanh(torch.matmul(q, k.transpose(2, 3)) * scaling / softcap) * softcap
    probs = torch.softmax(scores + bias + mask, dim=-1, dtype=torch.float32)
    return torch.matmul(probs * dropout_mul(torch.ones_like(probs), seed, p), v)


def _attention_inputs(dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=gen, dtype=dtype, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 3, 5, 5, generator=gen, dtype=dtype, requires_grad=True)
    allowed = torch.rand(2, 1, 5, 5, generator=gen) > 0.3
    allowed[..., 0] = True
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)  # eager's kind
    return (q, k, v, bias), mask


def test_softcapped_attention_equals_eager_composition_with_a_stored_mask():
    (q, k, v, bias), mask = _attention_inputs()
    scaling, seed = 1.5, torch.tensor(11)
    assert (torch.matmul(q, k.transpose(2, 3)) * scaling).abs().max() > 2 * SOFTCAP  # tanh saturates somewhere
    grad = torch.randn(2, 3, 5, 4, generator=torch.Generator().manual_seed(1))
    ours = _RecomputedDropoutAttention.apply(q, k, v, bias, mask, scaling, 0.25, seed, SOFTCAP)
    reference = eager_composition(q, k, v, bias, mask, scaling, 0.25, seed, SOFTCAP)
    assert torch.equal(ours, reference)
    inputs = (q, k, v, bias)
    expected = torch.autograd.grad(reference, inputs, grad)
    assert all(torch.equal(g, e) for g, e in zip(torch.autograd.grad(ours, inputs, grad), expected, strict=True))


def test_softcapped_attention_gradcheck_with_bias_and_mask():
    (q, k, v, bias), mask = _attention_inputs(torch.float64)

    def attention(q, k, v, bias):
        return _RecomputedDropoutAttention.apply(q, k, v, bias, mask, 1.5, 0.25, torch.tensor(11), SOFTCAP)

    assert torch.autograd.gradcheck(attention, (q, k, v, bias))


def test_seeded_eager_attention_saves_q_k_v_mask_and_a_seed_only():
    """Per call: q, the repeated k and v, the (B, 1, Sq, Sk) mask and an 8-byte seed; eager attention itself also
    keeps (B, H, Sq, Sk) probabilities and their dropout mask."""
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    module = tiny_gemma2().model.layers[0].self_attn.train()
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(BATCH, HEADS, SEQ, HEAD_DIM, generator=gen, requires_grad=True)
    k, v = (torch.randn(BATCH, KV_HEADS, SEQ, HEAD_DIM, generator=gen, requires_grad=True) for _ in range(2))
    mask = torch.zeros(BATCH, 1, SEQ, SEQ).masked_fill(torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1), -1e9)
    kwargs = {"dropout": 0.1, "scaling": HEAD_DIM**-0.5, "softcap": SOFTCAP}

    ours = measure_saved_activations(lambda: recomputed_dropout_eager(module, q, k, v, mask, **kwargs)[0].sum())
    qkv = 4 * BATCH * HEADS * SEQ * HEAD_DIM * 3  # float32 q, and k and v repeated to the query heads
    assert ours.by_op == {"_RecomputedDropoutAttention": qkv + 4 * BATCH * SEQ * SEQ + 8}
    assert all(t.shape != (BATCH, HEADS, SEQ, SEQ) for t in ours.tensors)

    theirs = measure_saved_activations(lambda: eager_attention_forward(module, q, k, v, mask, **kwargs)[0].sum())
    assert any(t.shape == (BATCH, HEADS, SEQ, SEQ) for t in theirs.tensors) and "dropout" in theirs.by_op
    assert theirs.total_bytes > ours.total_bytes


def test_gemma2_training_forward_keeps_no_attention_sized_tensor():
    ids = _token_ids()
    model = tiny_gemma2().train()
    before = measure_saved_activations(lambda: model(input_ids=ids, labels=ids).loss, model)
    use_seeded_dropout_attention(model)
    after = measure_saved_activations(lambda: model(input_ids=ids, labels=ids).loss, model)
    assert before.by_op["dropout"] > 0 and "dropout" not in after.by_op
    assert all(t.shape != (BATCH, HEADS, SEQ, SEQ) for t in after.tensors)
    # per layer q, k, v (B * H, S, D) and a seed; the sliding-window and the full (B, 1, S, S) masks
    layer = 4 * 3 * BATCH * HEADS * SEQ * HEAD_DIM + 8
    assert after.by_op["_RecomputedDropoutAttention"] == 2 * layer + 2 * 4 * BATCH * SEQ * SEQ
    assert after.total_bytes < before.total_bytes


def tiny_falcon(alibi: bool, attn_implementation: str | None = None) -> nn.Module:
    """A 2-layer Falcon with attention dropout 0.1 (hidden dropout 0: its inline dropout_add keeps a mask)."""
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(0)
    config = FalconConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=HEADS, hidden_dropout=0.0,
        attention_dropout=0.1, alibi=alibi, max_position_embeddings=64, initializer_range=0.2, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, attn_implementation=attn_implementation,
    )  # fmt: skip
    return FalconForCausalLM(config).train()


@pytest.mark.skipif(not falcon_calls_the_attention_interface(), reason="Falcon has its own attention before 5.25")
@pytest.mark.parametrize("alibi", [False, True], ids=["rotary", "alibi"])
def test_falcon_on_the_attention_interface_keeps_a_seed_and_equals_its_eager_attention(alibi, monkeypatch):
    """Falcon on transformers' attention interface switches like LLaMA: loss and gradients equal Falcon's eager
    attention whose dropout stores the same masks (ALiBi travels in the additive mask), and no tensor of attention
    shape (B, H, S, S) is kept."""
    ours, reference = tiny_falcon(alibi), tiny_falcon(alibi, "eager")
    changed, kept, own = keep_dropout_seeds(ours)
    assert "attn_implementation" in changed and own == {} and not [key for key in kept if "attention" in key]
    assert ours.config._attn_implementation == RECOMPUTED_DROPOUT_SDPA
    loss, grads = _loss_and_grads(ours)
    with monkeypatch.context() as patch:
        patch.setattr(torch.nn.functional, "dropout", stored_mask_dropout)
        ref_loss, ref_grads = _loss_and_grads(reference)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert len(grads) == len(ref_grads) == len(list(ours.parameters()))
    for grad, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-6)
    torch.manual_seed(0)
    ids = _token_ids()
    assert not torch.equal(ours(input_ids=ids, labels=ids).loss, loss)  # dropout is live
    report = measure_saved_activations(lambda: ours(input_ids=ids, labels=ids).loss, ours)
    assert "dropout" not in report.by_op
    # per layer q, k, v (B, H, S, D) and a seed; one mask for both layers: ALiBi's float (B, H, S, S) bias, or the
    # boolean causal (S, S) mask; Falcon's eager attention keeps (B, H, S, S) probabilities and a mask per layer
    mask = 4 * BATCH * HEADS * SEQ * SEQ if alibi else SEQ * SEQ
    assert report.by_op["_RecomputedDropoutAttention"] == 2 * (4 * 3 * BATCH * HEADS * SEQ * HEAD_DIM + 8) + mask
    attention_shaped = [t.op for t in report.tensors if t.shape == (BATCH, HEADS, SEQ, SEQ)]
    assert attention_shaped == (["_RecomputedDropoutAttention"] if alibi else [])
