"""Runs the CUDA dropout path (the Triton kernels) on CPU under Triton's interpreter, checks them against
``philox_keep_mask`` and forces the first-use check to fail; prints JSON results.

Started by ``tests/adapters/test_kernels.py`` with ``TRITON_INTERPRET=1``, which must be set before Triton is imported.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import torch
import triton
import triton.language as tl
from torch import nn

from lightning_lorafa import LoraFALinear
from lightning_lorafa.adapters import dropout as dropout_module
from lightning_lorafa.adapters import dropout_masks as kernels
from lightning_lorafa.adapters.dropout import RecomputedDropout
from lightning_lorafa.adapters.dropout_masks import draw_seed, dropout_mask, dropout_mul, philox_keep_mask, uses_triton

SHAPES = [(1,), (7,), (3, 5), (1024,), (1031,), (3, 70, 101)]  # numel % 8 != 0, % 1024 != 0, several blocks
SEEDS = [0, 1, 2**31 - 1, 2**32 + 5, 2**62 - 1, 2**62 + 12345, 2**63 - 1]


@triton.jit
def _word_bits_kernel(out_ptr, seed_ptr):
    """Stores the bit width of the words ``tl.randint4x`` gives for an int64 counter, as ``_keep_bits`` calls it."""
    r0, _, _, _ = tl.randint4x(tl.load(seed_ptr), tl.arange(0, 8).to(tl.int64))
    tl.store(out_ptr, r0.dtype.primitive_bitwidth)


def main() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = kernel_results()
    results["check_passed_without_warning"] = kernels._triton_selected is True and not caught
    results.update(fallback_results())
    json.dump(results, sys.stdout)


def kernel_results() -> dict[str, object]:
    # The kernels themselves (whatever the first-use check decides): the realised drop rate of a large mask
    # (16-bit draws compared with p * 2**16), and philox_keep_mask's masks bit for bit.
    large, seed = torch.Size((128, 1031)), torch.tensor(2**61 + 9)
    drop_rates = {p: 1 - kernels._triton_mask(large, seed, p).double().mean().item() for p in (0.1, 0.5, 0.9)}
    word_bits = torch.zeros((), dtype=torch.int64)
    _word_bits_kernel[(1,)](word_bits, seed)
    results: dict[str, object] = {"drop_rates": drop_rates, "randint4x_words_are_32_bit": int(word_bits) == 32}
    mask_equal, product_equal = [], []
    for i, seed in enumerate(SEEDS):
        for j, p in enumerate((0.1, 0.5, 0.9)):
            shape, seed_tensor = torch.Size(SHAPES[(i + j) % len(SHAPES)]), torch.tensor(seed)
            expected = philox_keep_mask(shape, seed_tensor, p)
            mask_equal.append(torch.equal(kernels._triton_mask(shape, seed_tensor, p), expected))
            product = kernels._triton_dropout_mul(torch.ones(shape), seed_tensor, p, 2.0)
            product_equal.append(torch.equal(product, 2.0 * expected))
    results["mask_kernel_equals_reference"] = all(mask_equal) and len(mask_equal) == 21
    results["product_kernel_equals_reference"] = all(product_equal)

    # The CUDA path of the public functions.
    results["uses_triton"] = uses_triton(torch.ones(1))
    ones = torch.ones(3, 70, 101)  # 21,210 elements: 21 blocks, the last one partly masked
    seed = torch.tensor(2**40 + 17)
    scale = dropout_mul(ones, seed, 0.25)
    results["values"] = sorted(scale.unique().tolist())
    results["dropped"] = (scale == 0).double().mean().item()
    results["same_seed_same_mask"] = torch.equal(scale, dropout_mul(ones, seed, 0.25))
    results["other_seed_other_mask"] = not torch.equal(scale, dropout_mul(ones, seed + 1, 0.25))
    half = dropout_mul(ones.bfloat16(), seed, 0.25)
    results["bf16_same_mask"] = half.dtype == torch.bfloat16 and torch.equal(half == 0, scale == 0)
    x = torch.randn(3, 70, 101)
    results["scales_x"] = torch.equal(dropout_mul(x, seed, 0.25), x * scale)
    results["strided_input"] = torch.equal(dropout_mul(ones.transpose(0, 2), seed, 0.25), scale.view(101, 70, 3))
    kept = dropout_mask(ones.shape, seed, 0.25, torch.float32)  # the mask kernel: the same bits, as bool
    results["mask_kernel_same_mask"] = kept.dtype == torch.bool and torch.equal(kept, scale != 0)

    # Forward and backward of the LoRA-FA layer rebuild one mask: equal to a reference that stores it.
    torch.manual_seed(0)
    layer = LoraFALinear(nn.Linear(48, 40), r=4, alpha=8, dropout=0.5).train()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(6, 48, requires_grad=True)
    torch.manual_seed(7)
    out = layer(x)
    out.square().sum().backward()
    torch.manual_seed(7)
    mask = dropout_mul(torch.ones_like(x), draw_seed(x.device), 0.5)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = layer.base(x_ref) + layer.scaling * ((x_ref * mask) @ layer.lora_A.t()) @ layer.lora_B.t()
    ref.square().sum().backward()
    results["layer_forward_equal"] = torch.allclose(out, ref, rtol=1e-6, atol=1e-6)
    results["layer_grad_x_equal"] = torch.allclose(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    results["mask_live"] = 0 < int(torch.count_nonzero(mask)) < mask.numel()

    # Model dropout: gradient zeros exactly where the forward dropped.
    y = torch.randn(5, 300, requires_grad=True)
    torch.manual_seed(3)
    dropped = RecomputedDropout(0.3).train()(y)
    (grad,) = torch.autograd.grad(dropped, y, torch.ones_like(dropped))
    results["dropout_grad_mask_equal"] = torch.equal(grad == 0, dropped == 0)
    torch.manual_seed(3)
    reference = y * dropout_mul(torch.ones_like(y), draw_seed(y.device), 0.3)
    results["dropout_equals_stored_mask_reference"] = torch.equal(dropped, reference)

    # Large tensors take the fused kernel, small ones mask kernel + product: the same values either way (in bf16
    # within one unit in the last place: the interpreter truncates float32 -> bf16 where GPUs round to nearest).
    default_fused_min = dropout_module.FUSED_MIN_NUMEL
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        z = torch.randn(7, 301, dtype=dtype, requires_grad=True)
        outs = []
        for fused_min in (0, 2**62):
            dropout_module.FUSED_MIN_NUMEL = fused_min
            torch.manual_seed(4)
            out = RecomputedDropout(0.3).train()(z)
            outs.append((out, torch.autograd.grad(out, z, torch.ones_like(out))[0], type(out.grad_fn).__name__))
        dropout_module.FUSED_MIN_NUMEL = default_fused_min
        (fused, fused_grad, fused_fn), (split, split_grad, split_fn) = outs
        same = torch.equal if dtype != torch.bfloat16 else lambda a, b: torch.allclose(a, b, rtol=2**-7, atol=0)
        results[f"fused_and_split_paths_agree_{dtype}"] = (
            torch.equal(fused == 0, split == 0)
            and same(fused, split)
            and same(fused_grad, split_grad)
            and (fused_fn, split_fn) == ("_SeededDropoutBackward", "AddcmulBackward0")
        )
    return results


def fallback_results() -> dict[str, object]:
    """A mask kernel that is wrong in one entry fails the first-use check: one warning, then the PyTorch path,
    whose masks (forward and backward) are the real kernel's."""
    triton_mask = kernels._triton_mask

    def one_entry_wrong(shape, seed, p):
        mask = triton_mask(shape, seed, p)
        mask.view(-1)[0] ^= True
        return mask

    kernels._triton_selected, kernels._triton_mask = None, one_entry_wrong
    y = torch.randn(6, 301, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(5)
        dropped = RecomputedDropout(0.3).train()(y)
        (grad,) = torch.autograd.grad(dropped, y, torch.ones_like(dropped))
        dropout_mul(y, draw_seed(y.device), 0.3)
    torch.manual_seed(5)
    kernel_mask = triton_mask(y.shape, draw_seed(y.device), 0.3)
    kernels._triton_mask = triton_mask
    return {
        "fallback_warnings": [str(w.message) for w in caught if w.category is RuntimeWarning],
        "fallback_selected": kernels._triton_selected is False and not uses_triton(y),
        "fallback_forward_is_kernel_mask": torch.equal(dropped != 0, kernel_mask),
        "fallback_backward_is_kernel_mask": torch.equal(grad != 0, kernel_mask),
    }


if __name__ == "__main__":
    main()
