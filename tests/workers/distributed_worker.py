"""Two-process CPU (gloo) training for tests/lightning/test_distributed.py, launched by Lightning's own launcher.

Usage: ``python tests/workers/distributed_worker.py KIND OUT_DIR``, KIND one of ddp, fsdp2, fsdp2-sharded, fsdp2-meta,
ddp-moe, fsdp2-moe, ddp-lm, fsdp2-lm. ``*-moe``: a tiny Mixtral classifier, whose fused experts get LoRA-FA adapters,
instead of RoBERTa.
``*-lm``: a tiny LLaMA causal LM trained on next tokens, its loss chunked (``chunked_loss``) and its untied
``lm_head`` trained fully.
``fsdp2-meta``: the model is built on the meta device, converted, sharded, then materialised with ``to_empty``,
its base weights loaded and each LoRA-FA layer's ``reset_parameters()`` called, as for a model too large for
CPU. Lightning starts rank 1 by running this script again. It fits 2 epochs straight, then 1 epoch with a
checkpoint and 1 more resumed from it, and writes what the test compares to ``OUT_DIR``: each rank's full B and
head after each run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: conftest
from conftest import VOCAB, tiny_llama, tiny_mixtral, tiny_roberta  # noqa: E402

from lightning_lorafa import (
    LoraFA,
    LoraFALinear,
    LoraFAModelParallelStrategy,
    convert_before_sharding,
    fully_shard_blocks,
)

EPOCHS = 2  # 2 steps each: 8 samples per rank
LR = 1e-2


class Classifier(pl.LightningModule):
    """Tiny RoBERTa classifier; ``shard=True`` builds it in ``configure_model`` and applies FSDP2 there."""

    def __init__(self, shard: bool, meta: bool = False, moe: bool = False, lm: bool = False) -> None:
        super().__init__()
        self.shard, self.meta, self.lm = shard, meta, lm
        self.build = tiny_llama if lm else tiny_mixtral if moe else tiny_roberta
        self.model = None if shard else self.build().train()

    def configure_model(self) -> None:
        if not self.shard or self.model is not None:
            return
        if not self.meta:
            self.model = self.build().train()
            convert_before_sharding(self)
            fully_shard_blocks(self.model, self.device_mesh["data_parallel"])
            return
        with torch.device("meta"):
            self.model = tiny_roberta().train()
        convert_before_sharding(self)
        fully_shard_blocks(self.model, self.device_mesh["data_parallel"])
        self.model.to_empty(device=self.device)
        load_base_weights(self.model)
        for module in self.model.modules():
            if isinstance(module, LoraFALinear):
                module.reset_parameters()

    def training_step(self, batch, batch_idx):
        input_ids, labels = batch
        return self.model(input_ids=input_ids, labels=input_ids if self.lm else labels).loss

    def train_dataloader(self) -> DataLoader:
        return data(world_size=self.trainer.world_size, rank=self.trainer.global_rank)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=LR, weight_decay=0.01)


def load_base_weights(model: torch.nn.Module) -> None:
    """The frozen base weights and the buffers of a pretrained checkpoint (here: ``tiny_roberta()``), loaded into
    a sharded, materialised model; the LoRA-FA tensors are left to ``reset_parameters``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    pretrained = tiny_roberta()
    state = {
        name.replace(".weight", ".base.weight").replace(".bias", ".base.bias") if _adapted(model, name) else name: value
        for name, value in pretrained.state_dict().items()
    }
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
    buffers = dict(pretrained.named_buffers())
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if not name.endswith("lora_A"):
                buffer.copy_(buffers[name])


def _adapted(model: torch.nn.Module, name: str) -> bool:
    module_name = name.rpartition(".")[0]
    return isinstance(dict(model.named_modules()).get(module_name), LoraFALinear)


def data(batch_size: int = 4, world_size: int = 1, rank: int = 0) -> DataLoader:
    """16 samples in order, rank r taking every other one from r: with batch 4 on each of 2 ranks a step sees
    the same 8 samples as one process with batch 8."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(3, VOCAB, (16, 8), generator=generator)
    dataset = TensorDataset(x, x[:, 0] % 2)
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler)


def strategy(kind: str):
    if kind.startswith("ddp"):
        return "ddp"
    return LoraFAModelParallelStrategy(
        data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=kind == "fsdp2-sharded"
    )


class RecordSyncedBuffers(pl.Callback):
    """Under DDP: how many buffers DDP broadcasts before every forward, and how many of them are LoRA-FA A's."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ddp = trainer.strategy.model
        if isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
            synced = ddp.modules_buffers
            names = [name for name, buffer in ddp.module.named_buffers() if any(buffer is b for b in synced)]
            pl_module.synced_buffers = (len(names), sum(name.endswith("lora_A") for name in names))


def head(kind: str) -> str:
    """The classification head the run trains fully: RoBERTa's ``classifier``, Mixtral's ``score``."""
    return {"moe": "score", "lm": "lm_head"}.get(kind.rpartition("-")[2], "classifier")


def fit(kind: str, root: Path, epochs: int, ckpt_path: Path | None = None) -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy(kind),
        max_epochs=epochs,
        callbacks=[
            LoraFA(r=4, alpha=8, modules_to_save=[head(kind)], attn_implementation=None),
            RecordSyncedBuffers(),
        ],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        use_distributed_sampler=False,
    )
    module = Classifier(
        shard=kind.startswith("fsdp2"), meta=kind == "fsdp2-meta", moe=kind.endswith("-moe"), lm=kind.endswith("-lm")
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


def trained_tensors(trainer: pl.Trainer) -> dict[str, torch.Tensor]:
    """Full (gathered) trainable tensors of the fitted module."""
    tensors = {}
    for name, param in trainer.lightning_module.named_parameters():
        if param.requires_grad:
            full = param.full_tensor() if hasattr(param, "full_tensor") else param
            tensors[name] = full.detach().cpu().clone()
    return tensors


def main(kind: str, out: Path) -> None:
    straight = fit(kind, out / "straight", EPOCHS)
    rank = straight.global_rank
    result = {"straight": trained_tensors(straight), "world_size": straight.world_size}
    result["synced_buffers"] = getattr(straight.lightning_module, "synced_buffers", None)
    result["chunked_loss"] = hasattr(straight.lightning_module.model, "lorafa_chunked_loss")
    first = fit(kind, out / "first", EPOCHS - 1)
    checkpoint = out / "first" / "half.ckpt"
    first.save_checkpoint(checkpoint)
    result["half"] = trained_tensors(first)
    resumed = fit(kind, out / "resumed", EPOCHS, ckpt_path=checkpoint)
    result["resumed"] = trained_tensors(resumed)
    result["global_step"] = resumed.global_step
    adapter = ".experts.adapters.down_proj." if kind.endswith("-moe") else ""  # an experts adapter for MoE runs
    lora_B = next(p for n, p in resumed.lightning_module.named_parameters() if n.endswith(adapter + "lora_B"))
    lora_A = next(b for n, b in resumed.lightning_module.named_buffers() if n.endswith(adapter + "lora_A"))
    local_B = lora_B.to_local() if hasattr(lora_B, "to_local") else lora_B
    result["types"] = (type(lora_B).__name__, tuple(local_B.shape), type(lora_A).__name__, tuple(lora_A.shape))
    torch.save(result, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
