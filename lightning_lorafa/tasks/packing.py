"""Padding-free packing of tokenized causal-LM rows.

Rows (``input_ids``, ``labels``) are grouped best-fit-decreasing into packs of at most ``max_length`` tokens and
concatenated by transformers' ``DataCollatorWithFlattening``: ``position_ids`` restart at 0 for every row and the
first label of every row is -100, so no row predicts the next row's first token. A batch stacks packs (B, L) with
no ``attention_mask``; transformers' ``masking_utils`` then reads the row boundaries from the restarts of
``position_ids`` and builds a block-diagonal causal mask (SDPA, eager, flex attention), and FlashAttention reads
them from the ``position_ids`` of a single flattened row (``packed_model_inputs`` flattens the batch for it).

Two conditions make rows independent, and ``packed_model_inputs`` takes care of both:

* no key/value cache: transformers looks for packed rows only when ``cache is None``, and causal LMs build a cache
  whenever ``use_cache`` (``config.use_cache``, True for LLaMA) is on, in training too;
* an attention implementation whose mask follows the packed rows (the ones registered in
  ``transformers.masking_utils.ALL_MASK_ATTENTION_FUNCTIONS``): any other one would let rows attend to each other,
  so it is refused.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import torch
from datasets import Dataset
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from lightning_lorafa import _compat
from lightning_lorafa.model.select import pretrained_models

#: Implementations that find the rows of a packed batch in ``position_ids`` only when it is one flattened row.
FLASH_PREFIX = "flash_attention"


def pack_rows(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Best-fit-decreasing packing: row indices grouped into packs whose lengths sum to at most ``max_length``.

    Rows are placed longest first, each into the open pack it fills best (the least room left), or a new pack.
    Packs are returned in the order they were opened, rows in each pack in the order they were placed.

    Raises:
        ValueError: a row is empty or longer than ``max_length``.
    """
    too_long = [i for i, n in enumerate(lengths) if n > max_length or n <= 0]
    if too_long:
        i = too_long[0]
        raise ValueError(
            f"row {i} has {lengths[i]} tokens; packing needs rows of 1 to max_length={max_length} tokens "
            "(cut rows at max_length before packing)."
        )
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    packs: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (tokens left, pack index), sorted
    for i in order:
        at = bisect.bisect_left(room, (lengths[i], -1))
        if at == len(room):
            packs.append([i])
            left, pack = max_length - lengths[i], len(packs) - 1
        else:
            left, pack = room.pop(at)
            packs[pack].append(i)
            left -= lengths[i]
        if left > 0:
            bisect.insort(room, (left, pack))
    return packs


def pack_dataset(rows: Dataset, max_length: int) -> Dataset:
    """The tokenized ``rows`` (columns ``input_ids``, ``labels``) packed into rows of at most ``max_length`` tokens.

    Returns a ``Dataset`` with ``input_ids``, ``labels`` and ``position_ids`` per pack (flattened by
    ``DataCollatorWithFlattening``) and ``num_rows``, the number of rows in each pack.
    """
    ids, labels = rows["input_ids"], rows["labels"]
    flatten = DataCollatorWithFlattening(return_tensors="np")
    packed: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": [], "num_rows": []}
    for pack in pack_rows([len(row) for row in ids], max_length):
        flat = flatten([{"input_ids": ids[i], "labels": labels[i]} for i in pack])
        for key in ("input_ids", "labels", "position_ids"):
            packed[key].append(flat[key][0].tolist())
        packed["num_rows"].append(len(pack))
    tokens = sum(len(row) for row in ids)
    rank_zero_info(
        f"packing: {len(ids):,} rows ({tokens:,} tokens) into {len(packed['num_rows']):,} packs of up to "
        f"{max_length} tokens ({tokens / max(1, max_length * len(packed['num_rows'])):.1%} filled)."
    )
    return Dataset.from_dict(packed)


class PackedCollator:
    """Stacks packs into a batch (B, L), L the longest pack: ``input_ids`` padded with ``pad_token_id``,
    ``labels`` with -100 and ``position_ids`` with 0 (every padding token is a row of its own, which no real
    token attends to). There is no ``attention_mask``: the rows are in ``position_ids``."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        def stack(key: str, value: int) -> torch.Tensor:
            rows = [torch.as_tensor(feature[key], dtype=torch.long) for feature in features]
            return pad_sequence(rows, batch_first=True, padding_value=value)

        return {
            "input_ids": stack("input_ids", self.pad_token_id),
            "labels": stack("labels", -100),
            "position_ids": stack("position_ids", 0),
        }


def training_collator(tokenizer: Any, packing: bool) -> Any:
    """The collator of causal-LM training rows: ``PackedCollator`` for packed rows, else padding to the longest
    row with labels -100 on the padding."""
    if packing:
        return PackedCollator(tokenizer.pad_token_id)
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)


def is_packed(batch: dict[str, Any]) -> bool:
    """Whether ``batch`` is a packed batch (``position_ids`` and no ``attention_mask``)."""
    return "position_ids" in batch and "attention_mask" not in batch


def attention_implementation(model: nn.Module) -> str | None:
    """``config._attn_implementation`` of the (outermost) transformers model in ``model``, or None."""
    found = list(pretrained_models(model).values())
    return _compat.attn_implementation(found[0]) if found else None


def check_packing_supported(model: nn.Module) -> str:
    """Returns the model's attention implementation when it keeps packed rows apart.

    Raises:
        ValueError: ``model`` holds no transformers model, or its attention implementation builds no mask from
            the packed rows' ``position_ids`` (rows would attend to each other).
    """
    implementation = attention_implementation(model)
    if implementation is None:
        raise ValueError(
            f"packing needs a transformers model (it builds the per-row attention mask from position_ids); "
            f"{type(model).__name__} holds none. Set packing: false."
        )
    if implementation.startswith(FLASH_PREFIX) or implementation in ALL_MASK_ATTENTION_FUNCTIONS:
        return implementation
    supported = sorted(ALL_MASK_ATTENTION_FUNCTIONS)
    raise ValueError(
        f"packing: attention implementation {implementation!r} builds no attention mask from the packed rows' "
        f"position_ids, so the rows of a pack would attend to each other. Use one of {supported} (LoraFA("
        "attn_implementation='sdpa') or 'flash_attention_2'), or set the data module's packing: false."
    )


def packed_model_inputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The model's keyword arguments for a packed ``batch`` (B, L): ``use_cache=False`` (transformers looks for
    packed rows only without a cache) and, for FlashAttention, the batch flattened to one row (1, B * L).

    Raises:
        ValueError: the attention implementation would let rows attend to each other (``check_packing_supported``).
    """
    implementation = check_packing_supported(model)
    inputs: dict[str, Any] = dict(batch)
    if implementation.startswith(FLASH_PREFIX):
        inputs = {key: value.reshape(1, -1) for key, value in inputs.items()}
    inputs["use_cache"] = False
    return inputs
