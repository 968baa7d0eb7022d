"""The dropout-paths benchmark runs on CPU and writes its table."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import dropout_paths  # noqa: E402


def test_dropout_paths_benchmark_writes_its_table(tmp_path):
    text = dropout_paths.main(min_log2=9, max_log2=11, calls=1, rounds=1, output_dir=str(tmp_path))
    rows = [line for line in text.splitlines() if line.startswith("| 2^")]
    assert [row.split(" | ")[0] for row in rows] == ["| 2^9", "| 2^10", "| 2^11"]
    assert all(row.endswith("| mask + product |") for row in rows)  # on CPU eager dropout never takes "fused"
    assert len(list(tmp_path.glob("*-dropout-paths-*.md"))) == 1


def test_dropout_paths_benchmark_refuses_bad_options(tmp_path):
    with pytest.raises(SystemExit, match="--dtype must be one of float32, bfloat16, float16, got 'int8'"):
        dropout_paths.main(dtype="int8", output_dir=str(tmp_path))
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="--device cuda needs a GPU"):
            dropout_paths.main(device="cuda", output_dir=str(tmp_path))
