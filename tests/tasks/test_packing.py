"""Padding-free packing: best-fit packs, a packed batch trains exactly like the same rows padded, and no row of a
pack attends to another."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import VOCAB, randomize_lora_B, tiny_llama
from datasets import Dataset
from tiny_checkpoints import build_tokenizer, write_alpaca_file
from transformers import AttentionInterface, DataCollatorForSeq2Seq
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from lightning_lorafa import LoraFA, apply_lorafa
from lightning_lorafa.adapters.find import lorafa_layers
from lightning_lorafa.model.attention import RECOMPUTED_DROPOUT_SDPA, register_seeded_dropout_attention
from lightning_lorafa.tasks import InstructionDataModule, InstructionTuner
from lightning_lorafa.tasks.packing import (
    PackedCollator,
    check_packing_supported,
    pack_dataset,
    pack_rows,
    packed_model_inputs,
)

MMLU = str(Path(__file__).resolve().parents[2] / "data" / "mmlu")
LENGTHS = (9, 4, 12, 3, 7, 5, 10, 2)  # prompt + response tokens of each row
MAX_LENGTH = 16


def rows() -> Dataset:
    """Rows of random token ids; the first third of each row is prompt (labels -100)."""
    generator = torch.Generator().manual_seed(0)
    data = {"input_ids": [], "attention_mask": [], "labels": []}
    for n in LENGTHS:
        ids = torch.randint(6, VOCAB, (n,), generator=generator).tolist()
        prompt = max(1, n // 3)
        data["input_ids"].append(ids)
        data["attention_mask"].append([1] * n)
        data["labels"].append([-100] * prompt + ids[prompt:])
    return Dataset.from_dict(data)


def lorafa_llama(implementation: str) -> torch.nn.Module:
    model = tiny_llama().train()  # train mode: LLaMA's config.use_cache is True, so a cache would be built
    apply_lorafa(model, r=4, alpha=8)
    randomize_lora_B(model)
    model.set_attn_implementation(implementation)
    return model


def test_best_fit_decreasing_packs() -> None:
    assert pack_rows([5, 3, 4, 2, 6, 1], 7) == [[4, 5], [0, 3], [2, 1]]
    assert pack_rows([3, 3, 3], 3) == [[0], [1], [2]]
    # 12 opens a pack, 10 and 9 open their own, 7 fills 9's, 5 joins 10, 4 fills 12's, 3 opens the last, 2 joins it
    assert pack_rows(list(LENGTHS), MAX_LENGTH) == [[2, 1], [6, 5], [0, 4], [3, 7]]
    with pytest.raises(ValueError, match="row 1 has 9 tokens; packing needs rows of 1 to max_length=8"):
        pack_rows([2, 9], 8)


def test_packed_rows_restart_positions_and_never_predict_the_next_row() -> None:
    data = rows()
    packed = pack_dataset(data, MAX_LENGTH)
    assert sum(packed["num_rows"]) == len(LENGTHS) and len(packed) == 4
    assert [len(ids) for ids in packed["input_ids"]] == [16, 15, 16, 5]
    pack = packed[0]  # rows 2 (12 tokens) and 1 (4 tokens)
    first, second = 2, 1
    n = LENGTHS[first]
    assert pack["position_ids"] == list(range(n)) + list(range(LENGTHS[second]))
    assert pack["input_ids"] == data[first]["input_ids"] + data[second]["input_ids"]
    assert pack["labels"][n] == -100  # the first token of every row is no target
    assert pack["labels"][n + 1 :] == data[second]["labels"][1:]
    batch = PackedCollator(pad_token_id=0)([packed[0], packed[3]])
    assert sorted(batch) == ["input_ids", "labels", "position_ids"]  # no attention_mask: the rows are in positions
    assert batch["input_ids"].shape == (2, 16)
    assert batch["input_ids"][1, 5:].tolist() == [0] * 11 and batch["labels"][1, 5:].tolist() == [-100] * 11
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 0, 1] + [0] * 11  # each padding token is its own row


def padded_and_packed(data: Dataset) -> tuple[dict, dict]:
    padded = DataCollatorForSeq2Seq(build_tokenizer(), label_pad_token_id=-100)([data[i] for i in range(len(data))])
    packed_rows = pack_dataset(data.remove_columns("attention_mask"), MAX_LENGTH)
    packed = PackedCollator(pad_token_id=0)([packed_rows[i] for i in range(len(packed_rows))])
    return padded, packed


def loss_and_grads(model: torch.nn.Module, inputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {name: layer.lora_B.grad.clone() for name, layer in lorafa_layers(model).items()}


@pytest.mark.parametrize("implementation", ["sdpa", "eager", RECOMPUTED_DROPOUT_SDPA])
def test_packed_batch_has_the_loss_and_B_gradient_of_the_same_rows_padded(implementation: str) -> None:
    register_seeded_dropout_attention()  # registered on request: prepare_model does it for the callback
    model = lorafa_llama(implementation)
    padded, packed = padded_and_packed(rows())
    assert padded["input_ids"].numel() == 8 * 12 and packed["input_ids"].numel() == 4 * 16
    loss, grads = loss_and_grads(model, padded)
    packed_loss, packed_grads = loss_and_grads(model, packed_model_inputs(model, packed))
    torch.testing.assert_close(packed_loss, loss, rtol=1e-6, atol=1e-6)
    assert len(grads) == 14 and all(g.abs().sum() > 0 for g in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    # FlashAttention gets the packs flattened to one row (1, B * L): the same tokens and targets, the same loss
    flat = {key: value.reshape(1, -1) for key, value in packed.items()}
    torch.testing.assert_close(model(**flat, use_cache=False).loss, loss, rtol=1e-6, atol=1e-6)


def test_no_row_of_a_pack_attends_to_another() -> None:
    model = lorafa_llama("sdpa")
    data = rows()
    _, packed = padded_and_packed(data)
    packs = pack_rows(list(LENGTHS), MAX_LENGTH)
    with torch.no_grad():
        logits = model(**packed_model_inputs(model, packed)).logits
        crossing = model(**packed).logits  # with the cache that use_cache=True builds, transformers sees one row
        for p, pack in enumerate(packs):
            start = 0
            for i in pack:
                alone = model(input_ids=torch.tensor([data[i]["input_ids"]])).logits[0]
                torch.testing.assert_close(logits[p, start : start + LENGTHS[i]], alone, rtol=1e-5, atol=1e-5)
                if start:  # a later row of the pack sees the earlier rows when the cache hides the packing
                    assert (crossing[p, start : start + LENGTHS[i]] - alone).abs().max() > 1e-3
                start += LENGTHS[i]


def test_attention_without_a_packed_mask_is_refused() -> None:
    AttentionInterface.register("sdpa_without_mask", sdpa_attention_forward)  # no mask function registered
    model = lorafa_llama("sdpa_without_mask")
    with pytest.raises(ValueError, match="'sdpa_without_mask' builds no attention mask .* would attend to each other"):
        packed_model_inputs(model, {"input_ids": torch.zeros(1, 2, dtype=torch.long)})
    data = rows()
    _, packed = padded_and_packed(data)
    with torch.no_grad():  # what the refusal prevents: the second row of the first pack sees the first one
        first, second = pack_rows(list(LENGTHS), MAX_LENGTH)[0]
        logits = model(**packed, use_cache=False).logits[0, LENGTHS[first] : LENGTHS[first] + LENGTHS[second]]
        alone = model(input_ids=torch.tensor([data[second]["input_ids"]])).logits[0]
        assert (logits - alone).abs().max() > 1e-3
    assert check_packing_supported(lorafa_llama("eager")) == "eager"
    with pytest.raises(ValueError, match="holds none. Set packing: false"):
        check_packing_supported(torch.nn.Linear(2, 2))


def test_instruction_tuning_trains_on_packs(task_checkpoints: dict[str, str], tmp_path: Path) -> None:
    data = InstructionDataModule(
        task_checkpoints["llama"],
        data_files={"train": write_alpaca_file(tmp_path)},
        mmlu_dir=MMLU,
        mmlu_subjects=["anatomy"],
        mmlu_questions_per_subject=2,
        max_length=96,
        batch_size=2,
        packing=True,
    )
    data.setup("fit")
    train = data.datasets["train"]
    assert train["num_rows"] == [2, 2, 2]  # a long and a short instruction per pack
    batch = next(iter(data.train_dataloader()))
    assert "attention_mask" not in batch and (batch["position_ids"] == 0).sum() >= 2
    trainer = pl.Trainer(
        accelerator="cpu",
        fast_dev_run=True,
        callbacks=[LoraFA(r=4, alpha=8)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(InstructionTuner(task_checkpoints["llama"]), data)
    assert trainer.global_step == 1 and torch.isfinite(trainer.callback_metrics["train/loss"])
    assert trainer.lightning_module.model.config._attn_implementation == RECOMPUTED_DROPOUT_SDPA
