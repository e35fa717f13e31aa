"""The two CPU patches the real sleep/wake path needs on a machine without a CUDA driver.

`MemoryOccupationController` moves every updatable module to pinned host memory on release
and back on resume, then synchronizes and empties the CUDA cache. Here every module already
lives on the CPU, but `torch.cuda.synchronize()` is called unconditionally and fails with
"Found no NVIDIA driver", which `/release_memory_occupation` reports as a 500. The rest of
the controller (its bookkeeping, the "already sleeping" answers, the scheduler refusing work
while asleep) runs unchanged.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any


def clear_cache_on_cpu() -> None:
    """Replaces `_clear_torch_device_cache`: there is no device cache, only the heap."""
    gc.collect()


def move_modules_without_cuda(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Around `_move_modules`: run it with `torch.cuda.synchronize` made a no-op."""
    import torch

    saved = torch.cuda.synchronize
    torch.cuda.synchronize = _no_sync
    try:
        return original(*args, **kwargs)
    finally:
        torch.cuda.synchronize = saved


def _no_sync(device: Any = None) -> None:
    """Nothing runs asynchronously on the CPU."""
