"""The live panel's arithmetic (service.live) on made-up snapshots: no server, no clock."""

from __future__ import annotations

import math

import pytest

from service.live import SNAPSHOT_EVERY_S, WINDOW_S, LiveWindow, Snapshot, difference, quantile, snapshot_from

INF = math.inf


def test_quantile_interpolates_within_the_bucket():
    buckets = ((0.01, 0.0), (0.1, 10.0), (INF, 10.0))
    assert quantile(0.5, buckets) == pytest.approx(0.055)
    assert quantile(0.99, buckets) == pytest.approx(0.0991)


def test_quantile_of_nothing_is_none_and_the_inf_bucket_answers_the_highest_bound():
    assert quantile(0.5, ()) is None
    assert quantile(0.5, ((0.1, 0.0), (INF, 0.0))) is None
    assert quantile(0.99, ((0.1, 5.0), (INF, 10.0))) == 0.1


def test_difference_is_over_the_window_only():
    old = Snapshot(at=10.0, ok=5, exits=(4, 1), gmacs_sum=1.0, latency_buckets=((0.01, 5), (0.1, 5), (INF, 5)))
    new = Snapshot(at=20.0, ok=15, exits=(10, 5), gmacs_sum=2.0, latency_buckets=((0.01, 5), (0.1, 15), (INF, 15)))
    body = difference(new, old)
    assert body["window_s"] == 10.0 and body["requests"] == 10 and body["requests_per_s"] == 1.0
    assert [e["count"] for e in body["exits"]] == [6, 4]
    assert [e["share"] for e in body["exits"]] == [0.6, 0.4]
    assert body["gmacs_per_request"] == 0.1
    assert body["latency_ms"]["p50"] == pytest.approx(55.0)  # the old 5 fast ones do not count


def test_empty_window_has_no_shares_or_latencies():
    body = difference(Snapshot(at=5.0, exits=(0, 0)), Snapshot(at=0.0, exits=(0, 0)))
    assert [e["share"] for e in body["exits"]] == [None, None]
    assert body["latency_ms"] == {"p50": None, "p99": None} and body["gmacs_per_request"] is None


def test_window_keeps_one_snapshot_at_its_start_and_forgets_older_ones():
    window = LiveWindow(2, started=0.0)
    for t in range(0, 1000, 1):  # one call a second
        window.summary(Snapshot(at=float(t), ok=t, exits=(t, 0)))
    ats = [s.at for s in window.snapshots]
    assert ats[0] <= 999 - WINDOW_S < ats[1]
    assert len(ats) <= WINDOW_S / SNAPSHOT_EVERY_S + 2
    body = window.summary(Snapshot(at=1000.0, ok=1000, exits=(1000, 0)))
    assert WINDOW_S <= body["window_s"] <= WINDOW_S + SNAPSHOT_EVERY_S
    assert body["requests_per_s"] == 1.0


def test_snapshot_reads_the_metric_names_of_service_metrics():
    from service.metrics import ServiceMetrics

    metrics = ServiceMetrics(num_stages=2)
    metrics.record_success(0.02)
    metrics.exits.labels("1").inc()
    metrics.request_gmacs.observe(0.5)
    values = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            values[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    snap = snapshot_from(values, 2, at=1.0)
    assert snap.ok == 1 and snap.exits == (0, 1) and snap.gmacs_sum == 0.5
    assert dict(snap.latency_buckets)[0.025] == 1 and dict(snap.latency_buckets)[0.01] == 0
