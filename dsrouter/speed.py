"""Per-worker service time, learned online from completed requests.

A request's service time is modelled as `overhead + seconds_per_unit x cost` (cost in
megapixel-steps, see `cost.py`). The overhead is what every request pays whatever its size
(network, HTTP, encoding); without it, a warm-up of 16x16 one-step requests divided a few
milliseconds by a near-zero cost and made a worker look a thousand times slower than it is.

Learning is a robust regression in log space with bounded memory (two numbers and two
counts): each sample's ratio of measured to predicted time is clipped to within `CLIP` (so
one outlier moves nothing far, the first sample included), and its log is shared between the
two terms by how much of the predicted time each explains. A sample whose cost is small next
to the overhead moves the overhead, not the per-unit time; a big one moves the per-unit time.

Each term's gain follows its own evidence: a running average (1/n) over its first samples,
then `ALPHA`. A worker that joins a pool four times faster than the median therefore shows
its speed after its first real request instead of after five, while one outlier still moves
it at most `CLIP` and counts as one sample of the average (two consistent samples after it
leave it within 1.6x). Later, the fixed `ALPHA` follows a worker that slows down or speeds up
within a few requests.

Read through `Prior`: an estimate starts from the pool's (a worker's first sample updates the
pool's figures, not nothing), may stray from the pool's median per-unit time only by a factor
that widens with its own evidence (`bound`), and decays back toward the pool's with age
(`AGE_S`). A worker with little or old evidence is `unsure`: the least-work policy gives such
an idle worker a request now and then (see `policies.LeastWork`).
"""

from __future__ import annotations

import math
import statistics

import attrs

CLIP = math.log(4.0)
"""A sample moves the estimate as if it were at most 4x off the prediction."""
ALPHA = 0.3
"""The gain once a term has about 1 / ALPHA - 1 samples (the running average's 1/n is no
larger): a 4x change is within 1.3x after 5 requests."""
DEFAULT_OVERHEAD_S = 0.05
"""The fixed time per request assumed before any worker has taught otherwise."""
AGE_S = 120.0
"""Evidence loses weight with this time constant; an estimate drifts back to the pool's."""
SURE_SAMPLES = 3.0
"""An estimate built on fewer (age-weighted, cost-weighted) samples is unsure."""
BOUND = 4.0
BOUND_SAMPLES = 8.0
"""A worker's per-unit time stays within `BOUND` x 2**(samples / BOUND_SAMPLES) of the
pool median: 16x after 16 work-bearing samples, 100x only after about 37."""
MAX_BOUND = 1000.0
MIN_OVERHEAD_S = 1e-6
"""Learning is multiplicative: an overhead of exactly 0 could never grow."""


@attrs.frozen
class Prior:
    """The pool's figures: what a worker with no evidence of its own is assumed to do."""

    seconds_per_unit: float
    overhead_s: float = DEFAULT_OVERHEAD_S


@attrs.define
class SpeedEstimate:
    log_seconds_per_unit: float | None = None
    log_overhead: float | None = None
    samples: float = 0.0
    """Evidence about the per-unit time: each sample counts by the share of its time that
    the work explains (a tiny request counts for almost nothing)."""
    overhead_samples: float = 0.0
    """Evidence about the overhead: the rest of each sample's share."""
    updated_at: float = -math.inf
    seconds_per_unit: float | None = None
    """The worker's own learnt figure (operators read it: `/workers`, metrics)."""
    overhead_s: float | None = None

    def observe(self, cost: float, seconds: float, prior: Prior, now: float) -> None:
        """Fold one completed request in; an estimate with no samples starts from `prior`."""
        if seconds <= 0 or cost < 0 or not math.isfinite(seconds + cost):
            return
        spu, overhead = self.effective(prior, now)
        log_spu, log_over = math.log(spu), math.log(overhead)
        work = spu * cost
        share = work / (work + overhead)
        ratio = min(max(math.log(seconds / (work + overhead)), -CLIP), CLIP)
        weight = _decay(now - self.updated_at)
        samples, overhead_samples = self.samples * weight, self.overhead_samples * weight
        self.log_seconds_per_unit = log_spu + _gain(samples, share) * share * ratio
        self.log_overhead = log_over + _gain(overhead_samples, 1.0 - share) * (1.0 - share) * ratio
        self.samples = samples + share
        self.overhead_samples = overhead_samples + 1.0 - share
        self.updated_at = now
        self.seconds_per_unit = math.exp(self.log_seconds_per_unit)
        self.overhead_s = math.exp(self.log_overhead)

    def _aged_samples(self, now: float) -> float:
        return self.samples * _decay(now - self.updated_at)

    def unsure(self, now: float) -> bool:
        return self._aged_samples(now) < SURE_SAMPLES

    def effective(self, prior: Prior, now: float) -> tuple[float, float]:
        """(seconds per unit, overhead) to predict with: the worker's own figures, drawn
        toward the pool's as they age, the per-unit time bounded around the pool median."""
        if self.log_seconds_per_unit is None or self.log_overhead is None:
            return prior.seconds_per_unit, max(prior.overhead_s, MIN_OVERHEAD_S)
        weight = _decay(now - self.updated_at)
        pool_spu = math.log(prior.seconds_per_unit)
        pool_over = math.log(max(prior.overhead_s, MIN_OVERHEAD_S))
        log_spu = pool_spu + weight * (self.log_seconds_per_unit - pool_spu)
        log_over = pool_over + weight * (self.log_overhead - pool_over)
        bound = math.log(min(BOUND * 2.0 ** (self.samples * weight / BOUND_SAMPLES), MAX_BOUND))
        log_spu = min(max(log_spu, pool_spu - bound), pool_spu + bound)
        return math.exp(log_spu), math.exp(log_over)


def _gain(samples: float, evidence: float) -> float:
    """The step towards a sample carrying `evidence` (0-1) for a term that has `samples`:
    a running average of the evidence so far (1 for the first whole sample), never below
    `ALPHA`, so the pool's prior counts for nothing once the worker has evidence of its own."""
    return max(ALPHA, min(1.0, 1.0 / (samples + max(evidence, 1e-9))))


def _decay(age: float) -> float:
    return math.exp(-age / AGE_S) if age > 0 else 1.0


def pool_prior(estimates: list[SpeedEstimate], default_spu: float) -> Prior:
    """The median of the learnt figures, or the configured default before any."""
    spus = [e.seconds_per_unit for e in estimates if e.seconds_per_unit is not None]
    overheads = [e.overhead_s for e in estimates if e.overhead_s is not None]
    return Prior(
        statistics.median(spus) if spus else default_spu,
        statistics.median(overheads) if overheads else DEFAULT_OVERHEAD_S,
    )
