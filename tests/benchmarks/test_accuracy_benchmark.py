import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import accuracy  # noqa: E402

ROWS = [(f"sentence number {i} " + "word " * (i % 7), i % 2) for i in range(40)]


def tiny_bert(vocab_size: int) -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
    )
    return BertForSequenceClassification(config).eval()


def test_splits_are_disjoint_seeded_and_sized():
    splits = accuracy.make_splits(ROWS, None, n_eval=6, n_dev=4, n_train=20, seed=3)
    assert (len(splits.eval), len(splits.dev), len(splits.train)) == (6, 4, 20)
    assert len(set(splits.eval) | set(splits.dev) | set(splits.train)) == 30
    assert accuracy.make_splits(ROWS, None, 6, 4, 20, seed=3) == splits
    given = accuracy.make_splits(ROWS, ROWS[:2], 6, 4, 20, seed=3)
    assert given.eval == ROWS[:2] and len(given.dev) == 4
    with pytest.raises(ValueError, match="Only 30 training rows are left"):
        accuracy.make_splits(ROWS, None, 6, 4, 31, seed=3)


def test_sst2_file_without_its_header_is_refused(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("text\tlabel\nfine\t1\n")
    with pytest.raises(ValueError, match="header must be 'sentence<TAB>label'"):
        accuracy.read_sst2(str(path))
    path.write_text("sentence\tlabel\nfine\t1\n")
    assert accuracy.read_sst2(str(path)) == [("fine", 1)]


def test_micro_batches_give_the_batch_gradient():
    task = accuracy.SST2(max_length=16)
    model = tiny_bert(task.tokenizer.vocab_size)
    rows = ROWS[:12]
    model(**task.collate(rows)).loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    parts = task.micro_batches(rows, 3)
    assert [len(batch["labels"]) for batch, _ in parts] == [4, 4, 4]
    assert sum(weight for _, weight in parts) == pytest.approx(1.0)
    widths = [batch["input_ids"].shape[1] for batch, _ in parts]
    assert widths == sorted(widths) and widths[0] < task.collate(rows)["input_ids"].shape[1]
    for batch, weight in parts:
        (model(**batch).loss * weight).backward()
    for name, p in model.named_parameters():
        if name in expected and not name.endswith("key.bias"):  # the key bias's true gradient is zero
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-6)


def test_ours_uses_the_library_and_unknown_methods_are_named():
    task = accuracy.SST2(max_length=16)
    model, optimizer = accuracy.build("ours_orth", tiny_bert(64), task, r=4, lr=1e-3, lora_dropout=0.1)
    layers = accuracy.lorafa_layers(model)
    assert len(layers) == 2 * 6 + 1  # query, key, value, 3 dense per layer, and the pooler's dense
    for layer in layers.values():
        torch.testing.assert_close(layer.lora_A @ layer.lora_A.t(), torch.eye(4), rtol=0, atol=1e-5)
    assert sum(p.numel() for group in optimizer.param_groups for p in group["params"]) == 4 * (
        2 * (3 * 32 + 32 + 64 + 32) + 32
    ) + (32 * 2 + 2)
    with pytest.raises(ValueError, match="Unknown method 'qlora'"):
        accuracy.method_kind("qlora")


def test_report_keeps_runs_at_another_lora_dropout_apart():
    def run(method, seed, acc, dropout=None):
        row = {"task": "sst2", "method": method, "r": 16, "seed": seed, "lr": 0.002, "split": "eval", "accuracy": acc}
        row.update(trainable_params=10, memory_mib=1.0, memory_kind="cpu_estimate", train_seconds=1.0)
        return row if dropout is None else {**row, "lora_dropout": dropout}

    results = [run("ours", 0, 0.8), run("ours", 1, 0.9, 0.1), run("ours", 0, 0.5, 0.0), run("full", 0, 0.7)]
    rows = {row["method"]: row for row in accuracy.summarize(results, accuracy.SST2.__new__(accuracy.SST2))}
    assert set(rows) == {"ours", "ours (LoRA dropout 0)", "full"}  # records without the field: the default
    assert rows["ours"]["seeds"] == 2 and rows["ours"]["mean"] == pytest.approx(0.85)
    assert rows["ours (LoRA dropout 0)"]["mean"] == 0.5 and rows["ours (LoRA dropout 0)"]["kind"] == "ours"


def test_update_correction_variant_corrects_adams_step_not_the_gradient():
    task = accuracy.SST2(max_length=16)
    built = {}
    for method in ("ours_nocorr", "ours_update_corr"):
        torch.manual_seed(0)
        model, optimizer = accuracy.build(method, tiny_bert(task.tokenizer.vocab_size), task, 4, 1e-3, 0.0)
        model(**task.collate(ROWS[:4])).loss.backward()
        layers = dict(optimizer.lora_layers)
        before = {p: p.detach().clone() for p in layers}
        optimizer.step()
        built[method] = (layers, before)
    (plain, plain_before), (corrected, corrected_before) = built["ours_nocorr"], built["ours_update_corr"]
    assert len(plain) == len(corrected) == 13
    for (p, layer), (q, _) in zip(plain.items(), corrected.items(), strict=True):
        a = layer.lora_A.float()
        inverse = torch.linalg.inv(a @ a.t() + 1e-8 * torch.eye(4))
        step = (p - plain_before[p]) @ (inverse / inverse.diagonal().mean())
        torch.testing.assert_close(q - corrected_before[q], step, rtol=1e-4, atol=1e-7)


def test_bias_variant_trains_every_bias_and_norm_weight_too():
    task = accuracy.SST2(max_length=16)
    model, optimizer = accuracy.build("ours_bias", tiny_bert(64), task, r=4, lr=1e-3, lora_dropout=0.1)
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    extra = {name for name in trained if not name.endswith("lora_B") and not name.startswith("classifier")}
    assert extra and all(name.endswith(".bias") or "LayerNorm" in name for name in extra)
    assert {name for name, _ in model.named_parameters() if "LayerNorm" in name or name.endswith(".bias")} <= trained
    assert sum(len(group["params"]) for group in optimizer.param_groups) == len(trained)


def _input_moments(model, batch) -> dict:
    """Second moment (d_in, d_in) of each LoRA-FA layer's input over one eval forward of ``batch``."""
    moments = {}

    def hook(module, args):
        x = args[0].detach().reshape(-1, module.lora_A.shape[1]).float()
        moments[module] = x.t() @ x / x.shape[0]

    handles = [layer.register_forward_pre_hook(hook) for layer in accuracy.lorafa_layers(model).values()]
    with torch.no_grad():
        model.eval()(**batch)
    for handle in handles:
        handle.remove()
    return moments


def _row_space(a: torch.Tensor) -> torch.Tensor:
    """The orthogonal projection (d_in, d_in) onto the rows of ``a`` (r, d_in)."""
    a = a.double()
    return a.t() @ torch.linalg.solve(a @ a.t(), a)


def test_whitened_variant_keeps_the_row_space_and_whitens_the_projected_input():
    task = accuracy.SST2(max_length=16)
    torch.manual_seed(0)
    model, _ = accuracy.build("ours_white_nocorr", tiny_bert(task.tokenizer.vocab_size), task, 4, 1e-3, 0.1)
    rows, layers = ROWS[:16], accuracy.lorafa_layers(model)
    before = {layer: layer.lora_A.clone() for layer in layers.values()}
    moments = _input_moments(model, task.collate(rows))
    accuracy.whiten_lora_A(model, task, rows, torch.device("cpu"), n_batches=1)  # one batch: these rows
    whitened = 0
    for layer, old in before.items():
        new, sigma = layer.lora_A, moments[layer]
        assert not torch.equal(new, old)
        torch.testing.assert_close(_row_space(new), _row_space(old), rtol=0, atol=1e-5)
        energy = (old @ sigma @ old.t()).trace() / 4  # E|h|^2 per direction, kept
        values = torch.linalg.eigvalsh(old @ sigma @ old.t())
        if values[-1] < 1e5 * values[0]:  # the pooler's 16 near-parallel inputs: eigenvalues clamped instead
            torch.testing.assert_close(new @ sigma @ new.t(), energy * torch.eye(4), rtol=0, atol=1e-4 * energy)
            whitened += 1
    assert whitened == 12 and len(before) == 13


@pytest.mark.parametrize("whiten", [False, True])
def test_gradient_variant_spans_the_weight_gradients_top_right_singular_vectors(whiten):
    task = accuracy.SST2(max_length=16)
    torch.manual_seed(0)
    model, _ = accuracy.build("ours_grad_energy", tiny_bert(task.tokenizer.vocab_size), task, 4, 1e-3, 0.0)
    rows, layers = ROWS[:16], accuracy.lorafa_layers(model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    batch = task.collate(rows)
    for layer in layers.values():
        layer.base.weight.requires_grad_(True)
    model.eval()(**batch).loss.backward()
    gradients = {layer: layer.base.weight.grad.clone() for layer in layers.values()}
    for name, p in model.named_parameters():
        p.grad = None
        p.requires_grad_(name in trainable)
    kaiming = {layer: layer.lora_A.clone() for layer in layers.values()}
    moments = _input_moments(model, batch)
    accuracy.gradient_lora_A(model, task, rows, torch.device("cpu"), whiten=whiten, n_batches=1)
    assert {name for name, p in model.named_parameters() if p.requires_grad} == trainable
    assert all(p.grad is None for p in model.parameters())
    checked = 0
    for layer, grad in gradients.items():
        top = torch.linalg.svd(grad, full_matrices=False).Vh[:4]
        torch.testing.assert_close(_row_space(layer.lora_A), _row_space(top), rtol=0, atol=1e-4)
        sigma, old = moments[layer], kaiming[layer]
        new, energy = layer.lora_A, (old @ sigma @ old.t()).trace()  # Kaiming's E|h|^2
        values, before = torch.linalg.eigvalsh(new @ sigma @ new.t()), torch.linalg.eigvalsh(top @ sigma @ top.t())
        if before[-1] < 1e5 * before[0]:  # not clamped (a tiny model's inputs can be near-parallel)
            torch.testing.assert_close(values.sum(), energy, rtol=1e-3, atol=0)
            assert (values[-1] / values[0] < 1.001) == whiten
            checked += 1
    assert checked >= 10


def test_report_lists_dev_runs_of_several_seeds_with_their_mean(tmp_path):
    def dev(method, lr, seed, acc):
        return {"task": "sst2", "method": method, "r": 16, "seed": seed, "lr": lr, "split": "dev", "accuracy": acc}

    results = [dev("ours", 0.002, 0, 0.876), dev("ours", 0.001, 0, 0.869), dev("ours", 0.002, 1, 0.872)]
    results.append(dev("ours_white", 0.002, 0, 0.873))
    path = accuracy.write_report(results, accuracy.SST2.__new__(accuracy.SST2), tmp_path, "# header")
    lines = path.read_text().splitlines()
    assert "- ours r 16: 0.001: 0.869; 0.002, seeds 0,1: 0.876/0.872 (mean 0.8740)" in lines
    assert "- ours_white r 16: 0.002: 0.873" in lines


def _sst2_file(path: Path, rows: list[str]) -> str:
    path.write_text("sentence\tlabel\n" + "".join(rows))
    return str(path)


def test_command_line_trains_scores_and_appends_one_record_per_run(tmp_path):
    """The documented interface, end to end on the shipped MiniLM and SST-2 rows: a train file, an eval file
    of your own, two methods at one rate; one JSON line per run printed and appended, the report written."""
    shipped = (Path(__file__).resolve().parents[2] / "data" / "sst2" / "train.tsv").read_text().splitlines(True)[1:]
    train, evaluation = _sst2_file(tmp_path / "t.tsv", shipped[:40]), _sst2_file(tmp_path / "e.tsv", shipped[40:52])
    out = tmp_path / "out"
    command = [sys.executable, str(Path(accuracy.__file__)), "--task", "sst2", "--methods", "ours,lora"]
    command += ["--train_file", train, "--eval_file", evaluation, "--train_rows", "16", "--dev_rows", "4"]
    command += ["--epochs", "1", "--seeds", "0", "--lr", "1e-3", "--batch_size", "8", "--max_length", "16"]
    command += ["--threads", "1", "--output_dir", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    printed = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    saved = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert printed == saved and [run["method"] for run in saved] == ["ours", "lora"]
    for run in saved:
        assert (run["r"], run["seed"], run["lr"], run["split"], run["steps"]) == (16, 0, 1e-3, "eval", 2)
        assert round(run["accuracy"] * 12, 3) % 1 == 0  # 12 rows of the eval file scored
        assert run["train_seconds"] > 0
    # LoRA-FA trains B only: r * sum(d_out) over query/key/value/dense, plus the classifier; LoRA trains A too
    assert {run["method"]: run["trainable_params"] for run in saved} == {"ours": 338_690, "lora": 676_610}
    report = (out / "accuracy-sst2.md").read_text()
    assert "| ours | 16 | 0.001 | 1 |" in report and "| lora | 16 | 0.001 | 1 |" in report
    assert (out / "accuracy-sst2.png").stat().st_size > 0


def test_command_line_refuses_an_unknown_method_before_training(tmp_path):
    command = [sys.executable, str(Path(accuracy.__file__)), "--methods", "ours,qlora", "--output_dir", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and "Unknown method 'qlora'" in done.stderr
    assert not (tmp_path / "results.jsonl").exists()


def test_peft_lorafa_fp32_runs_peft_step_without_its_bf16_autocast(monkeypatch):
    import peft.optimizers.lorafa as peft_lorafa

    task = accuracy.SST2(max_length=16)
    used: list[torch.dtype] = []
    autocast = peft_lorafa.autocast

    def recording_autocast(*args, **kwargs):
        used.append(kwargs.get("dtype"))
        return autocast(*args, **kwargs)

    monkeypatch.setattr(peft_lorafa, "autocast", recording_autocast)
    monkeypatch.setattr(peft_lorafa, "is_bf16_available", lambda *_: True)  # as on any recent CPU or GPU
    for method, expected in (("peft_lorafa", [torch.bfloat16]), ("peft_lorafa_fp32", [])):
        torch.manual_seed(0)
        model, optimizer = accuracy.build(method, tiny_bert(task.tokenizer.vocab_size), task, 4, 1e-3, 0.0)
        scheduler = accuracy.linear_schedule(optimizer, warmup=1, total=4)  # wraps optimizer.step, as in a run
        model(**task.collate(ROWS[:4])).loss.backward()
        used.clear()
        optimizer.step()
        scheduler.step()
        assert set(used) == set(expected), method
        assert peft_lorafa.is_bf16_available() is True  # restored after the step
    assert accuracy.method_kind("peft_lorafa_fp32") == "peft_lorafa"


def test_the_run_seed_draws_our_A():
    """Each seed is a new draw of everything random, A included (PEFT's A comes from the seeded global generator)."""
    from lightning_lorafa.adapters.initialization import draw_lora_A, layer_seed

    task = accuracy.SST2(max_length=16)
    drawn = {}
    for seed in (0, 3):
        model, _ = accuracy.build("ours", tiny_bert(64), task, r=4, lr=1e-3, lora_dropout=0.0, seed=seed)
        drawn[seed] = {name: layer.lora_A.clone() for name, layer in accuracy.lorafa_layers(model).items()}
        for name, lora_A in drawn[seed].items():
            torch.testing.assert_close(lora_A, draw_lora_A(4, lora_A.shape[1], layer_seed(seed, name)), rtol=0, atol=0)
    assert not any(torch.equal(drawn[0][name], drawn[3][name]) for name in drawn[0])
