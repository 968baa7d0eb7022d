"""`FitReport`: after fit, print the result, export the adapter for PEFT (and the merged model) and plot the logged
curves."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import matplotlib
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch.distributed.tensor import DTensor

from lightning_lorafa.adapters.find import lorafa_layers
from lightning_lorafa.adapters.linear import is_quantized
from lightning_lorafa.model.convert import count_parameters
from lightning_lorafa.model.peft_export import export_peft
from lightning_lorafa.profiling import measure_saved_activations
from lightning_lorafa.tasks.common import local_path
from lightning_lorafa.tasks.export import save_merged

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def read_logged_metrics(metrics_csv: str | Path, names: list[str]) -> dict[str, list[tuple[int, float]]]:
    """(step, value) points of each metric in a `CSVLogger` `metrics.csv` file."""
    points: dict[str, list[tuple[int, float]]] = {name: [] for name in names}
    with open(metrics_csv, newline="") as file:
        for row in csv.DictReader(file):
            for name in names:
                if row.get(name):
                    points[name].append((int(row["step"]), float(row[name])))
    return points


def plot_metrics(points: dict[str, list[tuple[int, float]]], path: str | Path) -> Path:
    """One panel per metric against the training step, saved as a PNG at `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axes = plt.subplots(1, len(points), figsize=(5 * len(points), 3.5), squeeze=False)
    for axis, (name, series) in zip(axes[0], points.items(), strict=True):
        axis.plot([s for s, _ in series], [v for _, v in series], marker="." if len(series) < 50 else None)
        axis.set_xlabel("step")
        axis.set_title(name)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


class FitReport(L.Callback):
    """After `fit`: prints the monitored validation metric, the trainable parameters and the activation
    bytes one training batch saves for backward; writes the LoRA-FA adapter in PEFT format to
    `{output_dir}/adapter` and a plot of `train/loss` and the monitored metric (read from the
    `CSVLogger`) to `{output_dir}/metrics.png`.

    Expects a task module (`lightning_lorafa.tasks`): the Hugging Face model in `pl_module.model`, its
    checkpoint in `pl_module.model_name_or_path`, and `pl_module(batch)` returning an output with `.loss`.

    With `export_merged`, it also writes the model with the adapter folded in (`W + s B A`) to
    `{output_dir}/merged` as a plain transformers checkpoint with its tokenizer (`lightning_lorafa.tasks.export`),
    loadable by `AutoModelForCausalLM.from_pretrained`, vLLM or TGI. A quantized or sharded (FSDP) model is not
    merged here (the log says so): `lorafa export --format merged` writes it from the checkpoint.

    Args:
        output_dir: folder for the adapter and the plot.
        monitor: validation metric to print and plot.
        task_type: PEFT task type written to the adapter config (e.g. "SEQ_CLS", "CAUSAL_LM").
        export_merged: also write the merged model to `{output_dir}/merged`.
    """

    def __init__(
        self,
        output_dir: str = "outputs",
        monitor: str = "val/acc",
        task_type: str | None = None,
        export_merged: bool = False,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.monitor = monitor
        self.task_type = task_type
        self.export_merged = export_merged
        self.summary: dict[str, float | int | str] = {}

    def saved_activation_bytes(self, trainer: L.Trainer, pl_module: L.LightningModule) -> int:
        """Activation bytes (weights excluded) one training forward on the first training batch saves."""
        batch = trainer.strategy.batch_to_device(next(iter(trainer.train_dataloader)))
        was_training = pl_module.training
        pl_module.train()
        with torch.enable_grad():
            report = measure_saved_activations(lambda: pl_module(batch).loss, pl_module)
        pl_module.train(was_training)
        return report.total_bytes

    def write_merged(self, pl_module: L.LightningModule) -> str:
        """Writes `{output_dir}/merged` (`save_merged`); returns its path, or why it was not written."""
        model = pl_module.model
        if any(is_quantized(layer.base) for layer in lorafa_layers(model).values()):
            return (
                "not written: the base is quantized; run `lorafa export --format merged` on the checkpoint, which "
                "merges into the full-precision base"
            )
        if any(isinstance(p, DTensor) for p in model.parameters()):
            return "not written: the model is sharded; run `lorafa export --format merged` on the checkpoint"
        return str(save_merged(model, self.output_dir / "merged", local_path(pl_module.model_name_or_path)))

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainable, total = count_parameters(pl_module)
        batch_size = trainer.datamodule.batch_size if trainer.datamodule is not None else None
        self.summary = {
            "trainable_parameters": trainable,
            "total_parameters": total,
            "saved_activation_bytes": self.saved_activation_bytes(trainer, pl_module),
        }
        if self.monitor in trainer.callback_metrics:
            self.summary[self.monitor] = trainer.callback_metrics[self.monitor].item()
        adapter = export_peft(
            pl_module.model, self.output_dir / "adapter", pl_module.model_name_or_path, self.task_type
        )
        self.summary["adapter"] = str(adapter)
        if self.export_merged:
            self.summary["merged"] = self.write_merged(pl_module)
        loggers = [logger for logger in trainer.loggers if isinstance(logger, CSVLogger)]
        if loggers:
            loggers[0].save()
            points = read_logged_metrics(loggers[0].experiment.metrics_file_path, ["train/loss", self.monitor])
            self.summary["plot"] = str(plot_metrics(points, self.output_dir / "metrics.png"))
        lines = [
            f"{self.monitor}: {self.summary[self.monitor]:.4f}"
            if self.monitor in self.summary
            else f"{self.monitor}: not measured (no validation ran)",
            f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)",
            f"saved activations of one training batch ({batch_size}): "
            f"{self.summary['saved_activation_bytes'] / 2**20:.2f} MiB",
            f"adapter (PEFT format): {adapter}",
        ]
        if "plot" in self.summary:
            lines.append(f"plot: {self.summary['plot']}")
        if self.export_merged:
            lines.append(f"merged model (transformers format): {self.summary['merged']}")
        rank_zero_info("\n".join(lines))
