"""Selective recomputation (``apply_recompute``, ``LoraFA(recompute=...)``): same losses and B gradients, and
exactly the MLP's inner activations less saved for backward."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import VOCAB, TwoLayerNet, classification_batches, randomize_lora_B, tiny_llama, tiny_roberta, tiny_t5
from lightning.pytorch.strategies import FSDPStrategy
from transformers.models.llama.modeling_llama import LlamaMLP

from lightning_lorafa import (
    LoraFA,
    LoraFAModelParallelStrategy,
    apply_lorafa,
    convert_before_sharding,
    create_lorafa_optimizer,
    fully_shard_blocks,
)
from lightning_lorafa.adapters.dropout import RecomputedDropout
from lightning_lorafa.model.dropouts import keep_dropout_seeds
from lightning_lorafa.model.recompute import RecomputedMLP, apply_recompute, check_recompute_strategy, find_mlps
from lightning_lorafa.profiling import measure_saved_activations

R = 4
BATCH, SEQ = 2, 16
N = BATCH * SEQ  # tokens
FP32 = 4  # bytes


def ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))


def roberta_batch() -> dict:
    return {"input_ids": ids(), "labels": torch.tensor([0, 1])}


def lm_batch() -> dict:
    return {"input_ids": ids(), "labels": ids(), "use_cache": False}


def build(family: str, recompute: str) -> torch.nn.Module:
    """A tiny model with dropout 0.1 on the model (RoBERTa; T5 below) and on the adapters, set up like the
    ``LoraFA`` callback does it, B non-zero."""
    builders = {"roberta": lambda: tiny_roberta(dropout=0.1), "llama": tiny_llama, "t5": tiny_t5, "gpt2": tiny_gpt2}
    model = builders[family]().train()
    if family == "t5":
        model.config.dropout_rate = 0.1
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.1
    apply_lorafa(model, r=R, alpha=2 * R, dropout=0.1)
    keep_dropout_seeds(model)
    randomize_lora_B(model)
    apply_recompute(model, recompute)
    return model


BATCHES = {"roberta": roberta_batch, "llama": lm_batch, "t5": lm_batch, "gpt2": lm_batch}


def tiny_gpt2() -> torch.nn.Module:
    """A 2-layer GPT-2 (transformers' Conv1D linears) with every dropout at 0.1."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.1)
    return GPT2LMHeadModel(config).eval()


def loss_and_B_grads(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(123)  # the dropout seeds are drawn from here
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if n.endswith("lora_B")}


@pytest.mark.parametrize("family", ["roberta", "llama", "t5", "gpt2"])
@pytest.mark.parametrize("recompute", ["mlp", "block"])
def test_recompute_gives_the_same_loss_and_B_gradients(family, recompute):
    loss, grads = loss_and_B_grads(build(family, "none"), BATCHES[family]())
    loss_r, grads_r = loss_and_B_grads(build(family, recompute), BATCHES[family]())
    assert grads.keys() == grads_r.keys() and len(grads) >= 8  # GPT-2: 4 linears a layer
    if family == "t5" and recompute == "block":
        # Under gradient checkpointing transformers' T5 makes its position bias require a gradient, and CPU SDPA
        # then takes another kernel for the attention (same math, other rounding); the shared bias's gradient
        # also sums in another order.
        torch.testing.assert_close(loss_r, loss, rtol=1e-6, atol=0)
    else:
        assert torch.equal(loss, loss_r)
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        if family == "t5" and recompute == "block":
            torch.testing.assert_close(grads_r[name], grad, rtol=1e-5, atol=1e-7, msg=name)
        else:
            assert torch.equal(grad, grads_r[name]), name


def test_dropout_masks_are_drawn_and_reproduced():
    """The equality above is not trivial: another dropout draw changes the loss."""
    model = build("roberta", "mlp")
    torch.manual_seed(123)
    first = model(**roberta_batch()).loss
    torch.manual_seed(124)
    assert not torch.equal(first, model(**roberta_batch()).loss)


def saved_bytes(family: str, recompute: str) -> tuple[int, dict[str, int]]:
    model = build(family, recompute)
    report = measure_saved_activations(lambda: model(**BATCHES[family]()).loss, module=model)
    return report.total_bytes, report.by_op


def seed_bytes() -> int:
    """What one seed-keeping dropout call keeps for backward: its seed."""
    x = torch.ones(4, requires_grad=True)
    return measure_saved_activations(lambda: RecomputedDropout(0.1).train()(x)).total_bytes


def test_mlp_recompute_saves_exactly_the_inner_activations():
    """Per MLP, what is no longer kept minus the MLP input that the checkpoint keeps (tokens x d). Each MLP
    also stops keeping three dropout seeds: two or three LoRA-FA branches' and the model's own dropout's."""
    seed = seed_bytes()
    # RoBERTa (d 32, d_ff 64, 2 layers): GELU input (N, d_ff); output LayerNorm input (N, d), mean and rstd
    # (N, 1) each; h of intermediate.dense and output.dense (N, r) each.
    d, d_ff, layers = 32, 64, 2
    none, ops = saved_bytes("roberta", "none")
    mlp, ops_mlp = saved_bytes("roberta", "mlp")
    per_layer = (N * d_ff + N * d + 2 * N + 2 * N * R - N * d) * FP32 + 3 * seed  # 2 branches, 1 dropout
    assert none - mlp == layers * per_layer == 18944 + 6 * seed
    assert "gelu" in ops and "gelu" not in ops_mlp
    assert ops_mlp["checkpoint_mlp"] == layers * N * d * FP32  # each MLP input, kept once
    assert ops["layer_norm"] - ops_mlp["layer_norm"] == layers * (N * d + 2 * N) * FP32

    # LLaMA (d 32, d_ff 64, 2 layers): gate output (SiLU input), SiLU output and up output (N, d_ff) each;
    # h of gate/up_proj (N, r) each (down_proj, outside the region, keeps its h).
    none, ops = saved_bytes("llama", "none")
    mlp, ops_mlp = saved_bytes("llama", "mlp")
    assert none - mlp == layers * ((3 * N * d_ff + 2 * N * R - N * d) * FP32 + 2 * seed) == 43008 + 4 * seed
    assert "silu" in ops and "silu" not in ops_mlp
    assert ops_mlp["checkpoint_mlp"] == layers * N * d * FP32

    # T5 (d 32, d_ff 64, 2 encoder + 2 decoder blocks; ReLU): ReLU output (N, d_ff); h of wi and wo (N, r).
    none, ops = saved_bytes("t5", "none")
    mlp, ops_mlp = saved_bytes("t5", "mlp")
    assert none - mlp == 4 * ((N * d_ff + 2 * N * R - N * d) * FP32 + 3 * seed) == 20480 + 12 * seed  # wi, wo, dropout
    assert "relu" in ops and "relu" not in ops_mlp


def test_block_recompute_keeps_little_more_than_block_inputs():
    none, _ = saved_bytes("llama", "none")
    mlp, _ = saved_bytes("llama", "mlp")
    block, ops = saved_bytes("llama", "block")
    assert block < mlp < none
    assert "silu" not in ops and "scaled_dot_product_attention" not in ops


def test_mlps_are_found_by_structure():
    assert set(find_mlps(tiny_roberta())) == {f"roberta.encoder.layer.{i}" for i in (0, 1)}
    assert {n: m for n, (_, m) in find_mlps(tiny_llama()).items()} == {
        f"model.layers.{i}.mlp": "forward" for i in (0, 1)
    }
    assert len(find_mlps(tiny_t5())) == 4
    assert {n: m for n, (_, m) in find_mlps(tiny_gpt2()).items()} == {
        f"transformer.h.{i}.mlp": "forward" for i in (0, 1)
    }
    model = tiny_llama()
    apply_lorafa(model, r=R, alpha=8)  # found in converted models as well
    assert apply_recompute(model, "mlp") == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert apply_recompute(tiny_roberta(), "mlp") == [f"roberta.encoder.layer.{i}.feed_forward_chunk" for i in (0, 1)]


def test_block_recompute_finds_a_transformers_model_inside_a_container():
    container = torch.nn.ModuleDict({"lm": tiny_llama()})
    assert apply_recompute(container, "block") == ["lm.model.layers.0", "lm.model.layers.1"]
    assert not container["lm"]._require_grads_hooks  # inputs need no gradient without re-entrance


def test_state_dict_is_unchanged_and_applying_twice_changes_nothing():
    model = tiny_llama()
    apply_lorafa(model, r=R, alpha=8)
    keys = list(model.state_dict())
    names = apply_recompute(model, "mlp")
    mlp = model.model.layers[0].mlp
    recomputed = type(mlp)
    assert recomputed.__name__ == "RecomputedLlamaMLP" and isinstance(mlp, LlamaMLP)
    assert type(model.model.layers[1].mlp) is recomputed  # one class per MLP class
    assert "forward" not in vars(mlp)  # the class overrides it, not the instance
    assert apply_recompute(model, "mlp") == names
    assert type(mlp) is recomputed and recomputed.__bases__ == (RecomputedMLP, LlamaMLP)
    assert list(model.state_dict()) == keys
    assert apply_recompute(model, "none") == []


def test_recomputed_model_pickles_and_copies(tmp_path):
    """``torch.save(model)`` / ``torch.load`` and ``copy.deepcopy`` keep the recomputing classes and the
    results: the same loss and B gradients as the original."""
    import copy

    model = build("roberta", "mlp")
    torch.save(model, tmp_path / "model.pt")
    for other in (torch.load(tmp_path / "model.pt", weights_only=False), copy.deepcopy(model)):
        layer = other.roberta.encoder.layer[0]
        assert type(layer) is type(model.roberta.encoder.layer[0]) and layer.recomputed_method == "feed_forward_chunk"
        loss, grads = loss_and_B_grads(model, roberta_batch())
        loss_o, grads_o = loss_and_B_grads(other, roberta_batch())
        assert torch.equal(loss, loss_o) and all(torch.equal(g, grads_o[n]) for n, g in grads.items())
        model.zero_grad()
    llama = build("llama", "mlp")
    assert copy.deepcopy(llama).model.layers[0].mlp.recomputes_gated_product


def test_a_forward_replaced_on_the_instance_is_refused():
    """It would shadow the recomputing subclass's method: recompute='mlp' would silently do nothing there."""
    model = tiny_llama()
    mlp = model.model.layers[1].mlp
    mlp.forward = mlp.forward  # e.g. a user's own wrapper, bound to the instance
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.forward is already replaced on the instance"):
        apply_recompute(model, "mlp")


def test_no_grad_forward_is_unchanged():
    model = build("llama", "mlp").eval()
    reference = build("llama", "none").eval()
    with torch.no_grad():
        assert torch.equal(model(**lm_batch()).logits, reference(**lm_batch()).logits)


def test_bad_input_is_refused_clearly():
    with pytest.raises(ValueError, match="found no MLP in TwoLayerNet"):
        apply_recompute(TwoLayerNet(), "mlp")
    with pytest.raises(ValueError, match="needs a transformers model"):
        apply_recompute(TwoLayerNet(), "block")
    with pytest.raises(ValueError, match="recompute must be one of"):
        apply_recompute(tiny_llama(), "attention")
    with pytest.raises(ValueError, match="recompute must be one of"):
        LoraFA(recompute="full")
    model = tiny_llama()
    apply_recompute(model, "mlp")
    with pytest.raises(ValueError, match="MLPs are recomputed already"):
        apply_recompute(model, "block")
    model = tiny_llama()
    apply_recompute(model, "block")
    with pytest.raises(ValueError, match="already checkpoints whole blocks"):
        apply_recompute(model, "mlp")
    policy = FSDPStrategy(activation_checkpointing_policy={torch.nn.Linear})
    with pytest.raises(ValueError, match="checkpoints whole blocks already"):
        check_recompute_strategy("mlp", policy)
    check_recompute_strategy("none", policy)
    check_recompute_strategy("block", FSDPStrategy())


class Classifier(pl.LightningModule):
    """Tiny RoBERTa with dropout 0.1; ``shard=True`` builds it in ``configure_model`` and applies FSDP2."""

    def __init__(self, shard: bool = False) -> None:
        super().__init__()
        self.shard = shard
        self.model = None if shard else tiny_roberta(dropout=0.1).train()

    def configure_model(self) -> None:
        if self.model is None:
            self.model = tiny_roberta(dropout=0.1).train()
            convert_before_sharding(self)
            fully_shard_blocks(self.model, self.device_mesh["data_parallel"])

    def training_step(self, batch, batch_idx):
        input_ids, labels = batch
        return self.model(input_ids=input_ids, labels=labels).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


data = classification_batches


def fit(root, recompute: str, epochs: int, ckpt_path=None, **kwargs) -> tuple[pl.Trainer, Classifier]:
    torch.manual_seed(0)
    module = Classifier(shard=isinstance(kwargs.get("strategy"), LoraFAModelParallelStrategy))
    trainer = pl.Trainer(
        max_epochs=epochs,
        **kwargs,
        callbacks=[LoraFA(r=R, alpha=8, dropout=0.1, modules_to_save=["classifier"], recompute=recompute)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    trainer.fit(module, data(), ckpt_path=ckpt_path)
    return trainer, module


def trained(module: pl.LightningModule) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def test_callback_trains_the_same_and_resumes_exactly(tmp_path):
    _, plain = fit(tmp_path / "none", "none", epochs=2)
    _, straight = fit(tmp_path / "mlp", "mlp", epochs=2)
    first, half = fit(tmp_path / "half", "mlp", epochs=1)
    assert find_mlps(straight.model)["roberta.encoder.layer.0"][0].recomputed_method == "feed_forward_chunk"
    _, resumed = fit(tmp_path / "half", "mlp", epochs=2, ckpt_path=first.checkpoint_callback.best_model_path)
    expected, got, resumed_state = trained(plain), trained(straight), trained(resumed)
    assert len([n for n in expected if n.endswith("lora_B")]) == 12
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
        assert torch.equal(resumed_state[name], value), name
        assert not torch.equal(trained(half)[name], value), name


def one_step(model: torch.nn.Module, step_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    optimizer = create_lorafa_optimizer(model, lr=1e-2)
    loss = step_model(**lm_batch()).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    return {n: p.detach() for n, p in model.named_parameters() if n.endswith("lora_B")}


def test_compiled_model_with_mlp_recompute_trains():
    """torch.compile (AOT autograd, no C++ codegen, to stay fast) traces the checkpointed MLPs; the step
    matches the eager one. LoRA dropout 0: the compiled graph has no dropout seed to draw."""
    torch._dynamo.reset()
    model, eager = tiny_llama().train(), tiny_llama().train()
    for m in (model, eager):
        apply_lorafa(m, r=R, alpha=2 * R)
        randomize_lora_B(m)
        apply_recompute(m, "mlp")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("lora_B")}
    compiled = one_step(model, torch.compile(model, backend="aot_eager"))
    expected = one_step(eager, eager)
    for name, value in compiled.items():
        assert not torch.equal(value, before[name]), name
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_4bit_base_with_mlp_recompute_trains_the_same_and_keeps_less(tmp_path):
    """NF4 frozen base (bitsandbytes; CPU here, CUDA where present): recomputing the MLP runs its 4-bit
    matmuls again in backward; loss and B gradients are those without it, and the saved bytes drop by the
    MLP's three (N, d_ff) tensors in the compute dtype and the MLP branches' bytes, less the MLP inputs."""
    pytest.importorskip("bitsandbytes")
    from lightning_lorafa.model.quantization import load_quantized_model, quantization_device

    tiny_llama().save_pretrained(tmp_path / "llama")
    device = quantization_device("nf4")
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in lm_batch().items()}
    results = {}
    for recompute in ("none", "mlp"):
        model = load_quantized_model(str(tmp_path / "llama"), "nf4").train()
        apply_lorafa(model, r=R, alpha=2 * R, dropout=0.1)
        randomize_lora_B(model)
        apply_recompute(model, recompute)
        report = measure_saved_activations(lambda m=model: m(**batch).loss, module=model)
        results[recompute] = (report.total_bytes, report.by_op, *loss_and_B_grads(model, batch))
    (none, ops, loss, grads), (mlp, ops_mlp, loss_r, grads_r) = results["none"], results["mlp"]
    assert torch.equal(loss, loss_r)
    assert len(grads) == 14 and all(torch.equal(grads_r[n], g) and g.abs().sum() > 0 for n, g in grads.items())
    size, d, d_ff, layers = model.dtype.itemsize, 32, 64, 2  # bf16 activations
    kept = [op.get("lora_fa_branch", 0) + op.get("dropout seed", 0) for op in (ops, ops_mlp)]  # h and seeds
    branches = kept[0] - kept[1]
    assert ops_mlp["checkpoint_mlp"] == layers * N * d * size and "silu" not in ops_mlp
    assert none - mlp == layers * (3 * N * d_ff - N * d) * size + branches
    assert branches > 0


def test_two_processes_ddp_fsdp2_and_fsdp1_train_the_same_with_recompute(tmp_path):
    """2 CPU processes (gloo): under DDP, FSDP2 (Lightning) and FSDP1 (torch's, one unit per layer, B corrected
    in backward), recompute='mlp' and 'block' give the B of recompute='none'."""
    tests = str(Path(__file__).resolve().parents[1])  # conftest, for this file run as a script (and its rank 1)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, __file__, str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for rank in (0, 1):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert set(result) == {"ddp", "fsdp2", "fsdp1"}
        for strategy, runs in result.items():
            assert len([n for n in runs["none"] if n.endswith("lora_B")]) == 12, strategy
            assert all(v.abs().sum() > 0 for n, v in runs["none"].items() if n.endswith("lora_B")), strategy
            for recompute in ("mlp", "block"):
                for name, value in runs["none"].items():
                    assert torch.equal(runs[recompute][name], value), (strategy, recompute, name)


def two_process_worker(out: Path) -> None:
    """Run by the test above (Lightning starts rank 1 by running this file again)."""
    result = {}
    for kind in ("ddp", "fsdp2"):
        result[kind] = {}
        for recompute in ("none", "mlp", "block"):
            strategy = (
                "ddp" if kind == "ddp" else LoraFAModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
            )
            root = out / kind / recompute
            trainer, module = fit(root, recompute, epochs=1, accelerator="cpu", devices=2, strategy=strategy)
            result[kind][recompute] = {
                n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                for n, p in module.named_parameters()
                if p.requires_grad
            }
    result["fsdp1"] = {recompute: fsdp1_trained(recompute) for recompute in ("none", "mlp", "block")}
    torch.save(result, out / f"rank{trainer.global_rank}.pt")


def fsdp1_trained(recompute: str) -> dict[str, torch.Tensor]:
    """Torch's FSDP1 (one unit per RoBERTa layer, original parameters, B corrected in backward as under
    ``strategy="fsdp"``) on the process group the fits above leave: 4 steps on this rank's half of each batch."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.roberta.modeling_roberta import RobertaLayer

    from lightning_lorafa.lightning.strategies import prepare_for_strategy

    torch.manual_seed(0)
    model = tiny_roberta(dropout=0.1).train()
    apply_lorafa(model, r=R, alpha=8, dropout=0.1, modules_to_save=["classifier"])
    keep_dropout_seeds(model)
    apply_recompute(model, recompute)
    prepare_for_strategy(model, FSDPStrategy(use_orig_params=True))
    sharded = FullyShardedDataParallel(
        model, auto_wrap_policy=ModuleWrapPolicy({RobertaLayer}), device_id=torch.device("cpu"), use_orig_params=True
    )
    optimizer = create_lorafa_optimizer(sharded, lr=1e-2)
    rank = torch.distributed.get_rank()
    for input_ids, labels in data():
        sharded(input_ids=input_ids[rank::2], labels=labels[rank::2]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with FullyShardedDataParallel.summon_full_params(sharded):
        return {
            n.replace("_fsdp_wrapped_module.", ""): p.detach().clone()
            for n, p in sharded.named_parameters()
            if p.requires_grad
        }


if __name__ == "__main__":
    two_process_worker(Path(sys.argv[1]))
