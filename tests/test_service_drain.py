"""SIGTERM on a real server process: readiness off, no new work, in-flight finishes, exit in time."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
EXIT_LIMIT_S = 60  # a safety net for a hung process, not a timing assertion
# The server holds its first stage batch until the test writes a line to its stdin.
SERVER = """
import sys
from service.app import create_app, run_server
from service.engine import Hooks
from service.settings import Settings

held = []

def hold(stage, request_ids):
    if not held:
        held.append(request_ids)
        print("batch", flush=True)
        sys.stdin.readline()

settings = Settings(checkpoint=sys.argv[1], port=0, drain_grace_s=float(sys.argv[2]),
                    max_batch_size=[1], max_wait_ms=[0.0], log_level="info")
run_server(settings, create_app(settings, Hooks(before_batch=hold)))
"""


class ServerProcess:
    def __init__(self, checkpoint: Path, grace_s: float, script: str = SERVER, *args: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", script, str(checkpoint), str(grace_s), *args],
            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.log: list[str] = []
        port = self.wait_log(r"Uvicorn running on http://127\.0\.0\.1:(\d+)").group(1)
        self.url = f"http://127.0.0.1:{port}"

    def wait_log(self, pattern: str) -> re.Match:
        """Read stderr lines until one matches (fails if the process ends first)."""
        for line in self.proc.stderr:
            self.log.append(line)
            if match := re.search(pattern, line):
                return match
        pytest.fail(f"server exited before logging {pattern!r}:\n{''.join(self.log)}")

    def wait_batch(self) -> None:
        assert self.proc.stdout.readline().strip() == "batch"

    def release_batch(self) -> None:
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()

    def finish(self, limit_s: float = EXIT_LIMIT_S) -> int:
        try:
            return self.proc.wait(limit_s)
        finally:
            self.proc.kill()


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


def refused_or_unreachable(url: str, image: bytes) -> bool:
    try:
        response = httpx.post(f"{url}/classify", files={"file": ("a.png", image)}, timeout=10)
    except httpx.TransportError:  # the listener is already closed
        return True
    return response.status_code == 503


def test_sigterm_drains_in_flight_requests_then_exits(tiny_checkpoint, test_images):
    server = ServerProcess(tiny_checkpoint, grace_s=30)
    in_flight = classify_in_background(server.url, test_images[0])
    server.wait_batch()
    server.proc.send_signal(signal.SIGTERM)
    server.wait_log("draining: readiness is false")
    assert refused_or_unreachable(server.url, test_images[1])
    server.release_batch()
    in_flight["thread"].join()
    assert in_flight["response"].status_code == 200
    assert server.finish() == 0


def test_sigterm_exits_after_the_grace_period_even_if_a_batch_hangs(tiny_checkpoint, test_images):
    server = ServerProcess(tiny_checkpoint, grace_s=0.5)
    in_flight = classify_in_background(server.url, test_images[0])
    server.wait_batch()  # and never released
    server.proc.send_signal(signal.SIGTERM)
    assert server.finish() == 0
    in_flight["thread"].join()
    assert "response" not in in_flight or in_flight["response"].status_code >= 500


# The server under load: every batch takes simulated device time; the first one is held until
# the test has SIGTERMed it with LOAD requests admitted, so all of them are in flight.
LOADED_SERVER = """
import sys, time
from service.app import create_app, run_server
from service.engine import Hooks
from service.settings import Settings

expected, admitted, held = int(sys.argv[3]), [], []

def on_admit(request_id):
    admitted.append(request_id)
    if len(admitted) == expected:
        print("admitted", flush=True)

def slow(stage, request_ids):
    if not held:
        held.append(request_ids)
        sys.stdin.readline()
    time.sleep(0.02 + 0.005 * len(request_ids))  # simulated device time

settings = Settings(checkpoint=sys.argv[1], port=0, drain_grace_s=float(sys.argv[2]), max_batch_size=[4],
                    max_wait_ms=[1.0], log_level="info")
run_server(settings, create_app(settings, Hooks(before_batch=slow, on_admit=on_admit)))
"""
LOAD = 32


def test_sigterm_under_load_answers_every_admitted_request_and_exits_0(tiny_checkpoint, test_images):
    grace_s = 30
    server = ServerProcess(tiny_checkpoint, grace_s, LOADED_SERVER, str(LOAD))
    thresholds = [0.0, 0.5, 0.9, 1.0]
    in_flight = [
        classify_in_background(server.url, test_images[i % len(test_images)], threshold=thresholds[i % 4])
        for i in range(LOAD)
    ]
    assert server.proc.stdout.readline().strip() == "admitted"  # all LOAD requests are queued
    server.proc.send_signal(signal.SIGTERM)
    terminated = time.monotonic()
    server.wait_log(f"draining: readiness is false, {LOAD} requests in flight finish")
    assert refused_or_unreachable(server.url, test_images[0])
    server.release_batch()  # the device runs again
    for outcome in in_flight:
        outcome["thread"].join()
    assert [o["response"].status_code if "response" in o else o["error"] for o in in_flight] == [200] * LOAD
    assert {o["response"].json()["exit_stage"] for o in in_flight} == {0, 1}, "both stages drained"
    assert server.finish(limit_s=grace_s - (time.monotonic() - terminated)) == 0  # within the grace
