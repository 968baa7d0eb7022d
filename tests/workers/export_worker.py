"""Two-process CPU (gloo) FSDP2 instruction tuning whose checkpoints tests/tasks/test_export.py exports.

Usage: ``python tests/workers/export_worker.py MODEL_DIR ALPACA_JSON OUT_DIR``. Lightning starts rank 1 by running
this script again. An `InstructionTuner` whose LLaMA is sharded by FSDP2 (``LoraFAModelParallelStrategy``) trains 3
steps; the run saves a checkpoint file (``OUT_DIR/run.ckpt``); a second, identical run saves a sharded checkpoint
directory (``OUT_DIR/sharded.ckpt``). Rank 0 writes each trained model's logits on fixed tokens
to ``OUT_DIR/logits.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_lorafa import LoraFA, LoraFAModelParallelStrategy, convert_before_sharding, fully_shard_blocks
from lightning_lorafa.tasks import InstructionDataModule, InstructionTuner

MMLU = str(Path(__file__).resolve().parents[2] / "data" / "mmlu")
TOKENS = torch.tensor([[2, 7, 11, 13, 17, 19, 23, 29, 31, 37]])
LORA = {"r": 4, "alpha": 8, "target_modules": "all-linear"}


class ShardedInstructionTuner(InstructionTuner):
    """`InstructionTuner` whose model is converted, then sharded block by block (FSDP2) in `configure_model`."""

    def configure_model(self) -> None:
        if getattr(self, "_sharded", False):
            return
        convert_before_sharding(self)
        fully_shard_blocks(self.model, self.device_mesh["data_parallel"])
        self._sharded = True


def fit(model_dir: str, alpaca: str, out: Path, sharded_checkpoint: bool) -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=LoraFAModelParallelStrategy(
            data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=sharded_checkpoint
        ),
        max_steps=3,
        callbacks=[LoraFA(**LORA)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=out,
    )
    data = InstructionDataModule(
        model_dir, data_files={"train": alpaca}, mmlu_dir=MMLU, mmlu_subjects=["anatomy"],
        mmlu_questions_per_subject=1, batch_size=2, max_length=64,
    )  # fmt: skip
    module = ShardedInstructionTuner(model_dir, learning_rate=5e-2, warmup_ratio=0.0)
    trainer.fit(module, data)
    return trainer


def main(model_dir: str, alpaca: str, out: Path) -> None:
    results = {}
    for name, sharded in (("run.ckpt", False), ("sharded.ckpt", True)):
        trainer = fit(model_dir, alpaca, out / name.split(".")[0], sharded_checkpoint=sharded)
        trainer.save_checkpoint(out / name)
        model = trainer.lightning_module.model.eval()
        with torch.no_grad():
            results[name] = model(input_ids=TOKENS).logits  # the sharded forward gives every rank the full logits
        results["world_size"] = trainer.world_size
    if trainer.global_rank == 0:
        torch.save(results, out / "logits.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
