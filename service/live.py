"""The live panel's figures, computed from the server's own Prometheus metrics.

``/metrics`` holds counters and histograms since the server started; a person wants "the last few
minutes". Each API server keeps a short list of snapshots of the merged metrics (taken when
``GET /v1/live`` is called, at most one per ``SNAPSHOT_EVERY_S``) and answers with the difference
between now and the oldest snapshot inside the window: requests/s, the exit share of each stage,
the mean compute per request and the p50 / p99 latency, interpolated within histogram buckets as
Prometheus's ``histogram_quantile`` does. No metric is declared here: the names come from
``service.metrics``.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from service.metrics import NAMESPACE

WINDOW_S = 300.0  # "the last minutes"
SNAPSHOT_EVERY_S = 5.0  # bounds the list at WINDOW_S / SNAPSHOT_EVERY_S snapshots per API server


@dataclass(frozen=True)
class Snapshot:
    """Cumulative figures of every process at one moment."""

    at: float  # monotonic seconds
    ok: float = 0.0  # successful classifications
    exits: tuple[float, ...] = ()  # answered at each stage
    gmacs_sum: float = 0.0  # compute spent on answered requests
    latency_buckets: tuple[tuple[float, float], ...] = ()  # (upper bound s, cumulative count), sorted


def read_snapshot(num_stages: int, at: float | None = None) -> Snapshot:
    """The merged metrics of every process, from ``PROMETHEUS_MULTIPROC_DIR``."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    values: dict[tuple[str, tuple], float] = {}
    for family in registry.collect():
        for sample in family.samples:
            values[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return snapshot_from(values, num_stages, time.monotonic() if at is None else at)


def snapshot_from(values: dict[tuple[str, tuple], float], num_stages: int, at: float) -> Snapshot:
    """``values``: (sample name, sorted label items) -> value, as a registry's samples."""
    ns = NAMESPACE
    buckets = sorted(
        (float(dict(labels)["le"]), value)
        for (name, labels), value in values.items()
        if name == f"{ns}_request_latency_seconds_bucket"
    )
    return Snapshot(
        at=at,
        ok=values.get((f"{ns}_requests_total", (("outcome", "ok"),)), 0.0),
        exits=tuple(values.get((f"{ns}_exits_total", (("stage", str(s)),)), 0.0) for s in range(num_stages)),
        gmacs_sum=values.get((f"{ns}_request_gmacs_sum", ()), 0.0),
        latency_buckets=tuple(buckets),
    )


def quantile(q: float, buckets: tuple[tuple[float, float], ...]) -> float | None:
    """``histogram_quantile``: linear within the bucket holding rank q * count; None when empty.
    A rank in the +Inf bucket answers the highest finite bound."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


def difference(new: Snapshot, old: Snapshot) -> dict:
    """The live panel's body for the span between two snapshots."""
    span = max(new.at - old.at, 1e-9)
    exits = [n - o for n, o in zip(new.exits, old.exits or (0.0,) * len(new.exits))]
    answered = sum(exits)
    old_buckets = dict(old.latency_buckets)
    buckets = tuple((bound, count - old_buckets.get(bound, 0.0)) for bound, count in new.latency_buckets)
    ms = [quantile(q, buckets) for q in (0.5, 0.99)]
    return {
        "window_s": round(span, 1),
        "requests": int(new.ok - old.ok),
        "requests_per_s": round((new.ok - old.ok) / span, 3),
        "exits": [
            {"stage": s, "count": int(c), "share": round(c / answered, 4) if answered else None}
            for s, c in enumerate(exits)
        ],
        "gmacs_per_request": float(f"{(new.gmacs_sum - old.gmacs_sum) / answered:.4g}") if answered else None,
        "latency_ms": {
            name: None if value is None else round(1000 * value, 2) for name, value in zip(("p50", "p99"), ms)
        },
    }


@dataclass
class LiveWindow:
    """One API server's recent snapshots; the first is all zeros, at ``started`` (when the API
    server started: the counters count from about then)."""

    num_stages: int
    started: float  # monotonic seconds
    snapshots: deque[Snapshot] = field(default_factory=deque)

    def __post_init__(self):
        self.snapshots.append(Snapshot(at=self.started, exits=(0.0,) * self.num_stages))

    def summary(self, now: Snapshot) -> dict:
        """Figures since the oldest snapshot at most WINDOW_S old (or the server's start)."""
        if now.at - self.snapshots[-1].at >= SNAPSHOT_EVERY_S:
            self.snapshots.append(now)
        while len(self.snapshots) > 1 and self.snapshots[1].at <= now.at - WINDOW_S:
            self.snapshots.popleft()
        return difference(now, self.snapshots[0])
