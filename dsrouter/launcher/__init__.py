"""Launching and supervising local worker processes (`[launcher]` in router.toml).

The public surface is `run_pool`, a task for the root nursery, and `LaunchError`, what it
raises when the pool cannot come up. The modules behind it each own one decision:
`plan` (what to run), `ports`, `gpus`, `process` (one process group), `pidfile` (cleanup
after a SIGKILLed router), `logs`, `restarts` (the policy), `progress`, and `local` (the
supervisors).
"""

from dsrouter.launcher.errors import LaunchError
from dsrouter.launcher.local import run_pool

__all__ = ["LaunchError", "run_pool"]
