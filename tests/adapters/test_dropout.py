"""Seed-kept dropout: exact equality with stored-mask references, and nothing mask-sized saved."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import VOCAB, tiny_llama, tiny_roberta, tiny_t5
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from lightning_lorafa import LoraFALinear
from lightning_lorafa.adapters import dropout as dropout_module
from lightning_lorafa.adapters.dropout import RecomputedDropout
from lightning_lorafa.adapters.dropout_masks import draw_seed, dropout_mul, effective_p
from lightning_lorafa.adapters.seeded_attention import _RecomputedDropoutAttention
from lightning_lorafa.model.attention import RECOMPUTED_DROPOUT_SDPA
from lightning_lorafa.model.dropouts import keep_dropout_seeds
from lightning_lorafa.profiling import measure_saved_activations

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


class StoredMaskDropout(nn.Module):
    """Reference: the same seed draws and masks as RecomputedDropout, but autograd stores the mask."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return x * dropout_mul(torch.ones_like(x), draw_seed(x.device), self.p)


def stored_mask_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Reference: eager attention whose probability dropout draws the seed at the same point, mask stored."""
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is None and module.is_causal:
        attention_mask = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1)
    probs = probs * dropout_mul(torch.ones_like(probs), draw_seed(probs.device), dropout)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


AttentionInterface.register("stored_mask_reference", stored_mask_attention)
AttentionMaskInterface.register("stored_mask_reference", sdpa_mask)


@pytest.mark.parametrize("device", DEVICES)
def test_recomputed_dropout_equals_stored_mask_reference(device):
    x = torch.randn(4, 7, 33, device=device, requires_grad=True)
    grad = torch.randn(4, 7, 33, device=device)
    outputs, grads = [], []
    for module in (RecomputedDropout(0.3), StoredMaskDropout(0.3)):
        torch.manual_seed(5)
        y = module.train()(x)
        outputs.append(y)
        grads.append(torch.autograd.grad(y, x, grad)[0])
    assert torch.equal(outputs[0], outputs[1])
    assert torch.equal(grads[0], grads[1])
    dropped = (outputs[0] == 0).float().mean().item()
    assert 0.2 < dropped < 0.4
    assert torch.equal(grads[0] == 0, outputs[0] == 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_mul_is_a_seeded_unbiased_dropout_mask(device, p):
    shape = torch.Size([2, 500, 1001])  # odd element count: the last 64-bit draw is used in part
    ones = torch.ones(shape, device=device)
    seed, other = torch.tensor(17, device=device), torch.tensor(18, device=device)
    scale = dropout_mul(ones, seed, p)
    assert scale.shape == shape and scale.device.type == device
    assert abs(effective_p(p) - p) <= 2**-17
    assert scale.unique().tolist() == [0.0, pytest.approx(1 / (1 - effective_p(p)))]
    dropped = (scale == 0).double().mean().item()
    assert abs(dropped - p) < 0.003  # ~1e6 draws: the standard error is below 5e-4
    assert abs(scale.double().mean().item() - 1.0) < 0.01
    assert torch.equal(scale, dropout_mul(ones, seed, p))
    assert not torch.equal(scale, dropout_mul(ones, other, p))
    half = dropout_mul(ones.bfloat16(), seed, p)
    assert half.dtype == torch.bfloat16 and torch.equal(half == 0, scale == 0)
    strided = dropout_mul(ones.transpose(0, 2), seed, p)  # masks follow the logical element order
    assert strided.is_contiguous() and torch.equal(strided, scale.view(1001, 500, 2))


def test_recomputed_dropout_saves_its_seed_where_nn_dropout_saves_its_mask():
    x = torch.randn(8, 16, 32, requires_grad=True)
    ours = measure_saved_activations(lambda: RecomputedDropout(0.1).train()(x))
    assert ours.by_op == {"dropout seed": 8}  # one int64 seed
    stored = measure_saved_activations(lambda: nn.Dropout(0.1).train()(x))
    assert stored.total_bytes == x.numel() * x.element_size()  # on CPU, nn.Dropout keeps a float mask


def test_recomputed_dropout_modes_and_arguments():
    x = torch.randn(3, 5)
    state = torch.get_rng_state()
    assert RecomputedDropout(0.5).eval()(x) is x
    assert RecomputedDropout(0.0).train()(x) is x
    assert torch.equal(torch.get_rng_state(), state)  # neither drew a seed
    assert torch.equal(RecomputedDropout(1.0).train()(x), torch.zeros_like(x))
    with pytest.raises(ValueError, match="between 0 and 1"):
        RecomputedDropout(1.5)


def test_attention_kernel_gradcheck_with_bias_and_mask():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 3, 5, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 1, 5, 5, generator=gen) > 0.3
    mask[..., 0] = True

    def attention(q, k, v, bias):
        return _RecomputedDropoutAttention.apply(q, k, v, bias, mask, 0.5, 0.25, torch.tensor(11))

    assert torch.autograd.gradcheck(attention, (q, k, v, bias))


def _loss_and_grads(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor):
    torch.manual_seed(123)
    loss = model(input_ids=input_ids, labels=labels).loss
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    return loss, grads


def _stored_mask_copy(model: nn.Module) -> nn.Module:
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Dropout:
                setattr(module, name, StoredMaskDropout(child.p))
    model.set_attn_implementation("stored_mask_reference")
    return model


def _llama_with_attention_dropout() -> nn.Module:
    model = tiny_llama()
    for module in model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.1
    return model


@pytest.mark.parametrize("cpu_fused_min_numel", [None, 0], ids=["default-paths", "fused-path"])
@pytest.mark.parametrize(
    "build", [lambda: tiny_roberta(dropout=0.1), _llama_with_attention_dropout], ids=["roberta", "llama"]
)
def test_model_loss_and_grads_identical_to_stored_mask_reference(build, cpu_fused_min_numel, monkeypatch):
    """Same seed draws in the same order: the recomputed and the stored-mask model agree bit for bit, whether
    each dropout takes the product path or (as CPU tensors of ``CPU_FUSED_MIN_NUMEL`` entries do) the fused one."""
    if cpu_fused_min_numel is not None:
        monkeypatch.setattr(dropout_module, "CPU_FUSED_MIN_NUMEL", cpu_fused_min_numel)
    path = type(dropout_module.seeded_dropout(torch.ones(3, requires_grad=True), 0.5).grad_fn).__name__
    assert path == ("AddcmulBackward0" if cpu_fused_min_numel is None else "_SeededDropoutBackward")
    recomputed = build().train()
    reference = copy.deepcopy(recomputed)
    input_ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = input_ids if recomputed.config.model_type == "llama" else torch.tensor([0, 1])
    changed, _, _ = keep_dropout_seeds(recomputed)
    assert changed[-1] == "attn_implementation"
    _stored_mask_copy(reference)
    loss, grads = _loss_and_grads(recomputed, input_ids, labels)
    ref_loss, ref_grads = _loss_and_grads(reference, input_ids, labels)
    assert torch.equal(loss, ref_loss)
    assert len(grads) == len(ref_grads) > 0
    assert all(torch.equal(g, r) for g, r in zip(grads, ref_grads, strict=True))
    torch.manual_seed(0)
    other_seed = recomputed(input_ids=input_ids, labels=labels).loss
    assert not torch.equal(other_seed, loss)  # dropout is live: a different seed gives a different loss


def test_replace_dropout_keeps_p_mode_and_eval_outputs(input_ids):
    model = tiny_roberta(dropout=0.1)
    expected = model(input_ids=input_ids).logits
    changed, _, _ = keep_dropout_seeds(model)
    dropouts = [name for name, m in model.named_modules() if isinstance(m, RecomputedDropout)]
    assert changed == dropouts + ["attn_implementation"]
    assert len(dropouts) == 1 + 2 * 3 + 1  # embeddings, 3 per layer, classifier
    assert not any(type(m) is nn.Dropout for m in model.modules())
    assert all(m.p == 0.1 and not m.training for m in model.modules() if isinstance(m, RecomputedDropout))
    assert model.config._attn_implementation == RECOMPUTED_DROPOUT_SDPA
    assert torch.equal(model(input_ids=input_ids).logits, expected)
    assert keep_dropout_seeds(model) == ([], {}, {})


@pytest.mark.parametrize("build", [tiny_t5, tiny_llama], ids=["t5", "llama"])
def test_replace_dropout_switches_t5_and_llama_attention(build):
    model = build()
    changed, _, _ = keep_dropout_seeds(model)
    assert "attn_implementation" in changed
    assert model.config._attn_implementation == RECOMPUTED_DROPOUT_SDPA


def test_t5_training_forward_matches_sdpa_without_dropout_and_trains_with_it():
    """T5 passes its relative position bias to attention; with p=0 the kernel is transformers' SDPA."""
    model = tiny_t5().train()
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    expected = model(input_ids=ids, labels=ids).loss
    keep_dropout_seeds(model)
    assert torch.equal(model(input_ids=ids, labels=ids).loss, expected)
    for module in model.modules():
        if hasattr(module, "relative_attention_num_buckets"):
            module.dropout = 0.2
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    bias = model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
    assert torch.isfinite(loss) and bias.grad is not None and bias.grad.abs().sum() > 0


def test_no_saved_tensor_is_a_dropout_mask_after_replace_dropout():
    batch, seq = 4, 16
    input_ids = torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 0, 1])

    def saved(model):
        return measure_saved_activations(lambda: model(input_ids=input_ids, labels=labels).loss, model)

    model = tiny_roberta(dropout=0.1).train()
    before = saved(model)
    assert before.by_op["dropout"] > 0  # the check below can fail: nn.Dropout and SDPA's fallback keep masks
    keep_dropout_seeds(model)
    after = saved(model)
    assert "dropout" not in after.by_op
    kept_by = {"_RecomputedDropoutAttention", "layer_norm", "linear", "gelu", "embedding", "tanh", "cross_entropy"}
    kept_by.add("dropout seed")
    assert {t.op for t in after.tensors} <= kept_by
    assert all(t.nbytes == 8 for t in after.tensors if t.op == "dropout seed")  # a seed each, no mask
    assert after.total_bytes < before.total_bytes


def test_t5_trains_under_bf16_autocast_with_recomputed_attention_dropout():
    """T5 adds a float32 position bias to bf16 scores: backward must cope with the mixed dtypes."""
    from transformers import T5Config, T5ForConditionalGeneration

    from lightning_lorafa import apply_lorafa

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=96,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        dropout_rate=0.1,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    model = T5ForConditionalGeneration(config).train()
    apply_lorafa(model, r=4, target_modules=["q", "k", "v", "o", "wi", "wo"], dropout=0.1)
    keep_dropout_seeds(model)
    ids = torch.randint(1, 90, (2, 7))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if n.endswith("lora_B")]
    assert len(grads) == 32 and all(g is not None and torch.isfinite(g).all() for g in grads)


def _graph_nodes(tensor: torch.Tensor) -> list[str]:
    """Class names of every autograd node behind ``tensor``."""
    seen, stack, names = set(), [tensor.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def test_eager_backward_of_seeded_dropout_is_autograd_s_own_node():
    """In eager mode the masked product is one ATen op whose saved mask is a seed: backward runs autograd's C++
    node (plus a small unpack), no Python ``autograd.Function``."""
    x = torch.randn(4, 8, requires_grad=True)
    assert type(RecomputedDropout(0.3).train()(x).grad_fn).__name__ == "AddcmulBackward0"
    layer = LoraFALinear(nn.Linear(8, 6), r=2, alpha=4, dropout=0.3).train()
    nodes = _graph_nodes(layer(x))
    assert "MulBackward0" in nodes  # x * mask on the branch
    assert not any(name.startswith("_") or "Seeded" in name for name in nodes), nodes


def test_outer_saved_tensor_hooks_see_the_seed_and_backward_still_rebuilds_the_mask():
    """Hooks around the model (a checkpoint's, an offloader's, the recorder's) get the seed to pack, not the mask."""
    x = torch.randn(6, 40, requires_grad=True)
    packed = []

    def pack(tensor):
        packed.append((tuple(tensor.shape), tensor.dtype))
        return tensor.clone()  # like an offloader: unpack returns a copy

    torch.manual_seed(9)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = RecomputedDropout(0.4).train()(x)
    (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))
    assert packed == [((), torch.int64)]  # the seed only
    torch.manual_seed(9)
    reference = StoredMaskDropout(0.4).train()(x)
    assert torch.equal(out, reference)
    assert torch.equal(grad, torch.autograd.grad(reference, x, torch.ones_like(reference))[0])
