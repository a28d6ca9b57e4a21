"""Settings that must be in place before CUDA starts in the process (no torch import here, on purpose)."""

from __future__ import annotations

import os

ALLOCATOR = "PYTORCH_CUDA_ALLOC_CONF"


def use_expandable_segments() -> None:
    """Makes PyTorch's allocator grow a segment in place instead of carving fixed blocks out of it, unless the user set
    PYTORCH_CUDA_ALLOC_CONF. At long context fixed blocks fragment until an allocation fails with memory free
    (bench/README.md, "Long context"); unsloth sets the same."""
    os.environ.setdefault(ALLOCATOR, "expandable_segments:True")
