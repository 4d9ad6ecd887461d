"""A bounded overload soak in CI: open-loop arrivals at 3x the measured capacity for 20 s.

The server runs as its real processes with a simulated device: every stage batch takes a fixed
time plus a time per image, spent sleeping inside the engine core (the probe's ``delay`` rule), as
a GPU would. That makes the device, not the two CPU cores shared by client and server, the
bottleneck, which is what overload means for this service. Afterwards the probe shows what the
engine still holds. The client is ``bench.soak``; ``python -m bench.soak`` runs the longer manual
soak against a server process.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import httpx

from bench.soak import Soak, SoakConfig, check_agreement, rss_mb, scrape, server_delta
from tests.conftest import launch_server
from tests.engine_probe import EngineProbe

DURATION_S = float(os.environ.get("THINKINGVIT_SOAK_S", "20"))
DEVICE_MS = (100.0, 10.0)  # per stage batch: fixed + per image (a batch of 8: 180 ms)
RSS_SLACK_MB = 150  # allocator caches; a leak of futures or tokens per request would exceed it
IDLE_LIMIT_S = 60


def poll(predicate, what: str, limit_s: float = IDLE_LIMIT_S):
    """Poll with a deadline (the server finishes hung-up requests in the background)."""
    deadline = time.monotonic() + limit_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def server_rss_mb(server) -> float:
    """Resident memory of every server process together."""
    return sum(rss_mb(pid) for pid in [server.process.pid, *server.children().values()])


def test_overload_soak_loses_nothing(tiny_checkpoint, test_images, tmp_path):
    probe = EngineProbe()
    server = launch_server(
        probe, tmp_path, checkpoint=tiny_checkpoint, max_batch_size=[8],
        max_wait_ms=[2.0, 5.0], max_queue_size=32, request_timeout_s=30,
    )  # fmt: skip
    probe.add_rule(action="delay", base_ms=DEVICE_MS[0], per_image_ms=DEVICE_MS[1])
    try:
        url = server.url
        reference = httpx.post(f"{url}/classify", params={"threshold": 0.8},
                               files={"file": ("a.png", test_images[0])}, timeout=60).json()  # fmt: skip
        rss_before = server_rss_mb(server)

        config = SoakConfig(duration_s=DURATION_S, load_factor=3.0, capacity_s=4.0, capacity_clients=24)
        report = asyncio.run(Soak(url, test_images, config).run())
        after = poll(lambda: (v := scrape(url))["requests_in_flight"] == 0 and v["carried_requests"] == 0 and v,
                     "nothing in flight")  # fmt: skip
        delta = server_delta(report.server_before, after)
        figures = report.summary() | {"server_delta": delta, "device_ms": DEVICE_MS}
        print("\nsoak:", json.dumps(figures))
        if path := os.environ.get("THINKINGVIT_SOAK_REPORT"):
            with open(path, "w") as f:
                json.dump(figures | {"rss_mb_before": rss_before, "rss_mb_after": server_rss_mb(server)}, f, indent=2)

        # Every request got exactly one answer, and the server agrees.
        assert report.lost == 0, report.lost_examples
        assert sum(report.statuses.values()) == report.sent
        assert check_agreement(report, delta) == []
        # It really was overload: every kind of end happened.
        for status in ("200", "429", "504", "hung up"):
            assert report.statuses[status] > 0, (status, figures)
        assert delta["cancelled"] > 0

        # Back to baseline: nothing held for any request inside the engine, memory settles.
        probe.wait_idle()
        assert server_rss_mb(server) < rss_before + RSS_SLACK_MB

        # And it still answers, correctly.
        again = httpx.post(f"{url}/classify", params={"threshold": 0.8},
                           files={"file": ("a.png", test_images[0])}, timeout=60).json()  # fmt: skip
        assert (again["class_index"], again["exit_stage"]) == (reference["class_index"], reference["exit_stage"])
        assert again["confidence"] == reference["confidence"]
        assert httpx.get(f"{url}/readyz").status_code == 200
    finally:
        probe.clear_rules()
        assert server.stop() == 0
        probe.close()
