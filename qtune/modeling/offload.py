"""Activation offloading: what autograd keeps between the forward and the backward pass goes to CPU memory.

With gradient checkpointing, what autograd keeps is the input of each decoder layer (torch's non-reentrant
checkpoint saves it through the same saved-tensor hooks as any op), so on a long row the GPU holds one layer's
recompute instead of every layer's input: for Llama-3.1-8B at 40k tokens that is 10 GiB moved to pinned host
memory. trl has the same idea (`activation_offloading`), with copy streams, but it cannot run without an
accelerator (it asks torch.accelerator for one and fails on CPU), so it cannot be tested here, and its
SFTTrainer wraps only its own training_step, not qtune's one-row-at-a-time step. This is torch's
`save_on_cpu` with the frozen weights left where they are (bitsandbytes' backward saves the 4-bit weight
itself: copying 4 GiB of weights twice a step would cost more than the activations).
"""

from __future__ import annotations

import torch
from torch.autograd.graph import saved_tensors_hooks

MIN_OFFLOAD_BYTES = 1 << 20  # smaller tensors (masks, norms' statistics) are not worth a copy


class ActivationsToCPU(saved_tensors_hooks):
    """Saved tensors of at least `min_bytes` that are not parameters are kept in CPU memory (pinned when they come
    from a GPU). On a CPU the copy is pointless, and qtune never turns offloading on there; the tests do, to check
    the offloaded path gives the same loss and gradients. `offloaded_bytes` counts what was moved."""

    def __init__(self, *, min_bytes: int = MIN_OFFLOAD_BYTES):
        self.offloaded_bytes = 0

        def pack(tensor: torch.Tensor):
            size = tensor.numel() * tensor.element_size()
            if isinstance(tensor, torch.nn.Parameter) or size < min_bytes:
                return tensor
            pinned = tensor.device.type == "cuda"
            host = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=pinned)
            host.copy_(tensor, non_blocking=pinned)
            self.offloaded_bytes += size
            return tensor.device, host

        def unpack(packed):
            if isinstance(packed, torch.Tensor):
                return packed
            device, host = packed
            return host.to(device, non_blocking=host.is_pinned())

        super().__init__(pack, unpack)
