"""Launching and supervising workers (`[launcher]` in router.toml).

The public surface is `run_pool`, a task for the root nursery; `Pool`, the handle it reports
once the workers are up, through which a reload applies a changed `[launcher]` (rolling
restarts); and `LaunchError`, what `run_pool` raises when the pool cannot come up (and
`Pool.reconfigure` when new settings cannot run). The modules behind it each own one
decision: `plan` (what to run), `ports`, `gpus`, `process` (one process group), `pidfile`
(cleanup after a SIGKILLed router), `logs`, `restarts` (the policy), `progress`, `local` (the
supervisors) and `rolling` (applying new settings to running workers). `backend = "ray"`
runs `run_ray_pool` instead (`ray_backend`: slots, placement groups, `RayPool`), whose
actors are `ray_actor.WorkerHost`, each starting its server through `groupkeeper`.
"""

from dsrouter.launcher.errors import LaunchError
from dsrouter.launcher.local import run_pool
from dsrouter.launcher.ray_backend import RayPool, run_ray_pool
from dsrouter.launcher.rolling import Pool, Reconfiguration

__all__ = ["LaunchError", "Pool", "RayPool", "Reconfiguration", "run_pool", "run_ray_pool"]
