"""Two CPU processes (gloo) training LoRA-FA under torch's FSDP1, for tests/lightning/test_distributed.py.

Usage: ``python tests/workers/fsdp1_worker.py OUT_DIR``. Each rank wraps a tiny RoBERTa with
``FullyShardedDataParallel(..., device_id=cpu, use_orig_params=True)`` (FULL_SHARD, one unit per attention block,
the rest in the root unit): each unit's B's are flattened into its flat parameter, which is split in two, so a rank
holds whole B's, none, or a ragged piece (the value projection's B straddles the split). B's gradient is corrected
in backward (``prepare_for_strategy`` with an ``FSDPStrategy``), as under ``strategy="fsdp"``. Each rank trains on
its half of every batch of 8 (the data of tests/workers/distributed_worker.py):

- straight: 4 steps;
- first: 2 steps, then an adapter-only checkpoint (full state dict: A, B, classifier; full optimizer state);
- resumed: a fresh model loads that checkpoint and trains steps 3 and 4.

Rank 0 writes ``OUT_DIR/fsdp1.pt``: the gathered trainable tensors and optimizer state of each run, and each
rank's local element count of every B.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: conftest
from conftest import tiny_roberta  # noqa: E402
from distributed_worker import LR, data  # noqa: E402

from lightning_lorafa import AtomicCheckpointIO, apply_lorafa, create_lorafa_optimizer
from lightning_lorafa.lightning.strategies import prepare_for_strategy
from lightning_lorafa.model.adapter_state import adapter_keys

STEPS = 4
WORLD_SIZE = 2


def build() -> tuple[torch.nn.Module, torch.optim.Optimizer, list[str]]:
    """A converted tiny RoBERTa, sharded with FSDP1, and its LoraFAOptimizer; plus the adapter keys."""
    from transformers.models.roberta.modeling_roberta import RobertaAttention

    model = tiny_roberta().train()
    apply_lorafa(model, r=4, alpha=8, modules_to_save=["classifier"])
    keys = adapter_keys(model)
    prepare_for_strategy(model, FSDPStrategy(use_orig_params=True))  # B's gradient corrected in backward
    sharded = FSDP(
        model,
        auto_wrap_policy=ModuleWrapPolicy({RobertaAttention}),
        device_id=torch.device("cpu"),
        use_orig_params=True,
    )
    return sharded, create_lorafa_optimizer(sharded, lr=LR, weight_decay=0.01), keys


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> None:
    batches = list(data(batch_size=4, world_size=WORLD_SIZE, rank=dist.get_rank()))
    for step in steps:
        input_ids, labels = batches[step % len(batches)]
        model(input_ids=input_ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def full_state_dict_type(model: FSDP):
    """Full (gathered) model and optimizer state dicts on every rank.

    ``offload_to_cpu=False`` for the optimizer: on a CPU compute device torch's FSDP1 "offload" (``.cpu()``) is a
    no-op that leaves every state of a parameter a view of one reused gather buffer, so ``exp_avg`` would come
    back holding ``exp_avg_sq``; without offload each gathered state is cloned. (On CUDA ``.cpu()`` copies.)
    """
    return FSDP.state_dict_type(
        model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(), FullOptimStateDictConfig(offload_to_cpu=False)
    )


def full_state(model: FSDP, optimizer: torch.optim.Optimizer, keys: list[str]) -> tuple[dict, dict]:
    """The adapter tensors and the optimizer state, gathered on every rank (FQNs without FSDP prefixes)."""
    with full_state_dict_type(model):
        state = model.state_dict()
        optim = FSDP.optim_state_dict(model, optimizer)
    return {key: state[key].clone() for key in keys}, optim


def run(rank: int, out: Path, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        torch.manual_seed(0)
        model, optimizer, keys = build()
        local = {
            name.replace("_fsdp_wrapped_module.", ""): p.numel()
            for name, p in model.named_parameters()
            if name.endswith("lora_B")
        }
        train(model, optimizer, range(STEPS))
        straight = full_state(model, optimizer, keys)

        model, optimizer, keys = build()
        train(model, optimizer, range(STEPS // 2))
        adapter, optim = full_state(model, optimizer, keys)
        checkpoint = out / "half.ckpt"
        if rank == 0:
            AtomicCheckpointIO().save_checkpoint({"state_dict": adapter, "optimizer": optim}, checkpoint)
        dist.barrier()

        model, optimizer, keys = build()  # a fresh run: new processes would build the same
        saved = torch.load(checkpoint, weights_only=False)
        with full_state_dict_type(model):
            missing, unexpected = model.load_state_dict(saved["state_dict"], strict=False)
            assert not unexpected and not set(keys) & set(missing), (unexpected, missing)
            optimizer.load_state_dict(FSDP.optim_state_dict_to_load(model, optimizer, saved["optimizer"]))
        train(model, optimizer, range(STEPS // 2, STEPS))
        resumed = full_state(model, optimizer, keys)

        counts = [None] * WORLD_SIZE
        dist.all_gather_object(counts, local)
        if rank == 0:
            torch.save(
                {"straight": straight, "half": (adapter, optim), "resumed": resumed, "local_numel": counts},
                out / "fsdp1.pt",
            )
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    out = Path(sys.argv[1])
    port = int(sys.argv[2]) if len(sys.argv) > 2 else 29571
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.start_processes(run, args=(out, port), nprocs=WORLD_SIZE, start_method="fork")  # children share the imports
