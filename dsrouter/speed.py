"""Per-worker service speed, learned online from completed requests.

Kept in seconds per cost unit (see `cost.py`). Updates are an exponentially weighted mean
of log(seconds/cost), so one request's outlier is bounded (each observation is clipped to
within 4x of the current estimate) and a worker that becomes slower is noticed within a few
requests. A worker with no history starts from the pool's median.
"""

from __future__ import annotations

import math
import statistics

import attrs

CLIP = math.log(4.0)
ALPHA = 0.2


@attrs.define
class SpeedEstimate:
    log_seconds_per_unit: float | None = None
    seconds_per_unit: float | None = None
    """Kept alongside the log: the routing policy reads it on every decision."""
    samples: int = 0

    def observe(self, cost: float, seconds: float) -> None:
        if cost <= 0 or seconds <= 0:
            return
        sample = math.log(seconds / cost)
        if self.log_seconds_per_unit is None:
            self.log_seconds_per_unit = sample
        else:
            current = self.log_seconds_per_unit
            sample = min(max(sample, current - CLIP), current + CLIP)
            self.log_seconds_per_unit = current + ALPHA * (sample - current)
        self.seconds_per_unit = math.exp(self.log_seconds_per_unit)
        self.samples += 1


def pool_median(estimates: list[SpeedEstimate], default: float) -> float:
    known = [e.seconds_per_unit for e in estimates if e.seconds_per_unit is not None]
    return statistics.median(known) if known else default
