"""GPU discovery and assignment: fake CUDA_VISIBLE_DEVICES, a fake nvidia-smi on PATH."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from dsrouter.config import LauncherConfig
from dsrouter.launcher.errors import LaunchError
from dsrouter.launcher.gpus import VisibleGPUs, assign_gpus, discover_gpus
from dsrouter.launcher.plan import plan_pool

SMI_OUTPUT = """GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-aaaa)
GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-bbbb)
GPU 2: NVIDIA H100 80GB HBM3 (UUID: GPU-cccc)
"""


def _config(**changes: object) -> LauncherConfig:
    return LauncherConfig(**{"model": "m", "num_workers": 2, **changes})  # type: ignore[arg-type]


def _fake_smi(directory: Path, body: str) -> str:
    """A directory holding an executable `nvidia-smi` shell script; returns it as PATH."""
    script = directory / "nvidia-smi"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return str(directory)


async def test_cuda_visible_devices_wins_over_nvidia_smi(tmp_path: Path) -> None:
    path = _fake_smi(tmp_path, f"cat <<'EOF'\n{SMI_OUTPUT}EOF")
    visible = await discover_gpus({"CUDA_VISIBLE_DEVICES": "4, 5,GPU-x,7", "PATH": path})
    assert visible.ids == ("4", "5", "GPU-x", "7")


async def test_empty_cuda_visible_devices_means_no_gpu_at_all(tmp_path: Path) -> None:
    path = _fake_smi(tmp_path, f"cat <<'EOF'\n{SMI_OUTPUT}EOF")
    assert (await discover_gpus({"CUDA_VISIBLE_DEVICES": "", "PATH": path})).ids == ()


async def test_nvidia_smi_listing_is_used_when_cuda_visible_devices_is_unset(
    tmp_path: Path,
) -> None:
    path = _fake_smi(tmp_path, f"cat <<'EOF'\n{SMI_OUTPUT}EOF")
    visible = await discover_gpus({"PATH": path})
    assert visible.ids == ("0", "1", "2")
    assert "nvidia-smi -L lists 3" in visible.source


async def test_a_missing_nvidia_smi_means_no_gpus(tmp_path: Path) -> None:
    visible = await discover_gpus({"PATH": str(tmp_path)})
    assert visible.ids == ()
    assert "nvidia-smi is not installed" in visible.source


async def test_a_failing_nvidia_smi_means_no_gpus_and_says_why(tmp_path: Path) -> None:
    path = _fake_smi(tmp_path, "echo 'NVIDIA-SMI has failed: driver not loaded' >&2; exit 9")
    visible = await discover_gpus({"PATH": path})
    assert visible.ids == ()
    assert "driver not loaded" in visible.source


def test_visible_gpus_are_split_into_consecutive_disjoint_slices() -> None:
    visible = VisibleGPUs(("3", "4", "5", "6", "7"), "test")
    assert assign_gpus(_config(num_gpus_per_worker=2), visible) == [("3", "4"), ("5", "6")]


def test_too_few_gpus_is_one_clear_error() -> None:
    visible = VisibleGPUs(("0", "1", "2"), "nvidia-smi -L lists 3")
    with pytest.raises(LaunchError) as caught:
        assign_gpus(_config(num_workers=4, num_gpus_per_worker=1), visible)
    assert str(caught.value).startswith(
        "not enough GPUs: 4 workers x 1 GPU(s) each need 4, found 3 (nvidia-smi -L lists 3)"
    )


def test_explicit_gpu_ids_are_used_as_given() -> None:
    cfg = _config(gpu_ids=[["1"], ["0"], ["7"]])
    assert assign_gpus(cfg, None) == [("1",), ("0",)]


def test_explicit_gpu_ids_for_too_few_workers_are_refused() -> None:
    with pytest.raises(LaunchError, match="lists GPUs for 1 worker"):
        assign_gpus(_config(gpu_ids=[["0"]]), None)


def test_explicit_gpu_groups_smaller_than_num_gpus_are_refused() -> None:
    with pytest.raises(LaunchError, match=r"at least num_gpus_per_worker = 2 .* worker 0: \['0'\]"):
        assign_gpus(_config(num_gpus_per_worker=2, gpu_ids=[["0"], ["2", "3"]]), None)


def test_explicit_gpu_groups_may_be_larger_as_in_sglang_d_router() -> None:
    assert assign_gpus(_config(gpu_ids=[["0"], ["1", "2"]]), None) == [("0",), ("1", "2")]


def test_zero_gpus_per_worker_pins_nothing() -> None:
    assert assign_gpus(_config(num_gpus_per_worker=0), None) == [(), ()]


async def test_each_worker_sees_only_its_gpus_and_gets_num_gpus(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3,4,5")
    plans = await plan_pool(_config(num_gpus_per_worker=2, command=[sys.executable]), os.environ)
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in plans] == ["2,3", "4,5"]
    argv = plans[1].argv
    assert argv[argv.index("--num-gpus") + 1] == "2"


async def test_without_gpu_pinning_no_num_gpus_flag_and_no_discovery(tmp_path: Path) -> None:
    environ = {"PATH": str(tmp_path)}  # no nvidia-smi, and it is not needed
    plans = await plan_pool(_config(num_gpus_per_worker=0, command=[sys.executable]), environ)
    assert "--num-gpus" not in plans[0].argv
    assert "CUDA_VISIBLE_DEVICES" not in plans[0].env


async def test_seed_yaml_pool_on_a_machine_without_gpus_fails_before_starting(
    tmp_path: Path,
) -> None:
    environ = {"PATH": str(tmp_path)}
    cfg = _config(num_workers=8, num_gpus_per_worker=1, command=[sys.executable])
    with pytest.raises(LaunchError, match="need 8, found 0"):
        await plan_pool(cfg, environ)


async def test_every_problem_before_start_is_reported_at_once(tmp_path: Path) -> None:
    environ = {"PATH": str(tmp_path)}
    cfg = _config(
        num_workers=8, num_gpus_per_worker=1, command=["sglang", "serve"], model="", port_stride=1
    )
    with pytest.raises(LaunchError) as caught:
        await plan_pool(cfg, environ)
    lines = str(caught.value).splitlines()
    assert lines[0] == (
        "launcher.command: 'sglang' not found on PATH; install it or give its full path"
    )
    assert lines[1] == "launcher.model is empty: the workers need --model-path"
    assert lines[2].startswith("launcher.port_stride is 1")
    assert lines[3].startswith("not enough GPUs: 8 workers x 1 GPU(s) each need 8, found 0")


async def test_no_gpu_is_refused_not_a_silent_cpu_pool_and_the_error_names_the_cpu_setting(
    tmp_path: Path,
) -> None:
    """Kept (MIGRATING.md): sglang-d-router fell back to CPU workers when it found no GPU.
    Here that is an error naming `num_gpus_per_worker = 0`, and that setting plans the
    pool sglang-d-router would have started: no CUDA_VISIBLE_DEVICES of ours."""
    environ = {"CUDA_VISIBLE_DEVICES": "", "PATH": str(Path(sys.executable).parent)}
    cfg = _config(command=[sys.executable])
    with pytest.raises(LaunchError) as caught:
        await plan_pool(cfg, environ)
    assert "found 0" in str(caught.value) and "num_gpus_per_worker = 0" in str(caught.value)
    plans = await plan_pool(_config(command=[sys.executable], num_gpus_per_worker=0), environ)
    assert [plan.gpus for plan in plans] == [(), ()]
    assert all("CUDA_VISIBLE_DEVICES" not in plan.env for plan in plans)
