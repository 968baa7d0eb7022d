"""The `lorafa` command: `LightningCLI` over the task modules, configured from YAML.

    lorafa fit --config configs/demo.yaml
    lorafa validate --config configs/glue/sst2_base.yaml --trainer.limit_val_batches 10
    lorafa fit --config configs/t5/small.yaml --print_config
    lorafa export --config configs/llama/alpaca.yaml --ckpt_path last.ckpt --format merged --output merged/

The model (`model.class_path`, a `TaskModule`) and data (`data.class_path`, a `TaskDataModule`)
are chosen in the config; the data module's tokenizer follows `model.init_args.model_name_or_path`.
The `LoraFA` callback is configured under `trainer.callbacks`. `lorafa export` writes a trained run's
PEFT adapter or merged model (`lightning_lorafa.tasks.export`).
"""

from __future__ import annotations

import difflib
import re
import sys
from typing import NoReturn

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_lorafa import _compat
from lightning_lorafa.tasks.common import TaskDataModule, TaskModule


class ConciseArgumentParser(LightningArgumentParser):
    """Lightning's parser, whose errors are the message, the closest known options, and where to find the rest
    (instead of some 60 lines of usage text above the message)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        known = _compat.parser_option_strings(parser)
        hints = []
        for given in dict.fromkeys(re.findall(r"--[\w.]+", message)):
            close = difflib.get_close_matches(given, known, n=2, cutoff=0.8)
            if close and given not in known:
                hints.append(f"{given}: did you mean {' or '.join(close)}?")
        sys.stderr.write(f"{prog}: error: {message}\n")
        for hint in hints:
            sys.stderr.write(f"  {hint}\n")
        sys.stderr.write(f"Run '{prog} --help' for the accepted options, or '{prog} --print_config' for a config.\n")
        self.exit(2)


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
        parser_class=ConciseArgumentParser,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def console_main() -> None:
    """The `lorafa` console script: like `main` (`lorafa export ...`: `lightning_lorafa.tasks.export.main`), but returns
    nothing, so the process exits with status 0."""
    if sys.argv[1:2] == ["export"]:
        from lightning_lorafa.tasks.export import main as export_main

        export_main(sys.argv[2:])
        return
    main()


if __name__ == "__main__":
    console_main()
