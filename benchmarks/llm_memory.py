"""Memory of LLM fine-tuning beyond the adapters: the logits, gradient checkpointing, recomputation, chunked loss.

At a 128k-262k vocabulary the (tokens x vocabulary) logits and log-probabilities are the largest activations of a
LoRA step, and LoRA-FA alone does not shrink them. This benchmark measures, on the shapes of three small LLMs built
from their configs (random weights, no download; SDPA attention, dropout 0, ``use_cache=False``, batch 1), what a
training step keeps and peaks at for PEFT LoRA (with and without gradient checkpointing and chunked loss), PEFT's
LoRA-FA optimizer, and ours (``prepare_model``) with ``chunked_loss``, ``recompute`` and, where ``prepare_model`` has
it, ``offload_activations`` (``CONFIGURATIONS``):

    python benchmarks/llm_memory.py                                  # every model and configuration, 2048 tokens
    python benchmarks/llm_memory.py --models '[llama-3.2-1b]' --layers 2 --tokens 512 --steps 3
    python benchmarks/llm_memory.py --device cuda --dtype bfloat16  # on a GPU

Every configuration adapts all linear layers but the LM head with rank ``r`` (alpha = 2r: 32 at r = 16) and trains
B (PEFT LoRA: A and B; PEFT's LoRA-FA optimizer freezes A); each gets a fresh model. For each one it reports:

- **saved**: the bytes one training forward (``model(**batch).loss``) keeps for backward, weights excluded, each
  storage once (``measure_saved_activations``); per token; the largest saved tensor; whether any saved tensor has
  a dimension equal to the vocabulary size. Not reported with ``offload_activations``: its saved-tensor hooks,
  inside the model's forward, take the tensors before the recorder sees them.
- **peak step**: ``peak_step_bytes`` of one training step (forward, backward, optimizer step), run after the
  warm-up steps and before the timed ones, with the gradients set to None first. It is the highest point the
  memory allocated by the step reaches above what was allocated when the step began: activations, gradients,
  the loss's and the optimizer's temporaries (and, with ``--warmup 0``, the optimizer state AdamW creates in its
  first step), but not the weights, the optimizer state of earlier steps or the batch. On CUDA that is
  ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus ``memory_allocated()`` at the
  start. On CPU it is read from ``torch.profiler`` (``profile_memory=True``): every allocation and free of the CPU
  allocator in the step is an event with its signed size; in time order their running sum is the memory the step
  holds at each moment, and the peak is its maximum. Frees of memory allocated before the profile began are not
  reported by the profiler (it does not know their size), which is why the gradients are set to None before the
  step and not inside it; such frees could only make the figure higher than the truth, never lower.
- **step s**: the median wall time of ``--steps`` training steps after ``--warmup`` steps and the profiled one.
- **weights**: parameter and buffer bytes (each storage once) and the trainable parameter count.

On a CPU at full depth, run it with ``MALLOC_MMAP_THRESHOLD_=1048576`` (glibc): otherwise malloc raises its mmap
threshold as large tensors are freed, the freed memory stays in the heap, and the process can grow to about twice
the memory its tensors hold (PEFT LoRA's full-depth Qwen3-1.7B step at 1,024 tokens passed 24 GB). The setting
changes no allocator event, so the saved and peak figures are the same; step times then include the page faults
of fresh mappings.

A second section projects the longest context one 80 GB GPU could train Llama-3.1-8B (bf16) on, from the
llama-3.2-1b measurements (the rule is printed with the numbers; it is a projection, not a measurement).
Results go to ``<out>/llm-memory-<machine>-<date>.md``.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import re
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import torch
import transformers
from jsonargparse import CLI
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.profiler import ProfilerActivity, profile
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_speed import _ratio, machine_name, training_step  # noqa: E402

from lightning_lorafa import LoraFASettings, create_lorafa_optimizer, prepare_model  # noqa: E402
from lightning_lorafa.model.chunked_loss import enable_chunked_loss  # noqa: E402
from lightning_lorafa.profiling import (  # noqa: E402
    ActivationReport,
    SavedTensor,
    measure_saved_activations,
    measure_step,
)


@dataclass(frozen=True)
class ModelSpec:
    """A causal LM class and its config at full depth (``num_hidden_layers`` is replaced by ``--layers``)."""

    model_class: type[nn.Module]
    config_class: type
    config: dict[str, Any]


MODELS: dict[str, ModelSpec] = {
    "llama-3.2-1b": ModelSpec(
        LlamaForCausalLM,
        LlamaConfig,
        dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            tie_word_embeddings=True,
            num_hidden_layers=16,
            max_position_embeddings=4096,
        ),
    ),
    "qwen3-1.7b": ModelSpec(
        Qwen3ForCausalLM,
        Qwen3Config,
        dict(
            hidden_size=2048,
            intermediate_size=6144,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=151936,
            tie_word_embeddings=True,
            num_hidden_layers=28,
        ),
    ),
    "gemma-3-1b": ModelSpec(
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        dict(
            hidden_size=1152,
            intermediate_size=6912,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=256,
            vocab_size=262144,
            num_hidden_layers=26,
            sliding_window=512,
            tie_word_embeddings=True,
        ),
    ),
}
#: The model the 8B projection is made from.
PROJECTED_FROM = "llama-3.2-1b"


@dataclass(frozen=True)
class Configuration:
    """How a model is set up for training: PEFT LoRA or ours (``prepare_model``), and what each adds."""

    library: str  # "peft" or "ours"
    gradient_checkpointing: bool = False  # PEFT: transformers' gradient_checkpointing_enable (non-reentrant)
    chunked_loss: bool = False  # PEFT: enable_chunked_loss(peft_model.get_base_model()); ours: chunked_loss=True
    peft_lorafa_optimizer: bool = False  # PEFT: peft.optimizers.create_lorafa_optimizer (A frozen) over AdamW
    recompute: str = "none"  # ours: prepare_model(recompute=...)
    offload_activations: bool = False  # ours: prepare_model(offload_activations=True)


CONFIGURATIONS: dict[str, Configuration] = {
    "peft-lora": Configuration("peft"),
    "peft-lora+gc": Configuration("peft", gradient_checkpointing=True),
    "peft-lora+chunked": Configuration("peft", chunked_loss=True),
    "peft-lora+gc+chunked": Configuration("peft", gradient_checkpointing=True, chunked_loss=True),
    "peft-lorafa": Configuration("peft", peft_lorafa_optimizer=True),
    "ours": Configuration("ours"),
    "ours+chunked": Configuration("ours", chunked_loss=True),
    "ours+chunked+mlp": Configuration("ours", chunked_loss=True, recompute="mlp"),
    "ours+chunked+block": Configuration("ours", chunked_loss=True, recompute="block"),
}
#: Activation offloading: ``ours+chunked+block+offload``, listed where ``prepare_model`` has ``offload_activations``.
#: Its hooks take the saved tensors inside the model's forward, where the recorder does not see them, so its saved
#: bytes are not reported; on CPU nothing moves (its peak is ``ours+chunked+block``'s), on a GPU its peak shows it.
OFFLOAD_SETTING = "offload_activations"
if OFFLOAD_SETTING in {f.name for f in dataclasses.fields(LoraFASettings)}:
    CONFIGURATIONS["ours+chunked+block+offload"] = Configuration(
        "ours", chunked_loss=True, recompute="block", offload_activations=True
    )
BASELINE = "peft-lora"


@dataclass(frozen=True)
class Projected:
    """How the 8B projection treats a configuration: whose saved bytes it keeps (``saves_as``), the configuration
    whose layer it holds in full while recomputing it in backward (``recomputes``), and whether its layers' saved
    bytes wait in CPU memory (``offloaded``)."""

    saves_as: str
    recomputes: str | None = None
    offloaded: bool = False


PROJECTED = {
    "peft-lora": Projected("peft-lora"),
    "peft-lora+gc": Projected("peft-lora+gc", recomputes="peft-lora"),
    "ours+chunked": Projected("ours+chunked"),
    "ours+chunked+block": Projected("ours+chunked+block", recomputes="ours+chunked"),
    "ours+chunked+block+offload": Projected("ours+chunked+block", recomputes="ours+chunked", offloaded=True),
}


def build_model(spec: ModelSpec, layers: int | None, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """``spec``'s model with random weights (seed 0), ``layers`` decoder layers (None: the spec's), SDPA attention,
    dropout 0, no KV cache, in training mode."""
    torch.manual_seed(0)
    settings = dict(spec.config, attention_dropout=0.0, use_cache=False, attn_implementation="sdpa")
    if layers is not None:
        settings["num_hidden_layers"] = layers
    with torch.device(device):
        model = spec.model_class(spec.config_class(**settings)).to(dtype)
    return model.train()


def set_up(model: nn.Module, configuration: str, r: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Set ``model`` up for ``configuration`` (rank ``r``, alpha 2r, every linear layer but the LM head); return the
    model to train and its optimizer."""
    setup = CONFIGURATIONS[configuration]
    if setup.library == "ours":
        extra = {OFFLOAD_SETTING: True} if setup.offload_activations else {}
        prepare_model(
            model,
            r=r,
            alpha=2 * r,
            chunked_loss=setup.chunked_loss,
            recompute=setup.recompute,
            attn_implementation="sdpa",
            **extra,
        )
        return model.train(), create_lorafa_optimizer(model, lr=1e-4)  # gradient-corrected AdamW over the B's
    if setup.gradient_checkpointing:  # transformers' gradient_checkpointing_enable, by its name since 5.x
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # PEFT reads transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = get_peft_model(model, config)
    if setup.chunked_loss:
        enable_chunked_loss(model.get_base_model())
    if setup.peft_lorafa_optimizer:
        from peft.optimizers import create_lorafa_optimizer as peft_lorafa_optimizer

        return model.train(), peft_lorafa_optimizer(model, r=r, lora_alpha=2 * r, lr=1e-4)
    return model.train(), torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def peak_step_bytes(step: Callable[[], Any], device: torch.device | str = "cpu") -> int:
    """The highest the memory allocated during ``step`` rises above what was allocated when it began (bytes).

    CUDA: ``max_memory_allocated`` over the step minus ``memory_allocated`` at its start. CPU: the maximum of the
    running sum of the CPU allocator's allocations (+) and frees (-) that ``torch.profiler`` records in the step, in
    time order (the module docstring says what that includes). Frees of memory allocated before the step are not
    recorded on CPU (the profiler does not know their size), so free what the step would free (e.g. gradients)
    before calling this.

    Checked by hand (torch 2.13, CPU): a step that allocates a 100 MiB uint8 tensor, fills and frees it, then
    allocates 10 MiB gives exactly 104,857,600 bytes (100 MiB), and the running sum ends at 10 MiB; a 50 MiB tensor
    allocated before the step and freed in it is not seen (the profiler warns "Memory block of unknown size was
    allocated before the profiling started").
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    cpu = {torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.MKLDNN, torch.autograd.DeviceType.IDEEP}
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() in cpu
    )
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak


@dataclass
class Result:
    """One (model, configuration) measured."""

    model: str
    configuration: str
    layers: int
    tokens: int
    vocab: int
    weight_bytes: int
    trainable: int
    saved_bytes: int | None  # None: not seen (offloading's hooks take the saved tensors)
    largest_bytes: int | None
    largest_shape: tuple[int, ...] | None
    largest_dtype: str | None
    vocab_saved: bool | None
    intermediate_bytes: int | None  # saved bytes of tensors as wide as the MLP's intermediate size
    peak_bytes: int | None
    seconds: float | None


def make_batch(vocab: int, tokens: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Random token ids (batch 1), their own labels."""
    ids = torch.randint(3, vocab, (1, tokens), generator=torch.Generator().manual_seed(0)).to(device)
    return {"input_ids": ids, "labels": ids}


def training_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
    """A training forward of ``model`` on ``batch``: its loss."""
    return lambda: model(**batch).loss


def weight_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters and buffers, each storage once (tied weights count once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in model.parameters()}
    storages |= {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in model.buffers()}
    return sum(storages.values())


def saved_facts(report: ActivationReport | None, vocab: int, intermediate: int, tokens: int) -> dict[str, Any]:
    """From a saved-activation report: total, largest tensor, whether one is vocabulary-sized, and the bytes of
    the tensors as wide as the MLP's intermediate size (last dimension ``intermediate``, one dimension ``tokens``).
    All None without a report."""
    if report is None:
        keys = ("saved_bytes", "largest_bytes", "largest_shape", "largest_dtype", "vocab_saved", "intermediate_bytes")
        return dict.fromkeys(keys)
    activations = [t for t in report.tensors if not t.is_weight]
    largest = max(activations, key=lambda t: t.nbytes, default=SavedTensor("-", (), torch.float32, 0, False))
    return dict(
        saved_bytes=report.total_bytes,
        largest_bytes=largest.nbytes,
        largest_shape=largest.shape,
        largest_dtype=str(largest.dtype).removeprefix("torch."),
        vocab_saved=any(vocab in t.shape for t in activations),
        intermediate_bytes=sum(
            t.nbytes for t in activations if t.shape and t.shape[-1] == intermediate and tokens in t.shape[:-1]
        ),
    )


def measure(
    build: Callable[[], nn.Module],
    configuration: str,
    tokens: int,
    r: int = 16,
    steps: int = 1,
    warmup: int = 1,
    device: torch.device | str = "cpu",
    model_name: str = "",
) -> Result:
    """Build a fresh model (``build()``), set it up for ``configuration`` and measure it: saved activations of one
    training forward, ``warmup`` steps, one profiled step (``peak_step_bytes``), ``steps`` timed steps."""
    device = torch.device(device)
    model = build()
    config = model.config
    layers, vocab, intermediate = config.num_hidden_layers, config.vocab_size, config.intermediate_size
    model, optimizer = set_up(model, configuration, r)
    batch = make_batch(vocab, tokens, device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    offloads = CONFIGURATIONS[configuration].offload_activations
    report = None if offloads else measure_saved_activations(training_loss(model, batch), model)
    step = training_step(model, optimizer, batch)
    for _ in range(warmup):
        step()
    optimizer.zero_grad(set_to_none=True)  # the profiled step starts without gradients (see peak_step_bytes)
    gc.collect()
    start = time.perf_counter()
    peak = peak_step_bytes(step, device)
    profiled_seconds = time.perf_counter() - start  # with the profiler on: the step time when steps == 0
    seconds = measure_step(step, tokens, repeats=steps, warmup=0, device=device).seconds if steps > 0 else None
    seconds = profiled_seconds if seconds is None else seconds
    result = Result(
        model_name,
        configuration,
        layers,
        tokens,
        vocab,
        weight_bytes(model),
        trainable,
        peak_bytes=peak,
        seconds=seconds,
        **saved_facts(report, vocab, intermediate, tokens),
    )
    del model, optimizer, step, batch, report
    gc.collect()
    return result


def measure_saved_only(build: Callable[[], nn.Module], configuration: str, tokens: int, r: int, device) -> Result:
    """``measure`` without any step: the saved activations of one training forward only."""
    model = build()
    config = model.config
    vocab, intermediate = config.vocab_size, config.intermediate_size
    model, _ = set_up(model, configuration, r)
    batch = make_batch(vocab, tokens, torch.device(device))
    report = measure_saved_activations(training_loss(model, batch), model)
    facts = saved_facts(report, vocab, intermediate, tokens)
    result = Result(
        "", configuration, config.num_hidden_layers, tokens, vocab, 0, 0, **facts, peak_bytes=None, seconds=None
    )
    del model, batch, report
    gc.collect()
    return result


def _mib(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:,.1f}"


def model_table(results: list[Result]) -> str:
    """Markdown: one row per configuration of one model, with ratios to PEFT LoRA."""
    base = next((r for r in results if r.configuration == BASELINE), None)
    lines = [
        "| configuration | saved MiB | saved bytes/token | largest saved tensor | vocab-sized saved? | peak step MiB | "
        "step s | saved vs peft-lora | peak vs peft-lora | time vs peft-lora | trainable params | weights MiB |",
        "|---|---:|---:|---|:-:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        seen = r.saved_bytes is not None
        shape = "x".join(map(str, r.largest_shape or ()))
        cells = [
            r.configuration,
            _mib(r.saved_bytes) if seen else "not seen (offloaded)",
            f"{r.saved_bytes / r.tokens:,.0f}" if seen else "-",
            f"{_mib(r.largest_bytes)} MiB ({shape}, {r.largest_dtype})" if seen else "-",
            ("yes" if r.vocab_saved else "no") if seen else "-",
            _mib(r.peak_bytes),
            "-" if r.seconds is None else f"{r.seconds:.2f}",
            _ratio(r.saved_bytes, base and base.saved_bytes),
            _ratio(r.peak_bytes, base and base.peak_bytes),
            _ratio(r.seconds, base and base.seconds),
            f"{r.trainable:,}",
            _mib(r.weight_bytes),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: Llama-3.1-8B's shape (untied embeddings), and what the projection budgets for.
LLAMA_8B = dict(
    params=8.03e9, hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256, head_dim=128
)
GPU_BYTES, ALLOWANCE = 80e9, 2 * 2**30
PUBLISHED = (
    "Published by Unsloth for Llama-3.1-8B on one 80 GB GPU: HF + FlashAttention-2: 28,454 tokens; "
    "Unsloth QLoRA with offloaded checkpointing: 342,733 tokens."
)


def adapter_params_8b(r: int) -> tuple[int, int]:
    """(A's, B's) parameter counts of rank-``r`` adapters on every linear layer of Llama-3.1-8B but its head."""
    h, i, kv = LLAMA_8B["hidden"], LLAMA_8B["intermediate"], LLAMA_8B["kv_heads"] * LLAMA_8B["head_dim"]
    linears = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # (in, out): q, k, v, o, gate, up, down
    return r * LLAMA_8B["layers"] * sum(d for d, _ in linears), r * LLAMA_8B["layers"] * sum(d for _, d in linears)


def projection(
    results: list[Result], shallow: dict[str, Result], spec: ModelSpec, r: int, dtype: torch.dtype = torch.float32
) -> str:
    """The 8B projection section from the ``PROJECTED_FROM`` results (measured in ``dtype``) at their depth and at
    another (``shallow``)."""
    get = {x.configuration: x for x in results}
    hidden, intermediate = spec.config["hidden_size"], spec.config["intermediate_size"]
    wide, other = LLAMA_8B["intermediate"] / intermediate, LLAMA_8B["hidden"] / hidden
    a_params, b_params = adapter_params_8b(r)
    weights = LLAMA_8B["params"] * 2
    dtype_factor = 2 / dtype.itemsize  # bf16 bytes over the measured dtype's: 0.5 from float32
    lines = [
        "## 8B projection",
        "",
        f"Llama-3.1-8B in bf16 on one 80 GB GPU, rank {r} on every linear layer but the head. The context is "
        "(80e9 - weights - adapters - gradients and AdamW state of the trainable adapters - 2 GiB allowance) / bytes "
        "per token, with weights = 8.03e9 x 2 bytes, adapters A and B in float32 "
        f"(A: {a_params:,}, B: {b_params:,} parameters; PEFT LoRA trains A and B, ours B), their gradients in float32 "
        "and AdamW's two float32 moments.",
        "",
        f"Bytes per token are scaled from the saved-activation bytes measured on {PROJECTED_FROM} at two depths "
        "(the depths' difference gives the bytes one decoder layer saves per token; the rest, at depth 0, is the "
        "embedding, final norm, head and loss). One layer's bytes are scaled to 8B by tensor width: tensors as wide "
        f"as the MLP's intermediate size by {LLAMA_8B['intermediate']}/{intermediate} = {wide:.3f}, all others by "
        f"the hidden size ratio {LLAMA_8B['hidden']}/{hidden} = {other:.3f} (the rank-r adapter products and "
        "attention's log-sum-exp do not grow, so this over-counts them), times 32 layers, and halved for bf16 "
        "when measured in float32. The rest is kept as measured: the vocabulary (128,256) is the same, and "
        "transformers computes the loss's log-probabilities in float32 whatever the model's dtype. A configuration "
        "that recomputes layers in backward (gradient checkpointing, recompute='block') also holds one layer's "
        "full activations while it recomputes it: the per-layer bytes of the configuration named in the "
        "'recomputes' column are added once. With activations offloaded, the layers' saved bytes (measured as the "
        "configuration in the 'saved as' column) wait in CPU memory (last column, at that context) and only the "
        "rest and the recomputed layer count on the GPU. Transients (the loss's gradient, the backward's "
        "temporaries) are not in saved bytes; the measured peak step / saved ratio at 1B is shown beside as a guide.",
        "",
        "| configuration | saved as | recomputes | 1B saved bytes/token | 1B per layer | 1B rest | 1B peak/saved | "
        "8B bf16 GPU bytes/token (projection, not measured) | longest context, tokens (projection, not measured) "
        "| CPU memory GB (projection) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def per_layer(x: Result, y: Result) -> tuple[float, float, float]:
        """(intermediate-wide, other) bytes per token of one layer, and the rest per token."""
        depth = x.layers - y.layers
        wide_bytes = (x.intermediate_bytes - y.intermediate_bytes) / depth / x.tokens
        other_bytes = (x.saved_bytes - x.intermediate_bytes - y.saved_bytes + y.intermediate_bytes) / depth / x.tokens
        rest = x.saved_bytes / x.tokens - x.layers * (wide_bytes + other_bytes)
        return wide_bytes, other_bytes, rest

    for name, how in PROJECTED.items():
        needed = [name, how.saves_as] + ([how.recomputes] if how.recomputes else [])
        if any(c not in get or c not in shallow for c in needed[1:]) or name not in get:
            continue
        x = get[how.saves_as]
        wide_b, other_b, rest = per_layer(x, shallow[how.saves_as])
        layers_8b = LLAMA_8B["layers"] * (wide_b * wide + other_b * other) * dtype_factor
        per_token = rest + (0.0 if how.offloaded else layers_8b)
        if how.recomputes:
            rw, ro, _ = per_layer(get[how.recomputes], shallow[how.recomputes])
            per_token += (rw * wide + ro * other) * dtype_factor
        trainable = b_params if name.startswith("ours") else a_params + b_params
        budget = GPU_BYTES - weights - 4 * (a_params + b_params) - 12 * trainable - ALLOWANCE
        context = budget / per_token
        peak = get[name].peak_bytes
        lines.append(
            f"| {name} | {how.saves_as} | {how.recomputes or '-'} | {x.saved_bytes / x.tokens:,.0f} | "
            f"{(wide_b + other_b):,.0f} | {rest:,.0f} | {'-' if peak is None else f'{peak / x.saved_bytes:.2f}'} | "
            f"{per_token:,.0f} | {context:,.0f} | {f'{layers_8b * context / 1e9:,.0f}' if how.offloaded else '-'} |"
        )
    lines += ["", PUBLISHED]
    return "\n".join(lines)


def alternate_step_times(
    spec: ModelSpec, first: str, second: str, layers: int | None, tokens: int, rounds: int, r: int, device, dtype
) -> str:
    """Step times of two configurations on two fresh models, in alternating steps (``rounds`` each, after one
    warm-up step each): the median of ``second``'s time over ``first``'s in the same round, as markdown."""
    steps = {}
    for name in (first, second):
        model, optimizer = set_up(build_model(spec, layers, device, dtype), name, r)
        batch = make_batch(model.config.vocab_size, tokens, device)
        steps[name] = training_step(model, optimizer, batch)
        steps[name]()
    times: dict[str, list[float]] = {first: [], second: []}
    for _ in range(rounds):
        for name in (first, second):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            steps[name]()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append(time.perf_counter() - start)
    ratios = [b / a for a, b in zip(times[first], times[second], strict=True)]
    cells = " | ".join(f"{a:.2f} / {b:.2f}" for a, b in zip(times[first], times[second], strict=True))
    return (
        f"Alternating steps, {first} / {second} seconds per round: {cells}. Median {second} / {first}: "
        f"**{statistics.median(ratios):.3f}x** (min {min(ratios):.3f}x, max {max(ratios):.3f}x)."
    )


def main(
    models: list[str] | None = None,
    configs: list[str] | None = None,
    layers: int | None = None,
    tokens: int = 2048,
    steps: int = 1,
    warmup: int = 1,
    r: int = 16,
    device: str = "cpu",
    dtype: str = "float32",
    out: str = "benchmarks/results",
    alternate: int = 0,
) -> str:
    """Measure every configuration on every model; print and write the tables and the 8B projection.

    Args:
        models: names from MODELS (default: all).
        configs: names from CONFIGURATIONS (default: all).
        layers: decoder layers of every model (default: each model's full depth).
        tokens: sequence length (batch 1).
        steps: timed training steps (their median is reported; 0: the profiled step's wall time, profiler on).
        warmup: training steps before the profiled one (0: the profiled step is the first, and its peak includes
            the optimizer state AdamW creates).
        r: adapter rank (alpha = 2r).
        device: "cpu" or "cuda".
        dtype: the model's dtype ("float32" or "bfloat16").
        out: folder of the results file.
        alternate: rounds of alternating steps of ``ours`` and ``ours+chunked`` per model (0: none), after the
            table: the step-time cost of the chunked loss, measured side by side.
    """
    names, chosen = models or list(MODELS), configs or list(CONFIGURATIONS)
    for kind, given, known in (("models", names, MODELS), ("configs", chosen, CONFIGURATIONS)):
        unknown = [n for n in given if n not in known]
        if unknown:
            raise SystemExit(f"--{kind}: unknown {unknown}; choose from {list(known)}.")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA GPU, and torch.cuda.is_available() is False here.")
    if dtype not in ("float32", "bfloat16"):
        raise SystemExit(f"--dtype must be float32 or bfloat16, got {dtype!r}.")
    torch_dtype = getattr(torch, dtype)
    machine, date = machine_name(dev), datetime.date.today().isoformat()
    sections = []
    for name in names:
        spec = MODELS[name]
        results = []
        for configuration in chosen:
            result = measure(
                lambda spec=spec: build_model(spec, layers, dev, torch_dtype),
                configuration,
                tokens,
                r,
                steps,
                warmup,
                dev,
                model_name=name,
            )
            print(
                f"{name} {configuration}: saved {_mib(result.saved_bytes)} MiB, peak {_mib(result.peak_bytes)} MiB, "
                f"step {result.seconds if result.seconds is None else round(result.seconds, 2)} s",
                flush=True,
            )
            results.append(result)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        depth = results[0].layers
        title = f"## {name} ({depth} layer{'s' if depth != 1 else ''}, {tokens} tokens, batch 1)"
        sections.append(f"{title}\n\n{model_table(results)}")
        if alternate > 0:
            sections.append(
                alternate_step_times(spec, "ours", "ours+chunked", layers, tokens, alternate, r, dev, torch_dtype)
            )
            print(sections[-1], flush=True)
        if name == PROJECTED_FROM:
            other_depth = 1 if depth > 1 else 2
            build = lambda spec=spec, depth=other_depth: build_model(spec, depth, dev, torch_dtype)  # noqa: E731
            needed = {c for how in PROJECTED.values() for c in (how.saves_as, how.recomputes)}
            shallow = {c: measure_saved_only(build, c, tokens, r, dev) for c in chosen if c in needed}
            sections.append(projection(results, shallow, spec, r, torch_dtype))
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    header = [
        f"# LLM fine-tuning memory beyond the adapters: {machine}",
        "",
        f"{date}; torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}; "
        f"{machine}; device {dev.type}, {dtype}; {tokens} tokens (batch 1); layers: "
        f"{layers if layers is not None else 'full depth'}; rank {r}, alpha {2 * r}; {warmup} warm-up step(s), "
        f"1 profiled step, {steps} timed step(s)"
        + (" (step s is the profiled step's wall time)" if steps == 0 else "")
        + ". Random weights from configs, SDPA attention, dropout 0.",
        "",
        f"Command: `{command}`",
        "",
        "Saved: what one training forward keeps for backward (weights excluded, each storage once). Peak step: the "
        "highest the memory allocated in one training step (forward, backward, optimizer step; gradients None at "
        "its start) rises above what was allocated when it began"
        + (" (torch.profiler's CPU allocator events)." if dev.type == "cpu" else " (torch.cuda.max_memory_allocated)."),
    ]
    text = "\n".join(header) + "\n\n" + "\n\n".join(sections) + "\n"
    print(text)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", machine.lower()).strip("-")
    path = folder / f"llm-memory-{slug}-{date}.md"
    path.write_text(text)
    print(f"wrote {path}")
    return text


if __name__ == "__main__":
    CLI(main, as_positional=False)
