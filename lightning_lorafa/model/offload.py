"""Activation offloading (``offload_activations``): what a model's forward saves for backward waits in CPU memory.

During the forward of a model prepared with ``offload_activations=True``, every saved tensor of at least
``MIN_OFFLOAD_BYTES`` on an accelerator is copied to pinned CPU memory (``non_blocking``, on the current stream)
and copied back when backward needs it, through ``torch.autograd.graph.saved_tensors_hooks``. Parameters stay
where they are (they are alive anyway), and so do small tensors (the copy would cost more than it frees). With
``recompute="block"`` only the blocks' inputs are saved, so only those move: the pairing torchtune's activation
offloading uses. The hooks are entered by a forward pre-hook of the model and left by its forward hook (also when
the forward raises), so the loss the chunked loss computes after the model's forward is included.

On a CPU-only run nothing moves: the tensors are in CPU memory already.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

#: Saved tensors smaller than this stay on their device.
MIN_OFFLOAD_BYTES = 1 << 20
_ATTRIBUTE = "lorafa_offload"


@dataclass
class ActivationOffload:
    """The saved-tensor hooks that move large saved activations to CPU memory and back.

    Args:
        min_bytes: the smallest tensor moved.
        device_types: the device types whose tensors move (``("cuda",)``; tests pass ``("cpu",)`` to exercise
            the copies on a CPU-only machine).
    Attributes:
        moved_bytes: bytes moved to CPU memory since the last ``reset``.
    """

    min_bytes: int = MIN_OFFLOAD_BYTES
    device_types: tuple[str, ...] = ("cuda",)
    moved_bytes: int = 0
    handles: list[RemovableHandle] = field(default_factory=list)
    _active: list[Any] = field(default_factory=list)

    def pack(self, tensor: torch.Tensor) -> Any:
        nbytes = tensor.numel() * tensor.element_size()
        if (
            tensor.device.type not in self.device_types
            or nbytes < self.min_bytes
            or isinstance(tensor, nn.Parameter)
            or tensor.layout is not torch.strided
        ):
            return tensor
        pinned = tensor.device.type != "cpu" and torch.cuda.is_available()
        copy = torch.empty_like(tensor, device="cpu", pin_memory=pinned)  # the same strides: the same kernels
        copy.copy_(tensor, non_blocking=pinned)
        self.moved_bytes += nbytes
        return tensor.device, copy

    @staticmethod
    def unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, tuple):
            device, copy = packed
            return copy.to(device, non_blocking=True)
        return packed

    def enter(self, module: nn.Module, args: tuple) -> None:
        if torch.is_grad_enabled():
            hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
            hooks.__enter__()
            self._active.append(hooks)

    def leave(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._active:
            self._active.pop().__exit__(None, None, None)

    def reset(self) -> None:
        self.moved_bytes = 0


def enable_offload(model: nn.Module, offload: ActivationOffload | None = None) -> ActivationOffload:
    """Offload ``model``'s saved activations during its forward (the module docstring); idempotent."""
    existing = getattr(model, _ATTRIBUTE, None)
    if isinstance(existing, ActivationOffload):
        return existing
    offload = offload or ActivationOffload()
    offload.handles = [
        model.register_forward_pre_hook(offload.enter, prepend=True),
        model.register_forward_hook(offload.leave, always_call=True),
    ]
    setattr(model, _ATTRIBUTE, offload)
    return offload


def disable_offload(model: nn.Module) -> bool:
    """Stop offloading ``model``'s activations; whether it was on."""
    offload = vars(model).pop(_ATTRIBUTE, None)
    if offload is None:
        return False
    for handle in offload.handles:
        handle.remove()
    return True
