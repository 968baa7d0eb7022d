"""The `lorafa` command: every config in configs/ runs (fast_dev_run, tiny checkpoints, local data), and
bad input stops with a clear message before training."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.strategies import Strategy
from tiny_checkpoints import write_alpaca_file, write_flan_file, write_glue_files, write_text_pairs
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from lightning_lorafa import AtomicCheckpointIO, LoraFA
from lightning_lorafa.lightning.checkpoints import ADAPTER_ONLY_MARKER
from lightning_lorafa.tasks import GLUE_TASKS
from lightning_lorafa.tasks.cli import main

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml") if p.parent.name != "distributed")
OVERLAYS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs" / "distributed").glob("*.yaml"))


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory where `configs/` and `data/` are the repository's and outputs land in tmp."""
    for name in ("configs", "data"):
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def overrides(config: str, checkpoints: dict[str, str], tmp: Path) -> list[str]:
    """Arguments pointing a config at a tiny checkpoint of its architecture and at small local data."""
    init = yaml.safe_load((ROOT / config).read_text())["model"]["init_args"]
    model_class = yaml.safe_load((ROOT / config).read_text())["model"]["class_path"].rsplit(".", 1)[1]
    if model_class == "SequenceClassifier":
        arch = "bert" if "MiniLM" in init["model_name_or_path"] else "roberta"
        args = ["--model.init_args.model_name_or_path", checkpoints[arch]]
        if config != "configs/demo.yaml":
            spec = GLUE_TASKS[init["task"]]
            files = write_glue_files(
                tmp / "glue", spec.text_columns, ("train", *spec.validation_splits), spec.num_labels == 1
            )
            args += ["--data.init_args.data_files", yaml.safe_dump(files, default_flow_style=True)]
        return args
    if model_class == "MathTuner":
        data = ROOT / "tests" / "data"
        return [
            "--model.init_args.model_name_or_path",
            checkpoints["llama"],
            "--model.init_args.max_new_tokens",
            "4",
            "--data.init_args.data_files",
            f"{{train: {data / 'metamathqa_sample.json'}}}",
            "--data.init_args.eval_data_files",
            f"{{test: {data / 'gsm8k_sample.jsonl'}}}",
        ]
    if model_class == "CodeTuner":
        data = ROOT / "tests" / "data"
        return [
            "--model.init_args.model_name_or_path",
            checkpoints["llama"],
            "--model.init_args.max_new_tokens",
            "4",
            "--data.init_args.data_files",
            f"{{train: {data / 'code_feedback_sample.jsonl'}}}",
            "--data.init_args.humaneval_file",
            str(data / "humaneval_sample.jsonl"),
        ]
    if model_class == "ChatTuner":
        data = ROOT / "tests" / "data"
        return [
            "--model.init_args.model_name_or_path",
            checkpoints["llama"],
            "--model.init_args.max_new_tokens",
            "4",
            "--model.init_args.judge",
            "null",
            "--model.init_args.output_dir",
            "null",
            "--data.init_args.data_files",
            f"{{train: {data / 'chat_sharegpt.json'}}}",
            "--data.init_args.mt_bench_file",
            str(data / "mt_bench_questions.jsonl"),
        ]
    if model_class == "Translator":
        stem = write_text_pairs(tmp / "wmt")
        return [
            "--model.init_args.model_name_or_path",
            checkpoints["t5"],
            "--data.init_args.data_files",
            f"{{train: {stem}, validation: {stem}}}",
        ]
    args = [
        "--model.init_args.model_name_or_path",
        checkpoints["llama"],
        "--data.init_args.mmlu_subjects",
        "[abstract_algebra, anatomy]",
        "--data.init_args.mmlu_questions_per_subject",
        "2",
    ]
    if "data/" not in (ROOT / config).read_text():
        flan = yaml.safe_load((ROOT / config).read_text())["data"]["init_args"]["prompt_format"] == "flan"
        train = write_flan_file(tmp / "flan") if flan else write_alpaca_file(tmp / "alpaca")
        args += [
            "--data.init_args.data_files",
            f"{{train: {train}}}",
            "--data.init_args.mmlu_dir",
            "data/mmlu",
        ]
    return args


def test_configs_cover_the_tasks() -> None:
    glue = {f"configs/glue/{task}_{size}.yaml" for task in GLUE_TASKS for size in ("base", "large")}
    t5 = {f"configs/t5/{size}.yaml" for size in ("small", "base", "large")}
    llama = {"configs/llama/alpaca.yaml", "configs/llama/flanv2.yaml", "configs/llama/smollm2_alpaca.yaml"}
    llama |= {f"configs/llama/metamath_gsm8k{v}.yaml" for v in ("", "_all_linear", "_llama2_7b")}
    llama |= {"configs/llama/code_humaneval.yaml", "configs/llama/code_humaneval_llama2_7b.yaml"}
    llama |= {"configs/llama/smollm2_code.yaml", "configs/llama/wizardlm_mt_bench.yaml"}
    assert set(CONFIGS) == glue | t5 | llama | {"configs/demo.yaml"}


@pytest.mark.parametrize("config", CONFIGS)
def test_config_runs_one_batch(config: str, task_checkpoints: dict[str, str], workdir: Path) -> None:
    cli = main(
        [
            "fit",
            "--config",
            config,
            "--trainer.fast_dev_run",
            "true",
            "--trainer.accelerator",
            "cpu",
            *overrides(config, task_checkpoints, workdir),
        ]
    )
    assert cli.trainer.global_step == 1
    assert cli.trainer.state.finished
    assert [type(c) for c in cli.trainer.callbacks if isinstance(c, LoraFA)] == [LoraFA]
    trainable = [n for n, p in cli.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_B" in n or "classifier" in n for n in trainable)
    assert not any("lora_A" in n for n in trainable)
    assert any(k.startswith("val/") for k in cli.trainer.callback_metrics)


def test_print_config_shows_the_callback_and_linked_tokenizer(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs/glue/rte_base.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    callback = printed["trainer"]["callbacks"][0]
    assert callback["class_path"] == "lightning_lorafa.LoraFA"
    assert (callback["init_args"]["r"], callback["init_args"]["alpha"]) == (8, 32)
    assert callback["init_args"]["modules_to_save"] == ["classifier"]
    assert printed["model"]["init_args"]["learning_rate"] == 5e-4
    assert printed["data"]["init_args"]["batch_size"] == 64


def run_sst2(checkpoints: dict[str, str], tmp: Path, *extra: str) -> None:
    files = write_glue_files(tmp / "glue", ("sentence",), ("train", "validation"), False)
    main(
        [
            "fit",
            "--config",
            str(ROOT / "configs/glue/sst2_base.yaml"),
            "--trainer.fast_dev_run",
            "true",
            "--trainer.accelerator",
            "cpu",
            "--model.init_args.model_name_or_path",
            checkpoints["roberta"],
            "--data.init_args.data_files",
            yaml.safe_dump(files, default_flow_style=True),
            *extra,
        ]
    )


@pytest.mark.parametrize(
    ("extra", "error", "message"),
    [
        (
            ["--model.init_args.task", "sst5", "--data.init_args.task", "sst5"],
            ValueError,
            r"unknown GLUE task 'sst5'; choose one of \['cola', 'mnli'",
        ),
        (
            ["--data.init_args.data_files", "{train: missing.tsv}"],
            ValueError,
            r"data_files\['train'\] = 'missing.tsv' does not exist",
        ),
        (
            ["--data.init_args.label_column", "score"],
            ValueError,
            r"label column 'score' is not in the data \(columns: \['sentence', 'label'\]\); "
            "set data.init_args.label_column.",
        ),
        (["--data.init_args.max_length", "0"], ValueError, "max_length must be a positive integer, got 0"),
        (
            ["--data.init_args.task", "cola"],
            ValueError,
            "the model is set up for GLUE task 'sst2' but the data is 'cola'",
        ),
    ],
)
def test_bad_input_stops_before_training(
    extra: list[str], error: type, message: str, task_checkpoints: dict[str, str], workdir: Path
) -> None:
    with pytest.raises(error, match=message):
        run_sst2(task_checkpoints, workdir, *extra)
    assert not (workdir / "lightning_logs").exists() and not (workdir / "outputs").exists()


def test_a_model_without_the_task_head_is_refused(task_checkpoints: dict[str, str], workdir: Path) -> None:
    stem = write_text_pairs(workdir / "wmt")
    with pytest.raises(
        ValueError,
        match="'bert' model, which AutoModelForSeq2SeqLM cannot load, so it does not fit the translation task",
    ):
        main(
            [
                "fit",
                "--config",
                "configs/t5/small.yaml",
                "--trainer.fast_dev_run",
                "true",
                "--model.init_args.model_name_or_path",
                task_checkpoints["bert"],
                "--data.init_args.data_files",
                f"{{train: {stem}}}",
            ]
        )


def test_distributed_overlays_print_with_a_task_config_and_build_their_strategy(capsys: pytest.CaptureFixture) -> None:
    assert OVERLAYS == ["configs/distributed/ddp.yaml", "configs/distributed/fsdp_llama.yaml"]
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=str | Strategy)
    parser.add_argument("--plugins", type=list[AtomicCheckpointIO])
    for overlay in OVERLAYS:
        with pytest.raises(SystemExit) as exit_info:
            main(
                [
                    "fit",
                    "--config",
                    str(ROOT / "configs/llama/alpaca.yaml"),
                    "--config",
                    str(ROOT / overlay),
                    "--print_config",
                ]
            )
        assert exit_info.value.code == 0
        printed = yaml.safe_load(capsys.readouterr().out)
        assert printed["trainer"]["devices"] == 8 and printed["model"]["init_args"]["learning_rate"] == 2e-4
        section = {key: printed["trainer"][key] for key in ("strategy", "plugins")}
        built = parser.instantiate(parser.parse_object(section))
        assert [type(plugin) for plugin in built.plugins] == [AtomicCheckpointIO]
        if overlay.endswith("ddp.yaml"):
            assert built.strategy == "ddp"
            assert printed["trainer"]["accumulate_grad_batches"] == 8  # the task config's, kept
        else:
            policy = built.strategy.kwargs["auto_wrap_policy"]
            assert isinstance(policy, ModuleWrapPolicy) and policy._module_classes == {LlamaDecoderLayer}
            assert built.strategy.kwargs["use_orig_params"] is True
            assert printed["trainer"]["accumulate_grad_batches"] == 1  # 8 GPUs x 4 = the paper's batch of 32


def test_ddp_overlay_trains_two_cpu_processes_from_the_command_line(
    task_checkpoints: dict[str, str], workdir: Path
) -> None:
    """The `lorafa` console script, `fit --config TASK --config configs/distributed/ddp.yaml`, with 2 CPU processes
    (gloo): it trains and exits with status 0."""
    files = write_glue_files(workdir / "glue", ("sentence",), ("train", "validation"), False)
    command = [
        str(Path(sys.executable).parent / "lorafa"), "fit",
        "--config", "configs/glue/sst2_base.yaml", "--config", "configs/distributed/ddp.yaml",
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.precision", "32-true",
        "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", "outputs",
        "--model.init_args.model_name_or_path", task_checkpoints["roberta"],
        "--data.init_args.data_files", yaml.safe_dump(files, default_flow_style=True),
        "--data.init_args.batch_size", "4",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in output
    assert "`Trainer.fit` stopped: `max_steps=2` reached." in output
    (checkpoint,) = (workdir / "outputs").rglob("*.ckpt")
    state = torch.load(checkpoint, weights_only=True)
    assert state["global_step"] >= 1  # ModelCheckpoint keeps the best validation step
    assert state["state_dict"].pop(ADAPTER_ONLY_MARKER).numel() == 1
    assert state["state_dict"] and all("lora_" in k or "classifier" in k for k in state["state_dict"])
