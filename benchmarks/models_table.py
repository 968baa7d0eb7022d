"""Which architectures LoRA-FA adapts, and what it keeps for backward against PEFT LoRA: the ``docs/models.md`` table.

Every architecture is a tiny random model (2 layers, hidden 32) built from its transformers config (no download),
converted with ``apply_lorafa(model, r=4, target_modules="all-linear")`` and compared with PEFT LoRA
(``LoraConfig(r=4, target_modules="all-linear")``) on the same model. ``tests/model/test_models.py`` checks the
compatibility columns per architecture; this script measures the saved-for-backward bytes of one training forward
at dropout 0.1 (hidden, attention and adapter dropout) for both, with the model prepared as the ``LoraFA`` callback
prepares it (seed-kept dropouts and attention), and writes the table.

    python benchmarks/models_table.py            # prints the table, writes benchmarks/results/models-<date>.md
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers as tf
from torch import nn

VOCAB = 96
BATCH, SEQ = 2, 12
DROPOUT = 0.1
#: MoE architectures: PEFT LoRA adapts their experts only without dropout.
MOE_ARCHS = ("Mixtral", "Qwen2-MoE", "Qwen3-MoE")


class PlainMLP(nn.Module):
    """A plain torch model (no transformers): two hidden linears and a head."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 32)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = self.head(self.drop(torch.relu(self.fc2(self.drop(torch.relu(self.fc1(x)))))))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return {"logits": logits, "loss": loss}


@dataclass(frozen=True)
class Arch:
    """One architecture: how to build its tiny model at a dropout and a batch for it, and where its logits are."""

    name: str
    build: Callable[[float], nn.Module]
    batch: Callable[[], dict]
    logits: str = "logits"
    task_type: str | None = None
    modules_to_save: list[str] | None = None
    notes: list[str] = field(default_factory=list)


def _ids(shape=(BATCH, SEQ), low=3, seed=0) -> torch.Tensor:
    return torch.randint(low, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def _cls_batch() -> dict:
    return {"input_ids": _ids(), "labels": torch.tensor([0, 1])}


def _lm_batch() -> dict:
    ids = _ids()
    return {"input_ids": ids, "labels": ids}


def _seq2seq_batch() -> dict:
    return {"input_ids": _ids(), "labels": _ids((BATCH, 7), seed=1)}


def _image_batch() -> dict:
    pixels = torch.randn(BATCH, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return {"pixel_values": pixels, "labels": torch.tensor([0, 1])}


def _whisper_batch() -> dict:
    features = torch.randn(BATCH, 8, 32, generator=torch.Generator().manual_seed(0))
    return {"input_features": features, "labels": _ids((BATCH, 7), seed=1)}


def _clip_batch() -> dict:
    pixels = torch.randn(BATCH, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return {"input_ids": _ids(), "pixel_values": pixels, "return_loss": True}


def _mlp_batch() -> dict:
    return {
        "x": torch.randn(BATCH * SEQ, 16, generator=torch.Generator().manual_seed(0)),
        "labels": _ids((BATCH * SEQ,)) % 3,
    }


TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
DECODER = SMALL | TOKENS | {"vocab_size": VOCAB, "max_position_embeddings": 64}
ENCODER = SMALL | {"vocab_size": VOCAB, "max_position_embeddings": 64, "pad_token_id": 0}


def _encoder(config_cls, model_cls, **extra) -> Callable[[float], nn.Module]:
    def build(p: float) -> nn.Module:
        config = config_cls(**(ENCODER | {"hidden_dropout_prob": p, "attention_probs_dropout_prob": p} | extra))
        return model_cls(config)

    return build


def _decoder(config_cls, model_cls, dropout_keys=("attention_dropout",), **extra) -> Callable[[float], nn.Module]:
    def build(p: float) -> nn.Module:
        config = config_cls(**(DECODER | dict.fromkeys(dropout_keys, p) | extra))
        return model_cls(config)

    return build


def _build_distilbert(p: float) -> nn.Module:
    config = tf.DistilBertConfig(
        vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64, pad_token_id=0,
        dropout=p, attention_dropout=p, seq_classif_dropout=p,
    )  # fmt: skip
    return tf.DistilBertForSequenceClassification(config)


def _build_gpt2(p: float) -> nn.Module:
    config = tf.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2,
        resid_pdrop=p, embd_pdrop=p, attn_pdrop=p,
    )  # fmt: skip
    return tf.GPT2LMHeadModel(config)


def _build_bloom(p: float) -> nn.Module:
    config = tf.BloomConfig(
        vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, hidden_dropout=p, attention_dropout=p, **TOKENS
    )
    return tf.BloomForCausalLM(config)


def _build_falcon(p: float) -> nn.Module:
    config = tf.FalconConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, hidden_dropout=p,
        attention_dropout=p, max_position_embeddings=64, **TOKENS,
    )  # fmt: skip
    return tf.FalconForCausalLM(config)


def _build_opt(p: float) -> nn.Module:
    config = tf.OPTConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
        word_embed_proj_dim=32, max_position_embeddings=64, dropout=p, attention_dropout=p, **TOKENS,
    )  # fmt: skip
    return tf.OPTForCausalLM(config)


def _build_neox(p: float) -> nn.Module:
    config = tf.GPTNeoXConfig(**(DECODER | {"hidden_dropout": p, "attention_dropout": p}))
    return tf.GPTNeoXForCausalLM(config)


def _gemma(config_cls, model_cls, **extra) -> Callable[[float], nn.Module]:
    return _decoder(config_cls, model_cls, head_dim=8, num_key_value_heads=2, **extra)


def _build_t5(p: float) -> nn.Module:
    config = tf.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        dropout_rate=p, decoder_start_token_id=0, pad_token_id=0, eos_token_id=2,
    )  # fmt: skip
    return tf.T5ForConditionalGeneration(config)


def _build_bart(p: float) -> nn.Module:
    config = tf.BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        dropout=p, attention_dropout=p, activation_dropout=p, decoder_start_token_id=2, forced_eos_token_id=2,
        **TOKENS,
    )  # fmt: skip
    return tf.BartForConditionalGeneration(config)


def _build_whisper(p: float) -> nn.Module:
    config = tf.WhisperConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16,
        max_target_positions=32, dropout=p, attention_dropout=p, activation_dropout=p, decoder_start_token_id=1,
        suppress_tokens=None, begin_suppress_tokens=None, **TOKENS,
    )  # fmt: skip
    return tf.WhisperForConditionalGeneration(config)


def _build_vit(p: float) -> nn.Module:
    config = tf.ViTConfig(
        **SMALL, image_size=16, patch_size=4, num_labels=2, hidden_dropout_prob=p, attention_probs_dropout_prob=p
    )
    return tf.ViTForImageClassification(config)


def _build_clip(p: float) -> nn.Module:
    text = SMALL | {"vocab_size": VOCAB, "max_position_embeddings": 64, "attention_dropout": p, "projection_dim": 16}
    vision = SMALL | {"image_size": 16, "patch_size": 4, "attention_dropout": p, "projection_dim": 16}
    config = tf.CLIPConfig(text_config=text | TOKENS, vision_config=vision, projection_dim=16)
    return tf.CLIPModel(config)


MOE = {"num_key_value_heads": 2, "num_experts_per_tok": 2}
KV = {"num_key_value_heads": 2}
PHI3_DROPOUTS = ("attention_dropout", "resid_pdrop", "embd_pdrop")


def _classifier(name: str, build: Callable[[float], nn.Module], **kwargs) -> Arch:
    return Arch(name, build, _cls_batch, task_type="SEQ_CLS", **kwargs)


def _causal_lm(name: str, build: Callable[[float], nn.Module]) -> Arch:
    return Arch(name, build, _lm_batch, task_type="CAUSAL_LM")


def _qwen_moe(config_cls, model_cls, **extra) -> Callable[[float], nn.Module]:
    return _decoder(config_cls, model_cls, num_experts=4, moe_intermediate_size=32, **MOE, **extra)


ARCHS: dict[str, Arch] = {
    a.name: a
    for a in [
        _classifier("BERT", _encoder(tf.BertConfig, tf.BertForSequenceClassification)),
        _classifier("RoBERTa", _encoder(tf.RobertaConfig, tf.RobertaForSequenceClassification)),
        # task_type=None: PEFT's SEQ_CLS adds modules_to_save "classifier", which its suffix rule also matches
        # on pre_classifier (adapted); export_peft refuses that and names the fix.
        Arch("DistilBERT", _build_distilbert, _cls_batch, modules_to_save=["classifier"]),
        _classifier("DeBERTa-v2", _encoder(tf.DebertaV2Config, tf.DebertaV2ForSequenceClassification)),
        _classifier("ALBERT", _encoder(tf.AlbertConfig, tf.AlbertForSequenceClassification, embedding_size=16)),
        _classifier("ELECTRA", _encoder(tf.ElectraConfig, tf.ElectraForSequenceClassification, embedding_size=16)),
        _causal_lm("GPT-2", _build_gpt2),
        _causal_lm("GPT-NeoX", _build_neox),
        _causal_lm("OPT", _build_opt),
        _causal_lm("BLOOM", _build_bloom),
        _causal_lm("Falcon", _build_falcon),
        _causal_lm("LLaMA", _decoder(tf.LlamaConfig, tf.LlamaForCausalLM, **KV)),
        _causal_lm("Mistral", _decoder(tf.MistralConfig, tf.MistralForCausalLM, **KV)),
        _causal_lm("Qwen2", _decoder(tf.Qwen2Config, tf.Qwen2ForCausalLM, **KV)),
        _causal_lm("Qwen3", _decoder(tf.Qwen3Config, tf.Qwen3ForCausalLM, head_dim=8, **KV)),
        _causal_lm("Gemma", _gemma(tf.GemmaConfig, tf.GemmaForCausalLM)),
        _causal_lm("Gemma2", _gemma(tf.Gemma2Config, tf.Gemma2ForCausalLM, sliding_window=8)),
        _causal_lm("Gemma3", _gemma(tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, sliding_window=8)),
        _causal_lm("Phi-3", _decoder(tf.Phi3Config, tf.Phi3ForCausalLM, dropout_keys=PHI3_DROPOUTS, **KV)),
        _causal_lm("Mixtral", _decoder(tf.MixtralConfig, tf.MixtralForCausalLM, num_local_experts=4, **MOE)),
        _causal_lm(
            "Qwen2-MoE", _qwen_moe(tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM, shared_expert_intermediate_size=32)
        ),
        _causal_lm("Qwen3-MoE", _qwen_moe(tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM, head_dim=8)),
        Arch("T5", _build_t5, _seq2seq_batch, task_type="SEQ_2_SEQ_LM"),
        Arch("BART", _build_bart, _seq2seq_batch, task_type="SEQ_2_SEQ_LM"),
        Arch("Whisper", _build_whisper, _whisper_batch),
        Arch("ViT", _build_vit, _image_batch),
        Arch("CLIP", _build_clip, _clip_batch, logits="logits_per_image"),
        Arch("plain MLP", lambda p: PlainMLP(p), _mlp_batch),
    ]
}


def build(name: str, dropout: float = 0.0, seed: int = 0) -> nn.Module:
    """The tiny model of architecture ``name`` with every dropout at ``dropout``, in eval mode, seeded."""
    torch.manual_seed(seed)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    return ARCHS[name].build(dropout).eval()


def logits_of(name: str, output) -> torch.Tensor:
    """The logits tensor of a model output (a ``ModelOutput`` or the plain MLP's dict)."""
    return output[ARCHS[name].logits]


def peft_lora(model: nn.Module, arch: Arch, dropout: float = 0.0):
    """PEFT LoRA, r=4, all-linear, on ``model`` (PEFT's default A init, B zero)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear", task_type=arch.task_type)
    return get_peft_model(model, config)


def peft_targets(name: str) -> list[str]:
    """The module names PEFT LoRA's ``all-linear`` adapts on the tiny ``name`` model."""
    from peft.tuners.lora import LoraLayer

    model = peft_lora(build(name), ARCHS[name])
    return sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, LoraLayer))


def saved_bytes(name: str) -> tuple[int, int]:
    """Activation bytes one training forward saves for backward at dropout 0.1: (ours prepared as the callback
    prepares the model, PEFT LoRA all-linear with ``lora_dropout=0.1``; 0 on MoE models, where PEFT's experts
    wrapper refuses dropout)."""
    from lightning_lorafa import apply_lorafa
    from lightning_lorafa.model.dropouts import keep_dropout_seeds
    from lightning_lorafa.profiling import measure_saved_activations

    arch = ARCHS[name]
    batch = arch.batch()
    ours = build(name, DROPOUT).train()
    apply_lorafa(ours, r=4, alpha=8, dropout=DROPOUT)
    keep_dropout_seeds(ours)
    peft_dropout = 0.0 if name in MOE_ARCHS else DROPOUT  # PEFT's ParamWrapper (experts) refuses dropout
    theirs = peft_lora(build(name, DROPOUT), arch, peft_dropout).train()
    mine = measure_saved_activations(lambda: ours(**batch)["loss"], module=ours).total_bytes
    peft = measure_saved_activations(lambda: theirs(**batch)["loss"], module=theirs).total_bytes
    return mine, peft


def table(names: list[str] | None = None) -> str:
    """Markdown rows: architecture, layers adapted by ours and by PEFT, saved bytes ours / PEFT LoRA at dropout 0.1."""
    from lightning_lorafa.model.select import find_target_modules

    header = (
        "| architecture | layers adapted (ours) | layers adapted (PEFT LoRA) | saved bytes, ours / PEFT LoRA "
        "| dropouts that keep a mask (ours) |"
    )
    lines = [header, "|---|---:|---:|---:|---|"]
    for name in names or list(ARCHS):
        ours = len(find_target_modules(build(name), "all-linear", r=4))
        peft = len(peft_targets(name))
        mine, theirs = saved_bytes(name)
        lines.append(f"| {name} | {ours} | {peft} | {mine / theirs:.2f}x | {kept_masks(name) or '-'} |")
    return "\n".join(lines)


def kept_masks(name: str) -> str:
    """What keeps a dropout mask in ours (as the callback prepares the model), in short: the attention, the classes
    whose code calls ``torch.nn.functional.dropout`` inline, and those calling ``scaled_dot_product_attention`` with
    a dropout in attention of their own."""
    from lightning_lorafa import apply_lorafa
    from lightning_lorafa.model.dropouts import keep_dropout_seeds

    model = build(name, DROPOUT).train()
    apply_lorafa(model, r=4, alpha=8, dropout=DROPOUT)
    _, kept, _ = keep_dropout_seeds(model)
    parts = ["attention probabilities" for key in kept if key.endswith(" attention")]
    sdpa = [why.split(".forward", 1)[0] for why in kept.values() if "scaled_dot_product_attention" in why]
    parts += [f"attention probabilities (SDPA call in {cls})" for cls in sdpa]
    inline = [why.split(".forward", 1)[0] for key, why in kept.items() if "functional.dropout" in why]
    if inline:
        parts.append("inline in " + ", ".join(inline))
    return "; ".join(parts)


def versions() -> str:
    """The versions the figures depend on: a model's code changes with transformers (Falcon's attention in 5.25)."""
    import peft

    return f"torch {torch.__version__}, transformers {tf.__version__}, peft {peft.__version__}"


def main(output_dir: str = "benchmarks/results") -> str:
    text = table()
    print(text)
    path = Path(output_dir) / f"models-{datetime.date.today().isoformat()}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "Saved-for-backward bytes of one training forward, LoRA-FA (ours, prepared as the LoraFA callback does) / "
        f"PEFT LoRA, both r=4 all-linear, every dropout {DROPOUT}; tiny random models, batch {BATCH}, sequence "
        f"{SEQ} (python benchmarks/models_table.py; {versions()}).\n\n" + text + "\n"
    )
    return text


if __name__ == "__main__":
    main()
