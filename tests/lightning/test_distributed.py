"""LoRA-FA with 2 CPU processes (gloo) under DDP and FSDP2, launched by Lightning (tests/workers/distributed_worker.py).

The ``test_two_processes_*`` tests each run the worker once (about 15 s): 2 epochs straight, and 1 epoch + checkpoint +
1 epoch resumed. The single-process reference sees the same 8 samples per step in one batch.
"""

from __future__ import annotations

import ast
import socket
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import TwoLayerNet, quiet_trainer, tiny_llama, tiny_roberta
from distributed_worker import EPOCHS, LR, Classifier, data, trained_tensors
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

from lightning_lorafa import LoraFA, LoraFAOptimizer, apply_lorafa, create_lorafa_optimizer
from lightning_lorafa.adapters.find import lorafa_layers
from lightning_lorafa.lightning.checkpoints import ADAPTER_ONLY_MARKER
from lightning_lorafa.lightning.sharding import transformer_block_classes
from lightning_lorafa.lightning.strategies import check_not_sharded, check_resume_supported, prepare_for_strategy
from lightning_lorafa.model.optim import keep_trainable_only

WORKER = Path(__file__).parents[1] / "workers" / "distributed_worker.py"


def run_worker(kind: str, out: Path) -> tuple[dict, dict]:
    """Run the 2-process worker; return rank 0's and rank 1's results."""
    done = subprocess.run([sys.executable, str(WORKER), kind, str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return tuple(torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in (0, 1))


def single_process_run(root: Path, moe: bool = False, lm: bool = False) -> dict[str, torch.Tensor]:
    """B and head after 2 epochs on one process, batch 8 (what 2 ranks with batch 4 each see per step)."""
    pl.seed_everything(0, verbose=False)
    head = "lm_head" if lm else "score" if moe else "classifier"
    trainer = quiet_trainer(
        root,
        accelerator="cpu",
        devices=1,
        max_epochs=EPOCHS,
        callbacks=[LoraFA(r=4, alpha=8, modules_to_save=[head], attn_implementation=None)],
    )
    trainer.fit(Classifier(shard=False, moe=moe, lm=lm), data(batch_size=8))
    assert trainer.global_step == 4
    return trained_tensors(trainer)


@pytest.fixture(scope="module")
def single_process_reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    return single_process_run(tmp_path_factory.mktemp("reference"))


@pytest.fixture(scope="module")
def single_process_moe_reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The same for the tiny Mixtral classifier (fused experts adapted)."""
    return single_process_run(tmp_path_factory.mktemp("moe-reference"), moe=True)


def check_two_process_run(rank0: dict, rank1: dict, reference: dict[str, torch.Tensor], num_B: int = 12) -> None:
    assert rank0["world_size"] == 2 and rank0["global_step"] == 4
    assert len([k for k in reference if k.endswith("lora_B")]) == num_B
    for key, expected in reference.items():
        assert torch.equal(rank0["straight"][key], rank1["straight"][key]), key  # same B on both ranks
        torch.testing.assert_close(rank0["straight"][key], expected, rtol=1e-4, atol=1e-6, msg=key)
        assert torch.equal(rank0["resumed"][key], rank0["straight"][key]), key  # resume is exact
        assert not torch.equal(rank0["half"][key], rank0["straight"][key]), key  # the resumed epoch trained


def test_two_processes_ddp_train_like_one_and_resume_exactly(tmp_path, single_process_reference):
    rank0, rank1 = run_worker("ddp", tmp_path)
    check_two_process_run(rank0, rank1, single_process_reference)
    assert rank0["types"] == ("Parameter", (32, 4), "Tensor", (4, 32))
    # DDP does not broadcast the frozen A before every forward: every rank draws the same A from its seed
    synced, synced_A = rank0["synced_buffers"]
    assert synced_A == 0 and synced > 0, rank0["synced_buffers"]  # the model's other buffers still are
    checkpoint = torch.load(tmp_path / "first" / "half.ckpt", weights_only=True)
    state = checkpoint["state_dict"]
    assert state.pop(ADAPTER_ONLY_MARKER).numel() == 1
    assert len([k for k in state if k.endswith(".lora_B")]) == 12
    assert all(k.endswith((".lora_A", ".lora_B")) or k.startswith("model.classifier.") for k in state)


def test_two_processes_fsdp2_row_sharded_B_trains_like_one_and_resumes_from_a_file(tmp_path, single_process_reference):
    rank0, rank1 = run_worker("fsdp2", tmp_path)
    check_two_process_run(rank0, rank1, single_process_reference)
    # B (32, 4) is a DTensor holding 16 rows per rank; A stays a whole, unsharded buffer
    assert rank0["types"] == ("DTensor", (16, 4), "Tensor", (4, 32))
    checkpoint = torch.load(tmp_path / "first" / "half.ckpt", weights_only=True)
    state = checkpoint["state_dict"]
    assert state.pop(ADAPTER_ONLY_MARKER).numel() == 1
    assert len([k for k in state if k.endswith(".lora_B")]) == 12 and len(state) == 28
    assert all(k.endswith((".lora_A", ".lora_B")) or k.startswith("model.classifier.") for k in state)
    assert state["model.roberta.encoder.layer.0.attention.self.query.lora_B"].shape == (32, 4)
    assert len(checkpoint["optimizer_states"][0]["state"]) == 16
    assert sorted(p.name for p in (tmp_path / "first").iterdir()) == ["half.ckpt"]


def test_two_processes_fsdp2_sharded_checkpoint_directory_resumes_exactly(tmp_path, single_process_reference):
    rank0, rank1 = run_worker("fsdp2-sharded", tmp_path)
    check_two_process_run(rank0, rank1, single_process_reference)
    directory = tmp_path / "first" / "half.ckpt"
    assert directory.is_dir() and (directory / "meta.pt").is_file()
    assert sorted(p.name for p in (tmp_path / "first").iterdir()) == ["half.ckpt"]  # no temp or old copy left


def test_two_processes_fsdp2_model_built_on_the_meta_device_trains_like_one(tmp_path, single_process_reference):
    """configure_model builds on meta, converts, shards, ``to_empty``, loads the base and resets each adapter:
    A from its seed and B zero, exactly the adapters of a model built on CPU, so training matches."""
    rank0, rank1 = run_worker("fsdp2-meta", tmp_path)
    check_two_process_run(rank0, rank1, single_process_reference)
    assert rank0["types"] == ("DTensor", (16, 4), "Tensor", (4, 32))


FSDP1_WORKER = Path(__file__).parents[1] / "workers" / "fsdp1_worker.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_fsdp1_flat_sharded_B_trains_like_one_and_resumes_exactly(tmp_path):
    """torch's FSDP1 on 2 CPU processes, B flattened into each unit's flat parameter and split across ranks: the
    correction in backward gives one process's B and AdamW state, and a checkpoint resumes bit for bit."""
    done = subprocess.run(
        [sys.executable, str(FSDP1_WORKER), str(tmp_path), str(free_port())],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = torch.load(tmp_path / "fsdp1.pt", weights_only=False)

    full = {key: tensor.numel() for key, tensor in result["straight"][0].items() if key.endswith("lora_B")}
    assert len(full) == 12
    local = result["local_numel"]  # each rank's element count of each B
    assert all(local[0][key] + local[1][key] == numel for key, numel in full.items())
    split = sorted(key for key in full if 0 < local[0][key] < full[key])
    assert split == [f"roberta.encoder.layer.{i}.attention.self.value.lora_B" for i in (0, 1)]  # ragged pieces

    torch.manual_seed(0)
    model = tiny_roberta().train()
    apply_lorafa(model, r=4, alpha=8, modules_to_save=["classifier"])
    optimizer = create_lorafa_optimizer(model, lr=LR, weight_decay=0.01)
    batches = list(data(batch_size=8))
    for step in range(4):
        input_ids, labels = batches[step % len(batches)]
        model(input_ids=input_ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    names = {id(p): name for name, p in model.named_parameters()}
    expected_state = {names[id(p)]: state for p, state in optimizer.state.items()}
    reference = model.state_dict()

    (adapter, optim), (resumed, resumed_optim) = result["straight"], result["resumed"]
    half_adapter, _ = result["half"]
    assert sorted(optim["state"]) == sorted(expected_state) and len(expected_state) == 16
    for key, tensor in adapter.items():
        torch.testing.assert_close(tensor, reference[key], rtol=1e-4, atol=1e-6, msg=key)
        assert torch.equal(resumed[key], tensor), key  # resume is exact
        if key.endswith("lora_B"):
            assert not torch.equal(half_adapter[key], tensor), key  # the resumed half trained
    for name, state in expected_state.items():
        for moment in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(optim["state"][name][moment], state[moment], rtol=1e-4, atol=1e-9, msg=name)
            assert torch.equal(resumed_optim["state"][name][moment], optim["state"][name][moment]), name
        assert optim["state"][name]["step"] == resumed_optim["state"][name]["step"] == 4


def test_in_backward_correction_equals_the_optimizer_correction():
    """Under FSDP1 the correction runs in backward; the update must be the same as correcting in step."""
    models = []
    for in_backward in (False, True):
        model = TwoLayerNet()
        apply_lorafa(model, r=3, alpha=6, modules_to_save=["head"])
        for layer in lorafa_layers(model).values():
            layer.correct_in_backward = in_backward
            with torch.no_grad():
                layer.lora_B.normal_(generator=torch.Generator().manual_seed(1))
        optimizer = create_lorafa_optimizer(model, lr=1e-2)
        x = torch.randn(5, 12, generator=torch.Generator().manual_seed(0))
        model(x).square().sum().backward()
        grads = {name: layer.lora_B.grad.clone() for name, layer in lorafa_layers(model).items()}
        optimizer.step()
        models.append((model, grads))
    (plain, raw), (early, corrected) = models
    for name in raw:
        assert not torch.allclose(raw[name], corrected[name], rtol=1e-2)
        torch.testing.assert_close(plain.get_submodule(name).lora_B, early.get_submodule(name).lora_B)


def test_fsdp1_strategy_corrects_in_backward_and_needs_original_params():
    model = TwoLayerNet()
    apply_lorafa(model, r=2, target_modules=["fc1", "fc2"])
    prepare_for_strategy(model, FSDPStrategy(use_orig_params=True))
    assert all(layer.correct_in_backward for layer in lorafa_layers(model).values())
    with pytest.raises(ValueError, match=r"needs use_orig_params=True.*ModelParallelStrategy with fully_shard"):
        prepare_for_strategy(model, FSDPStrategy(use_orig_params=False))


def test_sharded_unconverted_model_is_rejected():
    from torch.distributed.tensor import DTensor, Replicate
    from torch.distributed.tensor.device_mesh import DeviceMesh

    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", init_method="tcp://127.0.0.1:29581", rank=0, world_size=1)
    try:
        model = TwoLayerNet()
        mesh = DeviceMesh("cpu", [0])
        model.fc1.weight = torch.nn.Parameter(DTensor.from_local(model.fc1.weight.detach(), mesh, [Replicate()]))
        with pytest.raises(RuntimeError, match=r"already sharded .*convert_before_sharding\(self\)"):
            check_not_sharded(model)
        check_not_sharded(TwoLayerNet())
    finally:
        torch.distributed.destroy_process_group()


def attached(strategy) -> pl.LightningModule:
    """A converted module attached to a CPU trainer using ``strategy`` (not launched)."""
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=strategy, logger=False)
    module = Classifier(shard=False)
    apply_lorafa(module.model, r=2, alpha=4)
    module.trainer = trainer
    return module


def test_frozen_parameters_leave_a_users_optimizer_so_sharded_base_weights_are_never_tracked():
    module = attached(ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1))
    everything = LoraFAOptimizer(module.parameters(), lr=1e-3)
    trainable = [p for p in module.parameters() if p.requires_grad]
    frozen = [p for p in module.parameters() if not p.requires_grad]
    assert len(everything.param_groups[0]["params"]) == len(trainable) + len(frozen) and len(frozen) == 37
    keep_trainable_only([everything], module)
    assert everything.param_groups[0]["params"] == trainable


def test_resuming_adapter_only_checkpoint_with_plain_model_parallel_strategy_is_explained():
    module = attached(ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1))
    module.trainer.ckpt_path = "some.ckpt"
    with pytest.raises(ValueError, match=r"Use lightning_lorafa.LoraFAModelParallelStrategy"):
        check_resume_supported(module.trainer, adapter_only_checkpoints=True)
    check_resume_supported(module.trainer, adapter_only_checkpoints=False)


def imported_modules(module) -> set[str]:
    """The modules a module's source imports (anywhere in it, functions included)."""
    tree = ast.parse(Path(module.__file__).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_strategy_checks_do_not_depend_on_the_callback():
    import lightning_lorafa.lightning.callback
    import lightning_lorafa.lightning.sharding
    import lightning_lorafa.lightning.strategies

    callback, strategies = "lightning_lorafa.lightning.callback", "lightning_lorafa.lightning.strategies"
    assert strategies in imported_modules(lightning_lorafa.lightning.callback)
    assert not {callback, "lightning_lorafa.lightning.sharding"} & imported_modules(
        lightning_lorafa.lightning.strategies
    )
    assert callback in imported_modules(lightning_lorafa.lightning.sharding)


def test_transformer_block_classes():
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    from transformers.models.roberta.modeling_roberta import RobertaLayer

    assert transformer_block_classes(tiny_llama()) == {LlamaDecoderLayer}
    assert RobertaLayer in transformer_block_classes(tiny_roberta())
    with pytest.raises(ValueError, match="names no transformer block classes"):
        transformer_block_classes(TwoLayerNet())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP1 (strategy='fsdp') needs CUDA")
def test_fsdp1_on_one_gpu_trains_like_no_sharding(tmp_path):
    def fit(strategy):
        pl.seed_everything(0, verbose=False)
        trainer = pl.Trainer(
            accelerator="cuda",
            devices=1,
            strategy=strategy,
            max_epochs=1,
            callbacks=[LoraFA(r=4, alpha=8, modules_to_save=["classifier"], attn_implementation=None)],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            default_root_dir=tmp_path,
        )
        trainer.fit(Classifier(shard=False), data(batch_size=8))
        return trainer

    from transformers.models.roberta.modeling_roberta import RobertaLayer

    sharded = fit(FSDPStrategy(auto_wrap_policy={RobertaLayer}, use_orig_params=True))
    layers = lorafa_layers(sharded.lightning_module.model)
    assert all(layer.correct_in_backward for layer in layers.values())
    sharded.save_checkpoint(tmp_path / "fsdp1.ckpt")
    reference = trained_tensors(fit("auto"))
    state = torch.load(tmp_path / "fsdp1.ckpt", weights_only=False)["state_dict"]
    for key, expected in reference.items():
        torch.testing.assert_close(state[key].cpu(), expected, rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize("kind", ["ddp-moe", "fsdp2-moe"])
def test_two_processes_train_fused_experts_like_one_and_resume_exactly(kind, tmp_path, single_process_moe_reference):
    rank0, rank1 = run_worker(kind, tmp_path)
    check_two_process_run(rank0, rank1, single_process_moe_reference, num_B=14)
    experts_B = [k for k in single_process_moe_reference if ".experts.adapters." in k]
    assert len(experts_B) == 4  # gate_up_proj and down_proj of both layers' experts
    assert sum(".mlp.gate." in k for k in single_process_moe_reference) == 2  # both routers' B (4, 4)
    # B (E=4, 32, 4): under FSDP2 a DTensor holding 2 experts per rank, corrected in backward; A (4, 4, 64) whole
    local = (2, 32, 4) if kind == "fsdp2-moe" else (4, 32, 4)
    assert rank0["types"] == ("DTensor" if kind == "fsdp2-moe" else "Parameter", local, "Tensor", (4, 4, 64))
    state = torch.load(tmp_path / "first" / "half.ckpt", weights_only=False)["state_dict"]
    assert state["model.model.layers.0.mlp.experts.adapters.down_proj.lora_B"].shape == (4, 32, 4)


@pytest.fixture(scope="module")
def single_process_lm_reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The same for the tiny LLaMA causal LM (its loss chunked, its untied lm_head trained fully)."""
    return single_process_run(tmp_path_factory.mktemp("lm-reference"), lm=True)


@pytest.mark.parametrize("kind", ["ddp-lm", "fsdp2-lm"])
def test_two_processes_train_a_causal_lm_with_the_chunked_loss_like_one_and_resume_exactly(
    kind, tmp_path, single_process_lm_reference
):
    rank0, rank1 = run_worker(kind, tmp_path)
    assert rank0["chunked_loss"] and rank1["chunked_loss"]
    check_two_process_run(rank0, rank1, single_process_lm_reference, num_B=14)
    assert single_process_lm_reference["model.lm_head.weight"].shape == (96, 32)  # the head's gradient, chunked
