"""Which GPUs each worker sees, decided without importing torch.

Sources, first match wins:

1. `launcher.gpu_ids`: one list of device ids per worker, used as given;
2. the router's own `CUDA_VISIBLE_DEVICES` (indices or UUIDs; set but empty = no GPU);
3. `nvidia-smi -L` (a missing binary means no GPU).

Each worker then gets `CUDA_VISIBLE_DEVICES` set to its share, so its `--num-gpus` GPUs are
"0..n-1 of the visible devices" (WORKER_API.md §1.3). `num_gpus_per_worker = 0` means no GPU
pinning at all: nothing is discovered, `CUDA_VISIBLE_DEVICES` is left alone and `--num-gpus`
is not passed. That is how simulated CPU workers (`dsrouter run --demo`) run on machines
without GPUs.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping

import attrs
import trio

from dsrouter.config import LauncherConfig
from dsrouter.launcher.errors import LaunchError

NVIDIA_SMI_TIMEOUT_S = 30.0
_SMI_LINE = re.compile(r"^GPU (\d+):", re.MULTILINE)


@attrs.frozen
class VisibleGPUs:
    """The GPUs the router may hand out, and where that list came from (for error messages)."""

    ids: tuple[str, ...]
    source: str


async def discover_gpus(environ: Mapping[str, str]) -> VisibleGPUs:
    """GPUs visible to this process: `CUDA_VISIBLE_DEVICES` if set, else `nvidia-smi -L`."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = tuple(part.strip() for part in visible.split(",") if part.strip())
        return VisibleGPUs(ids, f"CUDA_VISIBLE_DEVICES={visible!r}")
    binary = shutil.which("nvidia-smi", path=environ.get("PATH"))
    if binary is None:
        return VisibleGPUs((), "CUDA_VISIBLE_DEVICES is unset and nvidia-smi is not installed")
    try:
        with trio.fail_after(NVIDIA_SMI_TIMEOUT_S):
            result = await trio.run_process(
                [binary, "-L"], capture_stdout=True, capture_stderr=True, check=False
            )
    except trio.TooSlowError:
        return VisibleGPUs((), f"nvidia-smi -L did not answer within {NVIDIA_SMI_TIMEOUT_S:g}s")
    except OSError as exc:
        return VisibleGPUs((), f"nvidia-smi -L could not run: {exc}")
    if result.returncode != 0:
        detail = result.stderr.decode(errors="replace").strip().splitlines()
        return VisibleGPUs((), f"nvidia-smi -L failed ({detail[-1] if detail else 'no output'})")
    ids = tuple(_SMI_LINE.findall(result.stdout.decode(errors="replace")))
    return VisibleGPUs(ids, f"nvidia-smi -L lists {len(ids)}")


def assign_gpus(cfg: LauncherConfig, visible: VisibleGPUs | None) -> list[tuple[str, ...]]:
    """Each worker's GPU ids; raises `LaunchError` when the pool does not fit.

    Disjoint consecutive slices of the visible GPUs unless `gpu_ids` says otherwise. `visible`
    may be None when `gpu_ids` is given or no GPU is needed (`num_gpus_per_worker = 0`).
    """
    per_worker = cfg.num_gpus_per_worker
    if per_worker == 0:
        if cfg.gpu_ids:
            raise LaunchError(
                "launcher.gpu_ids is set but num_gpus_per_worker is 0 (no GPU "
                "pinning); set num_gpus_per_worker or drop gpu_ids"
            )
        return [()] * cfg.num_workers
    if cfg.gpu_ids:
        return _explicit(cfg)
    assert visible is not None, "GPU discovery is needed when gpu_ids is empty"
    needed = cfg.num_workers * per_worker
    if len(visible.ids) < needed:
        raise LaunchError(
            f"not enough GPUs: {cfg.num_workers} workers x {per_worker} GPU(s) each need "
            f"{needed}, found {len(visible.ids)} ({visible.source}). Lower num_workers or "
            "num_gpus_per_worker, list launcher.gpu_ids, or set num_gpus_per_worker = 0 for "
            "workers that need no GPU"
        )
    return [visible.ids[i * per_worker : (i + 1) * per_worker] for i in range(cfg.num_workers)]


def needs_discovery(cfg: LauncherConfig) -> bool:
    return cfg.num_gpus_per_worker > 0 and not cfg.gpu_ids


def _explicit(cfg: LauncherConfig) -> list[tuple[str, ...]]:
    """`gpu_ids` as given. A group may list more GPUs than the worker uses (sglang-d-router
    accepted that: the worker takes the first `--num-gpus` it sees), not fewer."""
    if len(cfg.gpu_ids) < cfg.num_workers:
        raise LaunchError(
            f"launcher.gpu_ids lists GPUs for {len(cfg.gpu_ids)} worker(s), "
            f"num_workers is {cfg.num_workers}"
        )
    short = [
        f"worker {i}: {ids}"
        for i, ids in enumerate(cfg.gpu_ids[: cfg.num_workers])
        if len(ids) < cfg.num_gpus_per_worker
    ]
    if short:
        raise LaunchError(
            f"launcher.gpu_ids must list at least num_gpus_per_worker = "
            f"{cfg.num_gpus_per_worker} id(s) per worker: " + "; ".join(short)
        )
    return [tuple(ids) for ids in cfg.gpu_ids[: cfg.num_workers]]
