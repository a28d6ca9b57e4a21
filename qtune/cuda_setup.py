"""Settings that must be in place before CUDA starts in the process (no torch import here, on purpose)."""

from __future__ import annotations

import os

ALLOCATOR = "PYTORCH_CUDA_ALLOC_CONF"


def use_expandable_segments() -> None:
    """PyTorch's allocator then grows a segment in place instead of carving fixed blocks out of it. At long context
    the blocks fragment: on a 15 GiB cap, the 8B shape at 40,960 tokens ran out of memory asking for 1.09 GiB with
    13.86 GiB allocated and 0.75 GiB reserved but unusable (bench/gpu_check.py on an H200). unsloth sets the same.
    A user's own setting wins."""
    os.environ.setdefault(ALLOCATOR, "expandable_segments:True")
