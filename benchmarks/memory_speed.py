"""Activation memory and speed of Full-FT, PEFT LoRA, PEFT LoRA with frozen A, and LoRA-FA (ours).

Every method gets the same model (built from a config with random weights: no download), batch, sequence,
dropout and attention implementation. Ours is ``prepare_model`` (what the ``LoraFA`` callback runs on ``setup``)
with ``create_lorafa_optimizer``.

    python benchmarks/memory_speed.py                       # CPU: saved-activation bytes and step time
    python benchmarks/memory_speed.py --device cuda         # GPU: bf16, paper settings, peak memory, tokens/s

CPU mode measures what one training forward saves for backward (``measure_saved_activations``) and the median
time of a training step (forward, backward, optimizer step), with layers shrunk (``--cpu_layers``) and a small
batch. CUDA mode measures ``torch.cuda.max_memory_allocated`` over training steps in bf16 at the paper's batch,
sequence and rank (Table 5). Writes ``benchmarks/results/<machine>-<date>.md`` and a bar chart next to it.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import matplotlib
import torch
from jsonargparse import CLI
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
    T5Config,
    T5ForConditionalGeneration,
)

from lightning_lorafa import LoraFASettings, create_lorafa_optimizer, prepare_model
from lightning_lorafa.profiling import measure_saved_activations, measure_step

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METHODS = ("Full-FT", "LoRA", "LoRA (A frozen)", "LoRA-FA (ours)", "ours, masks kept")
OURS = METHODS.index("LoRA-FA (ours)")
COMPILED_METHODS = ("LoRA", "LoRA-FA (ours)")  # --compile compiles these two (compiling is slow)
RECOMPUTE_PREFIX = "ours, recompute="  # extra methods: ours with LoraFA(recompute=...), from --recompute
ROBERTA_TARGETS = ["query", "key", "value", "dense"]
T5_TARGETS = ["q", "k", "v", "o", "wi", "wo"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]  # transformers' Conv1D (weight stored (d_in, d_out))
#: The attention projections, the fused experts and the router of every MoE block (what PEFT's all-linear adapts).
MOE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "experts", "gate"]
#: PEFT's target_parameters for the experts and the router (a weight, not a linear module).
MOE_PARAMETERS = ["experts.gate_up_proj", "experts.down_proj", "gate.weight"]
MOE_EXPERTS = MOE_PARAMETERS[:2]


@dataclass(frozen=True)
class Spec:
    """A model shape and the paper's settings for it: GPU batch/sequence/rank, and the CPU batch/sequence."""

    family: str
    width: int
    layers: int
    heads: int
    ffn: int
    batch: int
    seq: int
    rank: int
    cpu_batch: int = 8
    cpu_seq: int = 128
    vocab: int = 0
    experts: int = 0  # MoE: experts per block (ffn is each expert's intermediate size)
    top_k: int = 0  # MoE: experts per token


SPECS = {
    "roberta-tiny": Spec("roberta", 256, 4, 4, 1024, 8, 128, 8, vocab=1000),
    "roberta-base": Spec("roberta", 768, 12, 12, 3072, 64, 128, 8),
    "roberta-large": Spec("roberta", 1024, 24, 16, 4096, 64, 128, 8),
    "t5-small": Spec("t5", 512, 6, 8, 2048, 128, 128, 8, cpu_batch=4),
    "t5-base": Spec("t5", 768, 12, 12, 3072, 64, 128, 8, cpu_batch=4),
    "t5-large": Spec("t5", 1024, 24, 16, 4096, 32, 128, 16, cpu_batch=4),
    "llama-7b": Spec("llama", 4096, 32, 32, 11008, 16, 1024, 64, cpu_batch=1, cpu_seq=128),
    "gpt2": Spec("gpt2", 768, 12, 12, 3072, 16, 1024, 8, cpu_batch=4),
    # MoE shapes at a quarter of the real widths (Mixtral-8x7B: 4096 / 14336, 8 experts, top-2; Qwen3-30B-A3B:
    # 2048 / 768, 128 experts, top-8) so that one block fits a CPU step.
    "mixtral-quarter": Spec("mixtral", 1024, 32, 8, 3584, 8, 512, 8, cpu_batch=4, experts=8, top_k=2),
    "qwen3-moe-quarter": Spec("qwen3moe", 512, 48, 8, 192, 8, 512, 8, cpu_batch=4, experts=32, top_k=8),
}
#: Families whose LoRA (PEFT) adapts fused experts through ``target_parameters``, which refuses dropout.
MOE_FAMILIES = ("mixtral", "qwen3moe")


def build_model(spec: Spec, layers: int, dropout: float) -> tuple[nn.Module, list[str], list[str] | None]:
    """A randomly initialised model: (model, LoRA target module suffixes, modules to save)."""
    torch.manual_seed(0)
    if spec.family == "roberta":
        config = RobertaConfig(
            vocab_size=spec.vocab or 50265,
            hidden_size=spec.width,
            num_hidden_layers=layers,
            num_attention_heads=spec.heads,
            intermediate_size=spec.ffn,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
            max_position_embeddings=514,
            num_labels=2,
        )
        return RobertaForSequenceClassification(config), ROBERTA_TARGETS, ["classifier"]
    if spec.family == "t5":
        config = T5Config(
            vocab_size=spec.vocab or 32128,
            d_model=spec.width,
            d_kv=spec.width // spec.heads,
            d_ff=spec.ffn,
            num_layers=layers,
            num_heads=spec.heads,
            dropout_rate=dropout,
            decoder_start_token_id=0,
            pad_token_id=0,
        )
        return T5ForConditionalGeneration(config), T5_TARGETS, None
    if spec.family == "gpt2":
        config = GPT2Config(
            vocab_size=spec.vocab or 50257,
            n_embd=spec.width,
            n_layer=layers,
            n_head=spec.heads,
            n_inner=spec.ffn,
            n_positions=1024,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
        )
        return GPT2LMHeadModel(config), GPT2_TARGETS, None
    if spec.family in MOE_FAMILIES:
        common = dict(
            vocab_size=spec.vocab or 32000,
            hidden_size=spec.width,
            num_hidden_layers=layers,
            num_attention_heads=spec.heads,
            num_key_value_heads=max(1, spec.heads // 4),
            num_experts_per_tok=spec.top_k,
            max_position_embeddings=4096,
            attention_dropout=dropout,
        )
        if spec.family == "mixtral":
            config = MixtralConfig(intermediate_size=spec.ffn, num_local_experts=spec.experts, **common)
            return MixtralForCausalLM(config), MOE_TARGETS, None
        config = Qwen3MoeConfig(moe_intermediate_size=spec.ffn, num_experts=spec.experts, head_dim=64, **common)
        return Qwen3MoeForCausalLM(config), MOE_TARGETS, None
    config = LlamaConfig(
        vocab_size=spec.vocab or 32000,
        hidden_size=spec.width,
        intermediate_size=spec.ffn,
        num_hidden_layers=layers,
        num_attention_heads=spec.heads,
        max_position_embeddings=4096,
        attention_dropout=dropout,
    )
    return LlamaForCausalLM(config), LLAMA_TARGETS, None


def prepare(
    method: str, model: nn.Module, targets: list[str], to_save: list[str] | None, r: int, lora_dropout: float, attn: str
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Set ``model`` up for ``method``; return it and its optimizer."""
    model.set_attn_implementation(attn)
    if method == "LoRA-FA (ours)" or method.startswith("ours, "):
        settings = LoraFASettings(
            r=r,
            alpha=2 * r,
            dropout=lora_dropout,
            target_modules=targets,
            modules_to_save=to_save or [],
            attn_implementation=attn,
            recompute_dropout=method != "ours, masks kept",  # the model's own dropouts keep their masks then
            recompute=method.removeprefix(RECOMPUTE_PREFIX) if method.startswith(RECOMPUTE_PREFIX) else "none",
        )
        prepare_model(model, settings)  # what LoraFA(**settings) runs on setup
        return model, create_lorafa_optimizer(model, lr=1e-4)
    if method != "Full-FT":
        experts = "experts" in targets
        config = LoraConfig(
            r=r,
            lora_alpha=2 * r,
            lora_dropout=0.0 if experts else lora_dropout,  # PEFT adapts experts only without dropout
            target_modules=[t for t in targets if t not in ("experts", "gate")],
            target_parameters=MOE_PARAMETERS if experts else None,
            fan_in_fan_out=model.config.model_type == "gpt2",
        )
        config.modules_to_save = to_save
        model = get_peft_model(model, config)
        if method == "LoRA (A frozen)":
            for name, param in model.named_parameters():
                if "lora_A" in name:
                    param.requires_grad_(False)
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def make_batch(spec: Spec, model: nn.Module, batch: int, seq: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Random token ids and labels for one training step."""
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (batch, seq), generator=generator).to(device)
    if spec.family == "roberta":
        return {"input_ids": ids, "labels": torch.randint(0, 2, (batch,), generator=generator).to(device)}
    if spec.family == "t5":
        return {"input_ids": ids, "labels": torch.randint(3, vocab, (batch, seq), generator=generator).to(device)}
    return {"input_ids": ids, "labels": ids}


@dataclass
class Result:
    model: str
    method: str
    layers: int
    batch: int
    seq: int
    rank: int
    trainable: int
    activation_bytes: int | None
    seconds: float | None
    tokens_per_second: float | None
    peak_bytes: int | None
    by_op: dict[str, int] | None = None
    compile_seconds: float | None = None
    compiled_seconds: float | None = None


@contextlib.contextmanager
def on_device(device: torch.device) -> Iterator[None]:
    """Create tensors on ``device`` (on CUDA: in bfloat16) while the context is open."""
    dtype = torch.get_default_dtype()
    if device.type == "cuda":
        torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(dtype)


def setup_one(
    name: str,
    method: str,
    device: torch.device,
    layers: int,
    dropout: float,
    lora_dropout: float,
    attn: str,
    width: int | None = None,
) -> tuple[nn.Module, torch.optim.Optimizer, Spec]:
    """Build ``name`` (``width``: shrink hidden size, heads and FFN for the host-overhead mode) set up for
    ``method``, in training mode; return the model, its optimizer and the (possibly shrunk) spec."""
    spec = SPECS[name]
    if width is not None:
        spec = replace(spec, width=width, heads=max(1, width // 16), ffn=4 * width, rank=min(spec.rank, width // 4))
        spec = replace(spec, vocab=1000)
    with on_device(device):  # CUDA: bf16 weights made on the GPU, no fp32 copy on the host (LLaMA-7B: 27 GB)
        model, targets, to_save = build_model(spec, layers, dropout)
    model, optimizer = prepare(method, model, targets, to_save, spec.rank, lora_dropout, attn)
    return model.train(), optimizer, spec


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: dict) -> Callable[[], None]:
    """One optimizer step on ``inputs``: zero_grad, forward, backward, step (``model`` may be compiled)."""

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()
        optimizer.step()

    return step


def run_one(
    name: str,
    method: str,
    device: torch.device,
    layers: int,
    batch: int,
    seq: int,
    dropout: float,
    lora_dropout: float,
    attn: str,
    repeats: int,
    compile: bool = False,
) -> Result:
    """Build, set up and measure one (model, method) pair (with ``compile``: also compiled)."""
    model, optimizer, spec = setup_one(name, method, device, layers, dropout, lora_dropout, attn)
    inputs = make_batch(spec, model, batch, seq, device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    step = training_step(model, optimizer, inputs)

    activations = by_op = None
    if device.type == "cpu":
        report = measure_saved_activations(lambda: model(**inputs).loss, module=model)
        activations, by_op = report.total_bytes, report.by_op
    result = Result(name, method, layers, batch, seq, spec.rank, trainable, activations, None, None, None, by_op)
    try:
        if repeats > 0:
            stats = measure_step(step, tokens=batch * seq, repeats=repeats, warmup=1, device=device)
            result.seconds, result.tokens_per_second = stats.seconds, stats.tokens_per_second
            result.peak_bytes = stats.peak_allocated_bytes
        if compile and repeats > 0 and method in COMPILED_METHODS:
            compiled = training_step(torch.compile(model), optimizer, inputs)
            start = time.perf_counter()
            compiled()  # the first call compiles
            _synchronize(device)
            result.compile_seconds = time.perf_counter() - start
            stats = measure_step(compiled, tokens=batch * seq, repeats=repeats, warmup=1, device=device)
            result.compiled_seconds = stats.seconds
    except torch.OutOfMemoryError:
        result.seconds = result.tokens_per_second = result.peak_bytes = None
    return result


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_overhead_table(
    names: list[str], layers: dict[str, int], width: int, repeats: int, dropout: float, lora_dropout: float, attn: str
) -> str:
    """Step time of every method at batch 1 x 8 tokens on narrow models (``width``) of each model's depth.

    With so little arithmetic the step time is the framework's and our own host work per op and layer,
    which is what bounds a GPU step on small and medium models. Methods are timed interleaved (one step of
    each in turn, ``repeats`` rounds, after two warm-up rounds), on one thread; the table reports each method's
    median wall time, and the ratio of ours to PEFT LoRA by wall time and by the thread's CPU time (which
    other processes on a shared machine disturb less).
    """
    device = torch.device("cpu")
    heads = "| model | layers | width | " + " | ".join(METHODS) + " | ours/LoRA | ours/LoRA, CPU time |"
    rows = [heads, "|---|---:|---:|" + "---:|" * (len(METHODS) + 2)]
    for name in names:
        steps = {}
        for method in METHODS:
            model, optimizer, spec = setup_one(name, method, device, layers[name], dropout, lora_dropout, attn, width)
            steps[method] = training_step(model, optimizer, make_batch(spec, model, 1, 8, device))
        wall: dict[str, list[float]] = {method: [] for method in METHODS}
        cpu: dict[str, list[float]] = {method: [] for method in METHODS}
        for round_ in range(repeats + 2):
            for method, step in steps.items():
                start, start_cpu = time.perf_counter(), time.thread_time()
                step()
                if round_ >= 2:
                    wall[method].append(time.perf_counter() - start)
                    cpu[method].append(time.thread_time() - start_cpu)
        median = {method: statistics.median(values) for method, values in wall.items()}
        median_cpu = {method: statistics.median(values) for method, values in cpu.items()}
        print(f"{name:14s} " + "  ".join(f"{m}: {v * 1e3:.2f} ms" for m, v in median.items()), flush=True)
        cells = " | ".join(f"{median[m] * 1e3:.2f}" for m in METHODS)
        ours = METHODS[OURS]
        ratios = f"{_ratio(median[ours], median['LoRA'])} | {_ratio(median_cpu[ours], median_cpu['LoRA'])}"
        rows.append(f"| {name} | {layers[name]} | {width} | {cells} | {ratios} |")
    return "\n".join(rows)


def machine_name(device: torch.device) -> str:
    """The GPU name, or the CPU model and core count from /proc/cpuinfo."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE)
        model = names[0] if names else model
    return f"{model}, {os.cpu_count()} cores"


def _fmt(value: float | None, digits: int = 1) -> str:
    return "OOM" if value is None else f"{value:.{digits}f}"


def _ratio(ours: float | None, other: float | None) -> str:
    return "-" if ours is None or not other else f"{ours / other:.2f}x"


def tables(results: list[Result], cuda: bool) -> str:
    """Markdown: memory per method (Table 5 layout) with ratios, step time and tokens/s, trainable parameters."""
    models = list(dict.fromkeys(r.model for r in results))
    get = {(r.model, r.method): r for r in results}
    unit = "peak GB" if cuda else "saved-activation MiB"
    value = (lambda r: r.peak_bytes and r.peak_bytes / 1e9) if cuda else (lambda r: r.activation_bytes / 2**20)
    heads = (
        "| model | layers | batch | seq | rank | "
        + " | ".join(METHODS)
        + " | ours/LoRA | ours/LoRA (A frozen) | ours/Full-FT |"
    )
    lines = [f"### Memory ({unit})", "", heads, "|---|---:|---:|---:|---:|" + "---:|" * (len(METHODS) + 3)]
    for m in models:
        rows = [get[(m, method)] for method in METHODS]
        vals = [value(r) for r in rows]
        first = rows[0]
        lines.append(
            f"| {m} | {first.layers} | {first.batch} | {first.seq} | {first.rank} | "
            + " | ".join(_fmt(v) for v in vals)
            + f" | {_ratio(vals[OURS], vals[1])} | {_ratio(vals[OURS], vals[2])} | {_ratio(vals[OURS], vals[0])} |"
        )
    lines += ["", "### Training step: median ms (tokens/s)", ""]
    lines += ["| model | " + " | ".join(METHODS) + " | ours/LoRA time |", "|---|" + "---:|" * (len(METHODS) + 1)]
    for m in models:
        rows = [get[(m, method)] for method in METHODS]
        cells = ["OOM" if r.seconds is None else f"{r.seconds * 1e3:.0f} ({r.tokens_per_second:,.0f})" for r in rows]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {_ratio(rows[OURS].seconds, rows[1].seconds)} |")
    if any(r.compile_seconds is not None for r in results):
        lines += ["", "### torch.compile: median compiled step ms (compile s)", ""]
        lines += [
            "| model | " + " | ".join(METHODS) + " | ours/LoRA compiled |",
            "|---|" + "---:|" * (len(METHODS) + 1),
        ]
        for m in models:
            rows = [get[(m, method)] for method in METHODS]
            cells = [
                "-" if r.compiled_seconds is None else f"{r.compiled_seconds * 1e3:.0f} ({r.compile_seconds:.0f})"
                for r in rows
            ]
            ratio = _ratio(rows[OURS].compiled_seconds, rows[1].compiled_seconds)
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {ratio} |")
    lines += ["", "### Trainable parameters", ""]
    lines += ["| model | " + " | ".join(METHODS) + " |", "|---|" + "---:|" * len(METHODS)]
    for m in models:
        lines.append(f"| {m} | " + " | ".join(f"{get[(m, method)].trainable:,}" for method in METHODS) + " |")
    return "\n".join(lines)


def recompute_table(results: list[Result], cuda: bool) -> str:
    """Ours with each recompute setting: memory, its ratio to PEFT LoRA, and the step-time cost over ours."""
    settings = list(dict.fromkeys(r.method for r in results if r.method.startswith(RECOMPUTE_PREFIX)))
    get = {(r.model, r.method): r for r in results}
    memory = (lambda r: r.peak_bytes and r.peak_bytes / 1e9) if cuda else (lambda r: r.activation_bytes / 2**20)
    unit = "peak GB" if cuda else "saved-activation MiB"
    names = ["ours"] + [m.removeprefix("ours, ") for m in settings]
    lines = [f"### Selective recomputation: {unit}, step ms", ""]
    lines.append(
        "| model | LoRA | "
        + " | ".join(names)
        + " | "
        + " | ".join(f"{n}/LoRA" for n in names)
        + " | "
        + " | ".join(f"{n} ms" for n in names)
        + " | "
        + " | ".join(f"{n} time/ours" for n in names[1:])
        + " |"
    )
    lines.append("|---|" + "---:|" * (1 + 3 * len(names) + len(settings)))
    for m in dict.fromkeys(r.model for r in results):
        rows = [get[(m, method)] for method in (METHODS[OURS], *settings)]
        lora = memory(get[(m, "LoRA")])
        mems = [memory(r) for r in rows]
        cells = [_fmt(lora)] + [_fmt(v) for v in mems] + [_ratio(v, lora) for v in mems]
        cells += [("OOM" if cuda else "-") if r.seconds is None else f"{r.seconds * 1e3:.0f}" for r in rows]
        cells += [_ratio(r.seconds, rows[0].seconds) for r in rows[1:]]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def op_table(results: list[Result], model: str) -> str:
    """Saved-activation MiB by op for each method on ``model`` (CPU mode)."""
    rows = [r for r in results if r.model == model and r.by_op is not None]
    ops = sorted({op for r in rows for op in r.by_op}, key=lambda op: -max(r.by_op.get(op, 0) for r in rows))
    lines = [f"### {model}: saved-activation MiB by op", "", "| op | " + " | ".join(r.method for r in rows) + " |"]
    lines.append("|---|" + "---:|" * len(rows))
    lines += [f"| {op} | " + " | ".join(f"{r.by_op.get(op, 0) / 2**20:.2f}" for r in rows) + " |" for op in ops]
    return "\n".join(lines)


def moe_block_table(names: list[str], dropout: float, lora_dropout: float, batch: int = 4, seq: int = 128) -> str:
    """Saved-activation bytes of one MoE block (the first layer's sparse MLP: router and fused experts) on CPU:
    ours with ``lora_dropout`` on the experts against PEFT LoRA on the same experts (``target_parameters``) at
    dropout 0, by op."""
    lines = [
        "### One MoE block: saved-activation MiB, ours (experts adapted, LoRA dropout "
        f"{lora_dropout}) / PEFT LoRA (the same experts, dropout 0), batch {batch} x {seq} tokens",
        "",
        "| model | experts, top-k | ours | PEFT LoRA | ours/PEFT | ours: adapters' h and seeds | PEFT: grouped_mm "
        "(routed inputs, merged expert weights) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        spec = SPECS[name]
        model, _, _ = build_model(spec, 1, dropout)
        block = model.model.layers[0].mlp
        x = torch.randn(batch, seq, spec.width, generator=torch.Generator().manual_seed(0), requires_grad=True)
        ours = prepare_experts_only(block, spec.rank, lora_dropout)
        theirs = get_peft_model(
            block,
            LoraConfig(r=spec.rank, lora_alpha=2 * spec.rank, target_modules=[], target_parameters=MOE_EXPERTS),
        ).train()
        mine = measure_saved_activations(lambda m=ours, x=x: m(x).sum(), module=ours)
        peft = measure_saved_activations(lambda m=theirs, x=x: m(x).sum(), module=theirs)
        lines.append(
            f"| {name} | {spec.experts}, {spec.top_k} | {mine.total_bytes / 2**20:.2f} | "
            f"{peft.total_bytes / 2**20:.2f} | {mine.total_bytes / peft.total_bytes:.2f}x | "
            f"{mine.by_op.get('add_lora_fa_branch', 0) / 2**20:.2f} | {peft.by_op.get('grouped_mm', 0) / 2**20:.2f} |"
        )
    return "\n".join(lines)


def prepare_experts_only(block: nn.Module, r: int, lora_dropout: float) -> nn.Module:
    """A deep copy of a MoE ``block`` with LoRA-FA on its fused experts only, its dropouts keeping seeds."""
    import copy

    from lightning_lorafa import apply_lorafa
    from lightning_lorafa.model.dropouts import keep_dropout_seeds

    ours = copy.deepcopy(block).train()
    apply_lorafa(ours, r=r, alpha=2 * r, dropout=lora_dropout, target_modules=["experts"])
    keep_dropout_seeds(ours)
    return ours


def bar_chart(results: list[Result], cuda: bool, path: Path, title: str) -> None:
    """Grouped bars per model: memory and step time of each method relative to PEFT LoRA."""
    models = list(dict.fromkeys(r.model for r in results))
    get = {(r.model, r.method): r for r in results}
    memory = (lambda r: r.peak_bytes) if cuda else (lambda r: r.activation_bytes)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, metric, label in (
        (axes[0], memory, "peak memory" if cuda else "saved activations"),
        (axes[1], lambda r: r.seconds, "step time"),
    ):
        width = 0.8 / len(METHODS)
        for i, method in enumerate(METHODS):
            heights = []
            for m in models:
                value, base = metric(get[(m, method)]), metric(get[(m, "LoRA")])
                heights.append(value / base if value and base else 0.0)
            xs = [j + (i - (len(METHODS) - 1) / 2) * width for j in range(len(models))]
            ax.bar(xs, heights, width, label=method)
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_xticks(range(len(models)), models, rotation=20)
        ax.set_ylabel(f"{label} / PEFT LoRA")
        ax.set_title(label)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(
    device: str = "cpu",
    models: list[str] | None = None,
    cpu_layers: int = 1,
    cuda_layers: int | None = None,
    dropout: float = 0.1,
    lora_dropout: float = 0.1,
    attn: str = "sdpa",
    repeats: int = 3,
    recompute: list[str] | None = None,
    compile: bool = False,
    host_overhead: bool = False,
    host_width: int = 64,
    output_dir: str = "benchmarks/results",
) -> None:
    """Run every method on every model; print and write the tables and the chart.

    Args:
        device: "cpu" (saved-activation bytes, layers shrunk) or "cuda" (bf16, paper settings, peak memory).
        models: names from SPECS; default all (CPU) or all but roberta-tiny (CUDA).
        cpu_layers: layers kept on CPU for every model except roberta-tiny (which keeps its 4).
        cuda_layers: if given, layers kept on CUDA for every model (e.g. to fit LLaMA-7B); default all.
        dropout: the model's hidden and attention-probability dropout.
        lora_dropout: dropout on the LoRA branch (PEFT's ``lora_dropout``, ours' ``dropout``).
        attn: attention implementation of every method ("sdpa" or "eager"); ours then switches its dropout to
            the seed-kept kernel with ``replace_dropout``.
        repeats: timed training steps per method (after one warm-up step); the median is reported.
        recompute: ``LoraFA(recompute=...)`` settings to measure ours with, e.g. ``["none", "mlp", "block"]``; each
            setting but "none" adds a method "ours, recompute=<setting>" and a table of its memory and step time.
        compile: also ``torch.compile`` the models of PEFT LoRA and ours, and report compile time (the first
            compiled step) and the median compiled step time.
        host_overhead: instead, time every method interleaved at batch 1 x 8 tokens on narrow models of each
            model's depth (LLaMA-7B: 4 layers, or ``cuda_layers``) on CPU: the per-op and per-layer host work
            that bounds a GPU step on small and medium models. Default models: the GPU table's.
        host_width: hidden size of the narrow models of ``host_overhead`` (heads = width / 16, FFN = 4 x width).
        output_dir: where the markdown and PNG results go.
    """
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA GPU, and torch.cuda.is_available() is False here.")
    if dev.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device must be cpu or cuda, got {device!r}.")
    cuda = dev.type == "cuda"
    names = models or [n for n in SPECS if not (cuda and n == "roberta-tiny")]
    unknown = sorted(set(names) - set(SPECS))
    if unknown:
        raise SystemExit(f"unknown models {unknown}; choose from {list(SPECS)}.")
    torch.set_num_threads(os.cpu_count() or 1)
    machine, date = machine_name(dev), datetime.date.today().isoformat()
    if host_overhead:
        names = models or ["roberta-base", "roberta-large", "t5-base", "llama-7b"]
        depth = {n: min(cuda_layers or (4 if n == "llama-7b" else SPECS[n].layers), SPECS[n].layers) for n in names}
        torch.set_num_threads(1)
        table = host_overhead_table(names, depth, host_width, repeats, dropout, lora_dropout, attn)
        text = (
            f"## LoRA-FA host overhead: {machine}\n\n{date}; CPU, fp32, torch {torch.__version__}; batch 1 x 8 tokens; "
            f"models of the stated depth with hidden size {host_width}, one thread; attention {attn}; "
            f"model dropout {dropout}, LoRA dropout {lora_dropout}. Median ms of a training step (forward, backward, "
            f"optimizer step) over {repeats} interleaved rounds after 2 warm-up rounds.\n\n{table}\n"
        )
        print(text)
        _write(text, Path(output_dir), machine, "cpu-host", date)
        return
    bad = sorted(set(recompute or []) - {"none", "mlp", "block"})
    if bad:
        raise SystemExit(f"--recompute takes settings from none, mlp, block; got {bad}.")
    extra = tuple(RECOMPUTE_PREFIX + setting for setting in dict.fromkeys(recompute or []) if setting != "none")
    results = []
    for name in names:
        spec = SPECS[name]
        if cuda:
            layers = min(cuda_layers or spec.layers, spec.layers)
        else:
            layers = spec.layers if name == "roberta-tiny" else min(cpu_layers, spec.layers)
        batch, seq = (spec.batch, spec.seq) if cuda else (spec.cpu_batch, spec.cpu_seq)
        for method in METHODS + extra:
            result = run_one(name, method, dev, layers, batch, seq, dropout, lora_dropout, attn, repeats, compile)
            print(f"{name:14s} {method:16s} {result.seconds}", flush=True)
            results.append(result)
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()

    mode = "CUDA, bf16 weights, paper settings" if cuda else "CPU, fp32, layers shrunk (see the layers column)"
    header = [
        f"## LoRA-FA memory and speed: {machine}",
        "",
        f"{date}; {mode}; torch {torch.__version__}; attention {attn} for every method (ours: seed-kept "
        f"dropout kernel on CPU); model dropout {dropout}, LoRA dropout {lora_dropout}; alpha = 2r; "
        "random weights built from configs. Memory is "
        + (
            "peak `torch.cuda.max_memory_allocated` over training steps."
            if cuda
            else "what one training forward saves for backward (weights excluded, storages counted once)."
        )
        + " Step = forward + backward + optimizer step; tokens/s counts batch x sequence input tokens."
        + (
            " On the MoE models PEFT's rows run lora_dropout 0 (its wrapper for fused experts refuses dropout);"
            " ours keeps the stated LoRA dropout."
            if any(SPECS[n].family in MOE_FAMILIES for n in names)
            else ""
        ),
        "",
        tables(results, cuda),
    ]
    if extra:
        header += ["", recompute_table(results, cuda)]
    if not cuda:
        check = [r for r in results if r.model == "roberta-tiny"]
        if check:
            header += ["", op_table(check, "roberta-tiny")]
        moe = [n for n in names if SPECS[n].family in MOE_FAMILIES]
        if moe:
            header += ["", moe_block_table(moe, dropout, lora_dropout)]
        if "roberta-tiny" in names:
            free = run_one("roberta-tiny", "LoRA-FA (ours)", dev, 4, 8, 128, dropout, 0.0, attn, repeats=0)
            ours = next(r for r in check if r.method == "LoRA-FA (ours)")
            header += [
                "",
                f"LoRA dropout cost (roberta-tiny, ours): lora_dropout {lora_dropout}: "
                f"{ours.activation_bytes:,} bytes; lora_dropout 0: {free.activation_bytes:,} bytes.",
            ]
    text = "\n".join(header) + "\n"
    print(text)
    stem = _write(text, Path(output_dir), machine, dev.type + ("-compile" if compile else ""), date)
    bar_chart(results, cuda, stem.with_suffix(".png"), f"{machine}: {mode}")
    print(f"wrote {stem.with_suffix('.png')}")


def _write(text: str, out: Path, machine: str, kind: str, date: str) -> Path:
    """Write ``text`` to ``out/<machine>-<kind>-<date>.md``; return the path without suffix."""
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", machine.lower()).strip("-")
    stem = out / f"{slug}-{kind}-{date}"
    stem.with_suffix(".md").write_text(text)
    print(f"wrote {stem.with_suffix('.md')}")
    return stem


if __name__ == "__main__":
    CLI(main, as_positional=False)
