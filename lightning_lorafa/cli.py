"""The `lorafa` command: `LightningCLI` over the task modules, configured from YAML.

    lorafa fit --config configs/demo.yaml
    lorafa validate --config configs/glue/sst2_base.yaml --trainer.limit_val_batches 10
    lorafa fit --config configs/t5/small.yaml --print_config
    lorafa export --config configs/llama/alpaca.yaml --ckpt_path last.ckpt --format merged --output merged/

The model (`model.class_path`, a `TaskModule`) and data (`data.class_path`, a `TaskDataModule`)
are chosen in the config; the data module's tokenizer follows `model.init_args.model_name_or_path`.
The `LoraFA` callback is configured under `trainer.callbacks`. `lorafa export` writes a trained run's
PEFT adapter or merged model (`lightning_lorafa.export`).
"""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_lorafa.tasks.common import TaskDataModule, TaskModule


class LoraFACLI(LightningCLI):
    """`LightningCLI` with task modules and data modules chosen by class path."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.init_args.model_name_or_path", "data.init_args.model_name_or_path")


def main(args: list[str] | None = None) -> LoraFACLI:
    """Runs the `lorafa` command with `args` (default: `sys.argv[1:]`)."""
    return LoraFACLI(
        TaskModule,
        TaskDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def console_main() -> None:
    """The `lorafa` console script: like `main` (`lorafa export ...`: `lightning_lorafa.export.main`), but returns
    nothing, so the process exits with status 0."""
    if sys.argv[1:2] == ["export"]:
        from lightning_lorafa.export import main as export_main

        export_main(sys.argv[2:])
        return
    main()


if __name__ == "__main__":
    console_main()
