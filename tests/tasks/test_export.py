"""`lorafa export`: the merged model (plain transformers, the trained model's logits) and the PEFT adapter, from the
checkpoint of a `lorafa fit` run, of a 2-process FSDP2 run (file and sharded directory), and at the end of fit
(`FitReport(export_merged=True)`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import quiet_trainer, randomize_lora_B, tiny_llama
from peft import PeftModel
from tiny_checkpoints import write_alpaca_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_lorafa import LoraFA, apply_lorafa, merge_lorafa
from lightning_lorafa.model.merge import merged_state_dict
from lightning_lorafa.tasks import FitReport, InstructionDataModule, InstructionTuner
from lightning_lorafa.tasks.cli import console_main, main
from lightning_lorafa.tasks.export import export, read_config

ROOT = Path(__file__).resolve().parents[2]
MMLU = str(ROOT / "data" / "mmlu")
WORKER = Path(__file__).parents[1] / "workers" / "export_worker.py"
TOKENS = torch.tensor([[2, 7, 11, 13, 17, 19, 23, 29, 31, 37]])


def logits_of(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=TOKENS).logits


def test_merged_state_dict_folds_the_adapter_without_changing_the_model() -> None:
    model = tiny_llama()
    apply_lorafa(model, r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    randomize_lora_B(model)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    state = merged_state_dict(model)
    assert all(torch.equal(model.state_dict()[key], value) for key, value in before.items())  # model unchanged
    merged = merge_lorafa(model)  # the in-place merge gives the same tensors under the same names
    assert sorted(state) == sorted(merged.state_dict())
    assert all(torch.equal(state[key], value) for key, value in merged.state_dict().items())
    assert "model.layers.0.self_attn.q_proj.weight" in state and not any("lora_" in key for key in state)


def run_config(checkpoint: str, tmp: Path) -> Path:
    """configs/llama/smollm2_alpaca.yaml pointed at the tiny LLaMA and 3 steps on a small Alpaca file."""
    config = yaml.safe_load((ROOT / "configs/llama/smollm2_alpaca.yaml").read_text())
    config["trainer"].update({"max_steps": 3, "val_check_interval": None, "limit_val_batches": 0, "logger": False})
    config["trainer"]["callbacks"][0]["init_args"].update({"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]})
    config["model"]["init_args"].update({"model_name_or_path": checkpoint, "learning_rate": 5e-2, "warmup_ratio": 0.0})
    config["data"]["init_args"].update(
        {"data_files": {"train": write_alpaca_file(tmp / "alpaca")}, "mmlu_dir": MMLU, "mmlu_subjects": ["anatomy"],
         "mmlu_questions_per_subject": 1, "max_length": 64, "batch_size": 2}
    )  # fmt: skip
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def fitted_run(task_checkpoints: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`lorafa fit` for 3 steps; its config, checkpoint and trained logits."""
    tmp = tmp_path_factory.mktemp("run")
    config = run_config(task_checkpoints["llama"], tmp)
    cli = main(["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp)])
    assert cli.trainer.global_step == 3
    cli.trainer.save_checkpoint(tmp / "run.ckpt")
    return {"config": config, "ckpt": tmp / "run.ckpt", "logits": logits_of(cli.model.model), "tmp": tmp}


def test_merged_export_loads_with_plain_transformers_and_gives_the_trained_logits(
    fitted_run: dict, task_checkpoints: dict[str, str]
) -> None:
    out = fitted_run["tmp"] / "merged"
    export([str(fitted_run["config"])], str(fitted_run["ckpt"]), str(out), "merged")
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert not any("lora" in key for key in merged.state_dict())
    difference = (logits_of(merged) - fitted_run["logits"]).abs().max().item()
    assert difference <= 1e-5, difference
    base = AutoModelForCausalLM.from_pretrained(task_checkpoints["llama"], dtype=torch.float32)
    assert (logits_of(base) - fitted_run["logits"]).abs().max() > 1e-3  # the adapter trained
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(task_checkpoints["llama"]).get_vocab()


def test_peft_export_from_the_command_line_loads_into_peft(
    fitted_run: dict, task_checkpoints: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = fitted_run["tmp"] / "adapter"
    argv = ["lorafa", "export", "--config", str(fitted_run["config"]), "--ckpt_path", str(fitted_run["ckpt"])]
    monkeypatch.setattr(sys, "argv", [*argv, "--format", "peft", "--output", str(out)])
    console_main()
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "CAUSAL_LM" and adapter_config["r"] == 8
    assert adapter_config["base_model_name_or_path"] == task_checkpoints["llama"]
    assert len(adapter_config["target_modules"]) == 4  # q_proj and v_proj of 2 layers
    base = AutoModelForCausalLM.from_pretrained(task_checkpoints["llama"], dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, out)
    torch.testing.assert_close(logits_of(peft_model), fitted_run["logits"], rtol=0, atol=1e-5)


def test_bad_export_input_is_explained(fitted_run: dict, tmp_path: Path) -> None:
    config = yaml.safe_load(fitted_run["config"].read_text())
    del config["trainer"]["callbacks"]
    no_callback = tmp_path / "no_callback.yaml"
    no_callback.write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match="no lightning_lorafa.LoraFA callback under trainer.callbacks"):
        export([str(no_callback)], str(fitted_run["ckpt"]), str(tmp_path / "out"))
    other_rank = tmp_path / "r4.yaml"
    other_rank.write_text(fitted_run["config"].read_text().replace("r: 8", "r: 4"))
    assert read_config([other_rank])["trainer"]["callbacks"][0]["init_args"]["r"] == 4
    with pytest.raises(ValueError, match="was saved with LoRA rank r=8, but the model has r=4"):
        export([str(other_rank)], str(fitted_run["ckpt"]), str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="checkpoint .*missing.ckpt does not exist"):
        export([str(fitted_run["config"])], str(tmp_path / "missing.ckpt"), str(tmp_path / "out"))


def test_a_quantized_base_checkpoint_is_refused_with_the_fix(
    fitted_run: dict, task_checkpoints: dict[str, str], tmp_path: Path
) -> None:
    quantized = tmp_path / "llama-bnb-4bit"
    AutoModelForCausalLM.from_pretrained(task_checkpoints["llama"]).save_pretrained(quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="is a quantized checkpoint \\(bitsandbytes .*pass base_model"):
        export([str(fitted_run["config"])], str(fitted_run["ckpt"]), str(tmp_path / "out"), base_model=str(quantized))


class QuantizedInstructionTuner(InstructionTuner):
    """An `InstructionTuner` whose base is loaded in 4-bit NF4 (bitsandbytes on CPU) when `quantization` is set."""

    def __init__(self, model_name_or_path: str, quantization: str | None = "nf4", **kwargs) -> None:
        super().__init__(model_name_or_path, **kwargs)
        if quantization is not None:
            from lightning_lorafa import load_quantized_model

            self.model = load_quantized_model(model_name_or_path, quantization, compute_dtype=torch.float32).train()


def test_adapter_trained_over_a_4bit_base_is_merged_into_the_full_precision_base(
    task_checkpoints: dict[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("bitsandbytes")
    config = yaml.safe_load(run_config(task_checkpoints["llama"], tmp_path).read_text())
    config["model"]["class_path"] = "test_export.QuantizedInstructionTuner"
    config["model"]["init_args"]["quantization"] = "nf4"
    path = tmp_path / "nf4.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = main(["fit", "--config", str(path), "--trainer.default_root_dir", str(tmp_path)])
    assert type(cli.model.model.model.layers[0].self_attn.q_proj.base).__name__ == "Linear4bit"
    cli.trainer.save_checkpoint(tmp_path / "nf4.ckpt")
    with caplog.at_level("WARNING", logger="lightning_lorafa.tasks.export"):
        export([str(path)], str(tmp_path / "nf4.ckpt"), str(tmp_path / "merged"))
    assert "trained over a quantized (nf4) base; the adapter is merged into the full-precision base" in caplog.text
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    reference = InstructionTuner(task_checkpoints["llama"]).model  # the full-precision base + the trained adapter
    apply_lorafa(reference, r=8, alpha=16, target_modules=["q_proj", "v_proj"])
    state = torch.load(tmp_path / "nf4.ckpt", weights_only=False)["state_dict"]
    reference.load_state_dict({key.removeprefix("model."): value for key, value in state.items()}, strict=False)
    assert any(layer.abs().sum() > 0 for key, layer in state.items() if key.endswith("lora_B"))
    torch.testing.assert_close(logits_of(merged), logits_of(reference), rtol=0, atol=1e-5)


def test_fit_report_writes_the_merged_model(task_checkpoints: dict[str, str], tmp_path: Path) -> None:
    data = InstructionDataModule(
        task_checkpoints["llama"], data_files={"train": write_alpaca_file(tmp_path)}, mmlu_dir=MMLU,
        mmlu_subjects=["anatomy"], mmlu_questions_per_subject=1, batch_size=2, max_length=64,
    )  # fmt: skip
    module = InstructionTuner(task_checkpoints["llama"], learning_rate=5e-2, warmup_ratio=0.0)
    report = FitReport(output_dir=str(tmp_path / "outputs"), task_type="CAUSAL_LM", export_merged=True)
    trainer = quiet_trainer(
        tmp_path,
        accelerator='cpu',
        max_steps=2,
        limit_val_batches=0,
        callbacks=[LoraFA(r=4, alpha=8), report],
    )  # fmt: skip
    trainer.fit(module, data)
    assert report.summary["merged"] == str(tmp_path / "outputs" / "merged")
    merged = AutoModelForCausalLM.from_pretrained(report.summary["merged"], dtype=torch.float32)
    difference = (logits_of(merged) - logits_of(module.model)).abs().max().item()
    assert difference <= 1e-5, difference


def test_checkpoints_written_by_two_fsdp2_processes_export_the_trained_model(
    task_checkpoints: dict[str, str], tmp_path: Path
) -> None:
    """2-process CPU FSDP2 runs (tests/workers/export_worker.py) save a gathered checkpoint file and a sharded
    directory: the file exports to a merged model, the directory to a PEFT adapter, both with the sharded model's
    logits."""
    alpaca = write_alpaca_file(tmp_path / "alpaca")
    command = [sys.executable, str(WORKER), task_checkpoints["llama"], alpaca, str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = torch.load(tmp_path / "logits.pt", weights_only=False)
    assert results["world_size"] == 2 and (tmp_path / "sharded.ckpt" / "meta.pt").is_file()
    config = yaml.safe_load(run_config(task_checkpoints["llama"], tmp_path).read_text())
    config["trainer"]["callbacks"][0]["init_args"] = {"r": 4, "alpha": 8, "target_modules": "all-linear"}
    path = tmp_path / "fsdp2.yaml"
    path.write_text(yaml.safe_dump(config))
    base = AutoModelForCausalLM.from_pretrained(task_checkpoints["llama"], dtype=torch.float32)
    assert (logits_of(base) - results["run.ckpt"]).abs().max() > 1e-3  # the run trained
    export([str(path)], str(tmp_path / "run.ckpt"), str(tmp_path / "merged"), "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    difference = (logits_of(merged) - results["run.ckpt"]).abs().max().item()
    assert difference <= 1e-5, difference
    export([str(path)], str(tmp_path / "sharded.ckpt"), str(tmp_path / "adapter"), "peft")
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter")
    torch.testing.assert_close(logits_of(peft_model), results["sharded.ckpt"], rtol=0, atol=1e-5)


def test_a_checkpoint_carrying_a_pickled_call_is_refused_by_lorafa_export(fitted_run: dict, tmp_path: Path):
    """`lorafa export` reads the checkpoint weights-only: a payload that would create a file does not run;
    `--no-weights_only` (a checkpoint the user trusts) reads it whole."""
    import os

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'ran'}",)

    checkpoint = torch.load(fitted_run["ckpt"], weights_only=True)
    checkpoint["hyper_parameters"]["note"] = Payload()
    torch.save(checkpoint, tmp_path / "poisoned.ckpt")
    args = ["--config", str(fitted_run["config"]), "--ckpt_path", str(tmp_path / "poisoned.ckpt"), "--format", "peft"]
    from lightning_lorafa.tasks.export import main as export_main

    with pytest.raises(ValueError, match=r"poisoned\.ckpt holds objects that weights-only loading refuses \(.*GLOBAL "
                       r"posix\.system.*pass weights_only=False \(`lorafa export --no-weights_only`\)"):
        export_main([*args, "--output", str(tmp_path / "refused")])
    assert not (tmp_path / "ran").exists() and not (tmp_path / "refused").exists()
    export_main([*args, "--output", str(tmp_path / "trusted"), "--no-weights_only"])
    assert (tmp_path / "ran").exists() and (tmp_path / "trusted" / "adapter_model.safetensors").is_file()
