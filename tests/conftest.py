"""Shared fixtures: tiny transformers models built from configs (no download), a user's LightningModule, a quiet
Trainer, and small helpers. ``tests/workers`` (scripts that tests start as processes) is importable too."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
    T5Config,
    T5ForConditionalGeneration,
)

VOCAB = 96
TESTS = Path(__file__).resolve().parent
ROOT, DATA, WORKERS = TESTS.parent, TESTS / "data", TESTS / "workers"
sys.path.insert(0, str(WORKERS))  # tests import the workers' modules and data


class Tuner(pl.LightningModule):
    """A user's LightningModule: ``self.model(input_ids=..., labels=...).loss`` on ``(input_ids, labels)``
    batches, AdamW over ``self.parameters()``."""

    def __init__(self, model: nn.Module, lr: float = 1e-2) -> None:
        super().__init__()
        self.model, self.lr = model, lr

    def training_step(self, batch, batch_idx):
        input_ids, labels = batch
        return self.model(input_ids=input_ids, labels=labels).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def classification_batches(rows: int = 16, length: int = 8, batch_size: int = 4, seed: int = 0) -> DataLoader:
    """Batches of ``(input_ids, labels)``: random tokens (rows, length) and label ``input_ids[:, 0] % 2``."""
    x = torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))
    return DataLoader(TensorDataset(x, x[:, 0] % 2), batch_size=batch_size)


def quiet_trainer(root: Path, **kwargs) -> pl.Trainer:
    """A ``pl.Trainer`` writing under ``root`` with no logger, progress bar, model summary or checkpoint callback;
    ``kwargs`` (``max_steps``, ``callbacks``, ...) as for ``pl.Trainer``."""
    quiet = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    return pl.Trainer(default_root_dir=root, **(quiet | kwargs))


def byte_level_tokenizer(texts: list[str], vocab_size: int, extra_special_tokens: tuple[str, ...] = ()):
    """A byte-level BPE tokenizer trained on ``texts``: ids 0, 1, 2 are ``<pad>``, ``<s>``, ``</s>``, then
    ``extra_special_tokens``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    special = ["<pad>", "<s>", "</s>", *extra_special_tokens]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens=list(extra_special_tokens),
    )


def tiny_causal_llama(vocab_size: int, max_position_embeddings: int = 512) -> LlamaForCausalLM:
    """A 2-layer LLaMA causal LM (hidden 64, 4 heads, 2 key/value heads), seeded, with ``byte_level_tokenizer``'s
    pad/bos/eos ids."""
    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=max_position_embeddings,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    )


def tiny_roberta(num_labels: int = 2, dropout: float = 0.0) -> RobertaForSequenceClassification:
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        num_labels=num_labels,
        pad_token_id=1,
    )
    return RobertaForSequenceClassification(config).eval()


def tiny_mixtral(num_labels: int = 2) -> nn.Module:
    """A 2-layer Mixtral sequence classifier (4 fused experts, top-2, hidden 32) with RoBERTa-tiny's vocabulary."""
    from transformers import MixtralConfig, MixtralForSequenceClassification

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        num_labels=num_labels,
        pad_token_id=1,
    )
    return MixtralForSequenceClassification(config).eval()


def tiny_t5() -> T5ForConditionalGeneration:
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    return T5ForConditionalGeneration(config).eval()


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


class TwoLayerNet(nn.Module):
    """A plain (non-transformers) model: two hidden linears and a linear head."""

    def __init__(self, d_in: int = 12, hidden: int = 16, d_out: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden, bias=False)
        self.head = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def randomize_lora_B(model: nn.Module, seed: int = 1) -> None:
    """Give every lora_B non-zero values (they start at zero), so the branch shows in outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


@pytest.fixture
def roberta() -> RobertaForSequenceClassification:
    return tiny_roberta()


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="session")
def task_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Tiny BERT/RoBERTa classifiers, T5 and LLaMA saved to disk with a tokenizer (tests/tiny_checkpoints.py)."""
    from tiny_checkpoints import save_checkpoints

    return save_checkpoints(tmp_path_factory.mktemp("checkpoints"))


def falcon_calls_the_attention_interface() -> bool:
    """transformers 5.25 moved Falcon's attention onto its attention interface; before, it was Falcon's own code."""
    import inspect

    from transformers.models.falcon import modeling_falcon

    return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(modeling_falcon)
