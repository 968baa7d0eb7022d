"""Tiny checkpoints (model + word-level tokenizer) and small data files for the task and CLI tests.

Models are built from configs (hidden 32, 2 layers) and saved with `save_pretrained`, so the tasks load
them through the same `from_pretrained` path as real checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    RobertaConfig,
    RobertaForSequenceClassification,
    T5Config,
    T5ForConditionalGeneration,
)

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "</s>"]
WORDS = (
    "the a good bad movie film is was not very fun dull great plot actors story house cat dog red blue "
    "translate English to Romanian casa pisica rosu albastru bun rau Answer A B C D . , : ? ! # ( ) "
    "Below an instruction that describes task paired with input provides further context Write response "
    "appropriately completes request Instruction Input Response Give three tips for staying healthy eat "
    "sleep well exercise The following are multiple choice questions answers about abstract algebra "
    "anatomy what which of 1 2 3 4"
).split()
SENTENCES = [
    "the movie is good",
    "the film was bad",
    "a great plot",
    "very dull actors",
    "the story is fun",
    "not a good film",
    "the cat is red",
    "a blue house",
    "the dog was very bad",
    "great actors",
]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over `SPECIALS + WORDS` (ids 0-5 are the special tokens)."""
    vocab = {token: i for i, token in enumerate(dict.fromkeys(SPECIALS + WORDS))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        eos_token="</s>",
        bos_token="[CLS]",
    )


def save_checkpoints(root: Path) -> dict[str, str]:
    """Saves tiny BERT and RoBERTa classifiers, a T5 and a LLaMA (hidden 128, so rank 64 fits) under
    `root`; returns name -> folder."""
    tokenizer = build_tokenizer()
    vocab = len(tokenizer)
    common = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
    torch.manual_seed(0)
    built = {
        "bert": BertForSequenceClassification(BertConfig(vocab_size=vocab, pad_token_id=0, **common)),
        "roberta": RobertaForSequenceClassification(
            RobertaConfig(vocab_size=vocab, pad_token_id=0, max_position_embeddings=160, **common)
        ),
        "t5": T5ForConditionalGeneration(
            T5Config(
                vocab_size=vocab,
                d_model=32,
                d_kv=8,
                d_ff=64,
                num_layers=2,
                num_heads=4,
                pad_token_id=0,
                eos_token_id=5,
                decoder_start_token_id=0,
            )
        ),
        "llama": LlamaForCausalLM(
            LlamaConfig(
                vocab_size=vocab,
                hidden_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=128,
                max_position_embeddings=4096,
                pad_token_id=0,
                bos_token_id=2,
                eos_token_id=5,
            )
        ),
    }
    paths = {}
    for name, model in built.items():
        path = root / name
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths[name] = str(path)
    return paths


def write_glue_files(root: Path, columns: tuple[str, ...], splits: tuple[str, ...], regression: bool) -> dict:
    """Tab-separated files with `columns`, a `label` column and 8 rows per split; returns split -> path."""
    root.mkdir(parents=True, exist_ok=True)
    files = {}
    for split in splits:
        lines = ["\t".join((*columns, "label"))]
        for i in range(8):
            texts = [SENTENCES[(i + j) % len(SENTENCES)] for j in range(len(columns))]
            label = f"{i * 0.5:.1f}" if regression else str(i % 2)
            lines.append("\t".join((*texts, label)))
        path = root / f"{split}.tsv"
        path.write_text("\n".join(lines) + "\n")
        files[split] = str(path)
    return files


def write_text_pairs(root: Path, stem: str = "pairs", rows: int = 6) -> str:
    """Line-aligned `{stem}.en` / `{stem}.ro` files; returns the path stem."""
    root.mkdir(parents=True, exist_ok=True)
    english = ["the house is red", "the cat is blue", "a good dog", "the red cat", "a blue house", "good"]
    romanian = ["casa rosu", "pisica albastru", "bun", "pisica rosu", "casa albastru", "bun"]
    (root / f"{stem}.en").write_text("\n".join(english[:rows]) + "\n")
    (root / f"{stem}.ro").write_text("\n".join(romanian[:rows]) + "\n")
    return str(root / stem)


def write_alpaca_file(root: Path) -> str:
    """A json list of 6 Alpaca-format instructions; returns its path."""
    root.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "instruction": "Give three tips for staying healthy",
            "input": "",
            "output": "eat well . sleep well",
        },
        {"instruction": "translate English to Romanian", "input": "the red cat", "output": "pisica rosu"},
    ] * 3
    path = root / "alpaca.json"
    path.write_text(json.dumps(rows))
    return str(path)


def write_flan_file(root: Path) -> str:
    """A jsonl file of 6 FLAN-format rows (`inputs`, `targets`); returns its path."""
    root.mkdir(parents=True, exist_ok=True)
    rows = [{"inputs": "Which of the following is red ?", "targets": "the cat"}] * 6
    path = root / "flan.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)
