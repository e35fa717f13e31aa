"""`dsrouter run --demo`: the launcher config of a pool of simulated CPU workers.

The demo goes through the same launcher and supervision code as a GPU pool; only the
command differs.
"""

from __future__ import annotations

import sys

import attrs

from dsrouter.config import Config

DEMO_BASE_PORT = 10090


def demo_config(config: Config, num_workers: int) -> Config:
    launcher = attrs.evolve(
        config.launcher,
        model="sim/Wan-Sim-T2V",
        num_workers=num_workers,
        num_gpus_per_worker=1,
        worker_host="127.0.0.1",
        worker_base_port=config.launcher.worker_base_port
        if config.launcher.num_workers else DEMO_BASE_PORT,
        command=[sys.executable, "-m", "dsrouter.simworker"],
        extra_args=["--task-type", "T2I,T2V", *config.launcher.extra_args],
        wait_timeout_s=60.0,
        stop_timeout_s=5.0,
    )
    return attrs.evolve(config, launcher=launcher)
