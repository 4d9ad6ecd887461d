"""bench.slo's bookkeeping on made-up samples (the run itself is reported, never asserted)."""

from __future__ import annotations

import math

from bench.loadgen import RunResult, Sample
from bench.slo import recovered_after_s, timeline


def sample(start: float, latency: float, threshold: float, degraded: int = 0, error: str | None = None) -> Sample:
    return Sample(start, start + latency, 1, 1, [0], 0.01, error, [threshold] if error is None else [], degraded)


def test_timeline_bins_latency_thresholds_and_errors_by_arrival():
    result = RunResult([sample(10.1, 0.05, 1.0), sample(10.3, 0.15, 0.5, degraded=1),
                        sample(10.7, 0.01, 0.0, error="http 429")], window=(10.0, 11.0))  # fmt: skip
    first, second = timeline(result)
    assert first["t_s"] == 0.0 and first["arrivals"] == 2 and first["degraded"] == 1
    assert first["mean_threshold"] == 0.75 and round(first["p99_ms"]) == 150
    assert second["t_s"] == 0.5 and second["errors"] == 1 and math.isnan(second["mean_threshold"])


def test_recovery_is_the_first_bin_after_which_every_threshold_is_back():
    rows = [{"t_s": t, "mean_threshold": m} for t, m in [(0, 0.2), (4, 0.5), (4.5, 1.0), (5, 0.9), (5.5, 1.0), (6, 1.0)]]
    assert recovered_after_s(rows, 4.0, 1.0) == 1.5
    assert recovered_after_s(rows[:-2], 4.0, 1.0) is None
