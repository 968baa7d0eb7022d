"""Padding-free packing against padded batches: padding fraction, real tokens per second and saved activations
per real token of LoRA-FA training.

SmolLM2-135M-Instruct (``examples/convert_smollm2.py`` writes it to ``~/.cache/lightning_lorafa/smollm2-135m``) is
trained with LoRA-FA (r 16, alpha 32, all linear layers, as ``configs/llama/smollm2_alpaca.yaml``) on the 200
Alpaca instructions of ``data/alpaca/alpaca_sample.json``, cut at ``max_length`` tokens, through the
``InstructionDataModule`` of the ``lorafa`` command: padded (each batch of ``batch_size`` rows padded to its longest
row) and packed (``packing: true``: ``batch_size`` packs of up to ``max_length`` tokens). Both see every row once
per epoch, in the data module's order (no shuffling), so they train on the same tokens.

    python benchmarks/packing.py                             # CPU, batch 8 x 512, 2 rounds of one epoch each
    python benchmarks/packing.py --rounds 1 --max_rows 64     # quicker

Real tokens are the rows' tokens (prompt and response, no padding). A step is forward, backward and optimizer step
(``create_lorafa_optimizer``); an epoch's real tokens over its wall time give real tokens/s. Saved activations are
what the first batch's training forward keeps for backward (``measure_saved_activations``), per real token of that
batch. Writes ``benchmarks/results/packing-<machine>-<date>.md``.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import statistics
import time
from pathlib import Path

import torch
from jsonargparse import CLI

from lightning_lorafa import apply_lorafa, create_lorafa_optimizer
from lightning_lorafa.model.attention import set_attention_implementation
from lightning_lorafa.model.dropouts import replace_dropout
from lightning_lorafa.profiling import measure_saved_activations
from lightning_lorafa.tasks import InstructionDataModule, InstructionTuner

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = "~/.cache/lightning_lorafa/smollm2-135m"
MODES = ("padded", "packed")


def machine_name() -> str:
    """The CPU model and core count from /proc/cpuinfo."""
    model = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE)
        model = names[0] if names else model
    return f"{model}, {os.cpu_count()} cores"


def batches(packing: bool, model: str, batch_size: int, max_length: int, max_rows: int | None) -> list[dict]:
    """The epoch's training batches from the `lorafa` data module, in order."""
    data = InstructionDataModule(
        model,
        data_files={"train": str(ROOT / "data" / "alpaca" / "alpaca_sample.json")},
        mmlu_dir=str(ROOT / "data" / "mmlu"),
        mmlu_subjects=["anatomy"],
        mmlu_questions_per_subject=1,
        batch_size=batch_size,
        eval_batch_size=batch_size,
        max_length=max_length,
        packing=packing,
    )
    if max_rows is not None:
        data.max_train_samples = max_rows
    data.setup("fit")
    return list(data.loader("train", shuffle=False))


def real_tokens(batch: dict[str, torch.Tensor], pad_token_id: int) -> int:
    """Row tokens of a batch: the attention mask of a padded batch; in a packed batch, all but the padding tail,
    whose tokens are pad tokens at position 0 (a row's first token is never a pad token at a pack's tail)."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    ids, positions = batch["input_ids"], batch["position_ids"]
    tail = (ids == pad_token_id) & (positions == 0) & (batch["labels"] == -100)
    # the padding tail is the trailing run of such tokens in each pack
    trailing = tail.flip(-1).int().cumprod(-1).sum(-1)
    return int(ids.numel() - trailing.sum())


def train_epoch(module: InstructionTuner, optimizer: torch.optim.Optimizer, epoch: list[dict]) -> float:
    """Seconds for one pass of training steps over ``epoch``."""
    start = time.perf_counter()
    for batch in epoch:
        module(batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main(
    model: str = SMOLLM2,
    batch_size: int = 8,
    max_length: int = 512,
    rank: int = 16,
    rounds: int = 2,
    max_rows: int | None = None,
    output: str | None = None,
) -> Path:
    """Run the comparison and write the results table.

    Args:
        model: checkpoint folder (default: the converted SmolLM2-135M-Instruct).
        batch_size: rows (padded) or packs (packed) per batch.
        max_length: tokens kept per row; the length of a pack.
        rank: LoRA-FA rank (alpha = 2 * rank).
        rounds: epochs timed per mode, alternating padded and packed.
        max_rows: train on the first rows only (after the data module's seeded shuffle).
        output: results file (default: benchmarks/results/packing-<machine>-<date>.md).
    """
    path = os.path.expanduser(model)
    if not Path(path).is_dir():
        raise SystemExit(f"{path} does not exist: run `python examples/convert_smollm2.py` first.")
    torch.manual_seed(0)
    module = InstructionTuner(path, dtype="float32").train()
    apply_lorafa(module.model, r=rank, alpha=2 * rank, target_modules="all-linear")
    attention = set_attention_implementation(module.model, "auto", "cpu")
    replace_dropout(module.model)
    optimizer = create_lorafa_optimizer(module.model, lr=1e-4)
    pad = module.model.config.pad_token_id
    pad = pad if pad is not None else InstructionDataModule(path).tokenizer.pad_token_id
    epochs = {mode: batches(mode == "packed", path, batch_size, max_length, max_rows) for mode in MODES}
    stats: dict[str, dict] = {}
    for mode, epoch in epochs.items():
        stats[mode] = {
            "steps": len(epoch),
            "real": sum(real_tokens(batch, pad) for batch in epoch),
            "positions": sum(batch["input_ids"].numel() for batch in epoch),
            "shape": f"{tuple(epoch[0]['input_ids'].shape)}",
            "seconds": [],
        }
        train_epoch(module, optimizer, epoch[:1])  # warm-up step
    assert stats["padded"]["real"] == stats["packed"]["real"], "both modes must train on the same tokens"
    for _ in range(rounds):
        for mode, epoch in epochs.items():
            stats[mode]["seconds"].append(train_epoch(module, optimizer, epoch))
            print(f"{mode}: {stats[mode]['real'] / stats[mode]['seconds'][-1]:,.0f} real tokens/s", flush=True)
    for mode, epoch in epochs.items():  # after the timing: the recorder's hooks slow the steps that follow
        first = epoch[0]
        saved = measure_saved_activations(lambda first=first: module(first).loss, module).total_bytes
        stats[mode]["saved_per_token"] = saved / real_tokens(first, pad)
    for mode in MODES:
        stats[mode]["tokens_per_second"] = stats[mode]["real"] / statistics.median(stats[mode]["seconds"])
    rows_trained = sum(batch["input_ids"].shape[0] for batch in epochs["padded"])
    speedup = stats["packed"]["tokens_per_second"] / stats["padded"]["tokens_per_second"]

    machine = machine_name()
    today = datetime.date.today().isoformat()
    rows = [
        "| batches | steps | first batch | positions | real tokens | padding | real tokens/s (median) | epoch s "
        "(each round) | saved activations per real token |",
        "|---|---:|---|---:|---:|---:|---:|---|---:|",
    ]
    for mode in MODES:
        s = stats[mode]
        rows.append(
            f"| {mode} | {s['steps']} | {s['shape']} | {s['positions']:,} | {s['real']:,} | "
            f"{1 - s['real'] / s['positions']:.1%} | {s['tokens_per_second']:,.0f} | "
            f"{', '.join(f'{t:.1f}' for t in s['seconds'])} | {s['saved_per_token'] / 1024:.1f} KiB |"
        )
    text = "\n".join(
        [
            f"## Packing vs padding: {machine}",
            "",
            f"{today}; CPU, fp32, torch {torch.__version__}; SmolLM2-135M-Instruct, LoRA-FA r {rank} alpha "
            f"{2 * rank} all-linear, attention {attention}; {rows_trained} Alpaca rows "
            f"(data/alpaca/alpaca_sample.json) cut at {max_length} tokens; batch {batch_size} rows "
            f"(padded) or {batch_size} packs of up to {max_length} tokens (packed). Step = forward + backward + "
            "optimizer step; padding = 1 - real tokens / batch positions.",
            "",
            *rows,
            "",
            f"Packed / padded real tokens per second: **{speedup:.2f}x**.",
            "",
            f"Command: `python benchmarks/packing.py --batch_size {batch_size} --max_length {max_length} --rounds "
            f"{rounds}" + (f" --max_rows {max_rows}" if max_rows is not None else "") + "`",
            "",
        ]
    )
    slug = re.sub(r"[^a-z0-9]+", "-", " ".join(machine.lower().split()[:2]) + f" {os.cpu_count()} cores cpu")
    out = Path(output) if output else ROOT / "benchmarks" / "results" / f"packing-{slug.strip('-')}-{today}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return out


if __name__ == "__main__":
    CLI(main)
