"""The LLM memory benchmark on a tiny Llama: what each configuration keeps, its peak measure, and its report."""

import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import llm_memory  # noqa: E402

VOCAB, HIDDEN, INTERMEDIATE, TOKENS, R = 512, 64, 128, 32, 4
TINY = llm_memory.ModelSpec(
    LlamaForCausalLM,
    LlamaConfig,
    dict(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        tie_word_embeddings=True,
        num_hidden_layers=1,
        max_position_embeddings=64,
    ),
)


def build() -> torch.nn.Module:
    return llm_memory.build_model(TINY, 1, torch.device("cpu"), torch.float32)


def test_chunked_loss_keeps_no_vocabulary_sized_tensor():
    results = {
        c: llm_memory.measure(build, c, TOKENS, r=R, steps=1, warmup=0) for c in ("peft-lora", "ours", "ours+chunked")
    }
    peft, ours, chunked = results["peft-lora"], results["ours"], results["ours+chunked"]
    assert peft.vocab_saved and ours.vocab_saved and not chunked.vocab_saved
    # transformers' loss keeps the float32 log-probabilities (tokens x vocabulary), the largest saved tensor; the
    # chunked loss keeps instead the float32 gradient of the hidden states of the tokens that have a label
    assert ours.largest_shape == peft.largest_shape == (TOKENS, VOCAB)
    assert ours.saved_bytes - chunked.saved_bytes >= TOKENS * VOCAB * 4 - (TOKENS - 1) * HIDDEN * 4
    # every linear layer but the head: q, o, gate, up, down by their widths, k and v by the key-value width (32)
    outputs, inputs = HIDDEN * 2 + 32 * 2 + INTERMEDIATE * 2 + HIDDEN, HIDDEN * 6 + INTERMEDIATE
    assert ours.trainable == chunked.trainable == R * outputs  # B only
    assert peft.trainable == R * (outputs + inputs)  # A and B
    for result in results.values():
        assert result.peak_bytes > 0 and result.seconds > 0 and result.weight_bytes > 0


def test_peak_step_bytes_sees_a_tensor_the_step_allocates_and_frees():
    size = 8 * 2**20

    def step() -> torch.Tensor:
        scratch = torch.ones(size, dtype=torch.uint8)
        del scratch
        return torch.zeros(1024, dtype=torch.uint8)

    assert llm_memory.peak_step_bytes(step) >= size


def test_main_writes_the_tables_and_the_projection(tmp_path, monkeypatch):
    monkeypatch.setitem(llm_memory.MODELS, llm_memory.PROJECTED_FROM, TINY)
    configs = ["peft-lora", "peft-lora+gc", "ours+chunked", "ours+chunked+block"]
    text = llm_memory.main(
        models=[llm_memory.PROJECTED_FROM], configs=configs, tokens=TOKENS, steps=1, warmup=0, r=R, out=str(tmp_path)
    )
    rows = [line.split(" | ")[0] for line in text.splitlines() if line.startswith(("| peft", "| ours"))]
    assert rows == [f"| {c}" for c in configs] * 2  # the model's table, then the projection's
    assert "projection, not measured" in text and "28,454 tokens" in text and "342,733 tokens" in text
    assert len(list(tmp_path.glob("llm-memory-*.md"))) == 1
    with pytest.raises(SystemExit, match="unknown"):
        llm_memory.main(models=[llm_memory.PROJECTED_FROM], configs=["lora"], out=str(tmp_path))
