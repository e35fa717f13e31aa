"""The plugin's switches, read from the environment of each worker process.

The router's launcher passes `launcher.env` to every worker it starts, and sglang's
scheduler processes inherit the environment of the HTTP process, so one set of variables
configures a whole pool. They are read when used, not at import, so a test can change them
between two workers it starts.
"""

from __future__ import annotations

import os

ENABLE_VAR = "DSROUTER_TEST_PLUGIN"
STEP_VAR = "DSROUTER_TEST_STEP_S"
LOAD_VAR = "DSROUTER_TEST_LOAD_S"
WARMUP_VAR = "DSROUTER_TEST_WARMUP_S"
FAIL_MARKER = "DSROUTER_FAIL"
"""A prompt containing this fails its generation (the model raises)."""


def enabled() -> bool:
    return os.environ.get(ENABLE_VAR) == "1"


def seconds(name: str) -> float:
    """A non-negative number of seconds from `name`; 0 when unset."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return 0.0
    value = float(raw)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {raw!r}")
    return value
