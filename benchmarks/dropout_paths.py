"""Time one dropout, forward and backward, by size: ``nn.Dropout`` against the two seed-kept paths.

    python benchmarks/dropout_paths.py                      # CPU, float32
    python benchmarks/dropout_paths.py --device cuda        # GPU, bfloat16

``seeded_dropout`` takes one of two paths (``lightning_lorafa.adapters.dropout.apply_seeded_mask``): "mask + product"
builds the mask (one Triton mask kernel on CUDA) and multiplies with one ATen op whose saved mask autograd keeps
as its seed (no Python autograd node); "fused" is a Python ``autograd.Function`` around the ``dropout_mul`` kernel,
which masks and scales in one pass each way (on CPU: mask, product, in-place scale). Eager tensors of
``FUSED_MIN_NUMEL`` (CUDA) or ``CPU_FUSED_MIN_NUMEL`` (CPU) entries or more take the fused path. This table is
what those thresholds are set from: per size, the median time of a forward and
backward, run back to back (synchronised once per batch of calls on CUDA, so host and device work overlap as in
a training step). Writes ``<output_dir>/<machine>-dropout-paths-<date>.md``.
"""

from __future__ import annotations

import datetime
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from jsonargparse import CLI
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_speed import _write, machine_name  # noqa: E402

from lightning_lorafa.adapters import dropout
from lightning_lorafa.adapters.dropout_masks import draw_seed, keep_scale

PATHS = ("nn.Dropout", "mask + product", "fused")
DTYPES = ("float32", "bfloat16", "float16")


def path_step(path: str, x: torch.Tensor, grad: torch.Tensor, p: float) -> Callable[[], None]:
    """One forward and backward of ``x`` (requires grad) through ``path`` (chosen here, not in the timed call)."""
    scale = keep_scale(p)
    forwards: dict[str, Callable[[], torch.Tensor]] = {
        "nn.Dropout": lambda: F.dropout(x, p, training=True),
        "mask + product": lambda: dropout._mask_multiply(x, draw_seed(x.device), p, scale),
        "fused": lambda: dropout._SeededDropout.apply(x, draw_seed(x.device), p, scale),
    }
    forward = forwards[path]

    def step() -> None:
        forward().backward(grad)

    return step


def time_step(step: Callable[[], None], device: torch.device, calls: int, rounds: int) -> float:
    """Median seconds per call over ``rounds`` batches of ``calls`` back-to-back calls, after a warm-up batch."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(calls):
        step()
    sync()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            step()
        sync()
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def main(
    device: str = "cpu",
    dtype: str | None = None,
    min_log2: int = 9,
    max_log2: int | None = None,
    p: float = 0.1,
    calls: int = 20,
    rounds: int = 7,
    threads: int = 1,
    output_dir: str = "benchmarks/results",
) -> str:
    """Time each path at 2**min_log2 .. 2**max_log2 entries and write the table.

    Args:
        device: ``cpu`` or ``cuda``.
        dtype: ``float32``, ``bfloat16`` or ``float16``; default bfloat16 on CUDA, float32 on CPU.
        min_log2, max_log2: sizes as powers of two (default largest: 2**26 on CUDA, 2**21 on CPU).
        p: drop probability.
        calls, rounds: timing batches (see ``time_step``).
        threads: torch CPU threads.
    """
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a GPU; run without it for the CPU table.")
    dtype = dtype or ("bfloat16" if dev.type == "cuda" else "float32")
    if dtype not in DTYPES:
        raise SystemExit(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    torch.set_num_threads(threads)
    dtype_ = getattr(torch, dtype)
    top = max_log2 if max_log2 is not None else (26 if dev.type == "cuda" else 21)
    threshold = dropout.FUSED_MIN_NUMEL if dev.type == "cuda" else dropout.CPU_FUSED_MIN_NUMEL
    rows = ["| entries | " + " | ".join(f"{path} us" for path in PATHS) + " | fastest seed-kept | taken now |"]
    rows.append("|---:|" + "---:|" * (len(PATHS) + 2))
    for log2 in range(min_log2, top + 1):
        numel = 2**log2
        x = torch.randn(max(1, numel // 1024), min(numel, 1024), device=dev, dtype=dtype_, requires_grad=True)
        grad = torch.ones_like(x)
        micros = {path: time_step(path_step(path, x, grad, p), dev, calls, rounds) * 1e6 for path in PATHS}
        seed_kept = min(PATHS[1:], key=micros.get)
        taken = "fused" if numel >= threshold else "mask + product"
        cells = " | ".join(f"{micros[path]:.1f}" for path in PATHS)
        rows.append(f"| 2^{log2} | {cells} | {seed_kept} | {taken} |")
        print(rows[-1], flush=True)
    machine = machine_name(dev)
    date = datetime.date.today().isoformat()
    constant = "FUSED_MIN_NUMEL" if dev.type == "cuda" else "CPU_FUSED_MIN_NUMEL"
    text = (
        f"## One dropout, forward + backward, by size: {machine}\n\n"
        f"{date}; {dev.type}, {str(dtype_).removeprefix('torch.')}, p {p}, torch {torch.__version__}, "
        f"{threads} CPU thread(s); median microseconds per call over {rounds} batches of {calls} back-to-back calls "
        f'(`python benchmarks/dropout_paths.py --device {dev.type}`). "taken now": the path `seeded_dropout` takes '
        f"in eager mode (fused from 2^{threshold.bit_length() - 1} entries: `{constant}`).\n\n" + "\n".join(rows) + "\n"
    )
    _write(text, Path(output_dir), machine, "dropout-paths", date)
    return text


if __name__ == "__main__":
    CLI(main, as_positional=False)
