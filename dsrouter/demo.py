"""`dsrouter run --demo`: the launcher config of a pool of simulated CPU workers.

The demo goes through the same launcher and supervision code as a GPU pool; only the
command differs. `num_gpus_per_worker = 0` turns GPU pinning off (see
`dsrouter.launcher.gpus`), so the demo runs on machines without GPUs. The rest of
`[launcher]` (ports, restart policy, log_dir, ...) is taken from the configuration as given.
"""

from __future__ import annotations

import sys

import attrs

from dsrouter.config import Config

DEMO_MODEL = "sim/Wan-Sim-T2V"
DEMO_COMMAND = [sys.executable, "-m", "dsrouter.simworker"]


def demo_config(config: Config, num_workers: int) -> Config:
    launcher = attrs.evolve(
        config.launcher,
        model=DEMO_MODEL,
        num_workers=num_workers,
        num_gpus_per_worker=0,
        gpu_ids=[],
        command=DEMO_COMMAND,
        extra_args=["--task-type", "T2I,T2V", *config.launcher.extra_args],
        wait_timeout_s=60.0,
        stop_timeout_s=5.0,
    )
    return attrs.evolve(config, launcher=launcher)
