"""SIGTERM on a real server: every request in flight is answered, later ones are refused, exit 0.

The engine core is paused while the load is admitted, so every request is in flight when the
signal comes; the API servers log when they begin to drain, and only then does the engine run.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from tests.conftest import metric_value

LOAD = 32


def classify_in_background(url: str, image: bytes, **params) -> dict:
    outcome: dict = {}

    def send():
        try:
            outcome["response"] = httpx.post(
                f"{url}/classify", params=params, files={"file": ("a.png", image)}, timeout=60
            )
        except httpx.HTTPError as e:
            outcome["error"] = e

    thread = threading.Thread(target=send)
    thread.start()
    outcome["thread"] = thread
    return outcome


def refused(url: str, image: bytes) -> bool:
    """A request after the signal: 503 draining, or no connection at all."""
    try:
        response = httpx.post(f"{url}/classify", files={"file": ("a.png", image)}, timeout=10)
    except httpx.TransportError:  # the listening socket is closed
        return True
    return response.status_code == 503


def ready_gauge(metrics_dir: Path) -> float:
    """``thinkingvit_ready`` as /metrics would show it, merged from the server's multiprocess files
    (while draining, no new connection reaches an API server to scrape it)."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(metrics_dir))
    return metric_value(generate_latest(registry).decode(), "thinkingvit_ready")


@pytest.mark.parametrize("api_servers", [1, 2])
def test_sigterm_under_load_answers_every_request_in_flight_and_exits_0(start_server, probe, test_images,
                                                                         api_servers, tmp_path,
                                                                         monkeypatch):  # fmt: skip
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the launcher's run folder, with the metrics files
    server = start_server(probe, api_servers=api_servers, log_level="info", drain_grace_s=30,
                          max_batch_size=[4], max_wait_ms=[1.0])  # fmt: skip
    server.wait_log(r"API server \d+ ready", count=api_servers)  # /readyz answered from one of them
    probe.pause()
    thresholds = [0.0, 0.5, 0.9, 1.0]
    in_flight = [
        classify_in_background(server.url, test_images[i % len(test_images)], threshold=thresholds[i % 4])
        for i in range(LOAD)
    ]
    probe.wait_admitted(LOAD)
    (metrics_dir,) = tmp_path.glob("thinkingvit-*/metrics")
    server.process.send_signal(signal.SIGTERM)
    server.wait_log(r"API server \d+ draining", count=api_servers)
    assert ready_gauge(metrics_dir) == 0
    assert refused(server.url, test_images[0])
    probe.resume()  # the engine runs again
    for outcome in in_flight:
        outcome["thread"].join()
    assert [o["response"].status_code if "response" in o else o["error"] for o in in_flight] == [200] * LOAD
    assert {o["response"].json()["exit_stage"] for o in in_flight} == {0, 1}, "both stages drained"
    assert server.process.wait(60) == 0
    assert probe.computed() == set(probe.admitted), "every admitted request was computed"


def test_sigterm_exits_after_the_grace_period_even_if_a_batch_hangs(start_server, probe, test_images):
    server = start_server(probe, drain_grace_s=1, max_batch_size=[1], max_wait_ms=[0.0])
    probe.hold_next_batch()  # the batch blocks inside the engine and never ends by itself
    stuck = classify_in_background(server.url, test_images[0])
    probe.wait_held()
    server.process.send_signal(signal.SIGTERM)
    stuck["thread"].join()
    assert "response" not in stuck or stuck["response"].status_code >= 500
    assert server.process.wait(60) != 0, "a killed engine is not a clean exit"
