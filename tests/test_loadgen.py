"""bench.loadgen's client over aiohttp: a POST on a pooled keep-alive connection that the server has
closed is retried once on a new one (HTTP/1.1's keep-alive race; aiohttp retries only idempotent
methods), while one the server drops on a fresh connection is counted as an error, never retried.

The server is a small raw HTTP/1.1 one, so that it can drop a connection at an exact request.
"""

from __future__ import annotations

import asyncio
import gc
import json
import math
import socketserver
import threading
from collections.abc import Iterator

import pytest
import uvloop

from bench.loadgen import LoadGenerator, Workload

ANSWER = json.dumps({"class_index": 3, "exit_stage": 0, "gmacs": 1.0}).encode()


class DroppingServer(socketserver.ThreadingTCPServer):
    """Answers the first ``answer_per_connection`` requests on each connection, then closes the
    connection on the next request without answering, as a server whose keep-alive timeout
    fired just as the request was sent."""

    daemon_threads = allow_reuse_address = True

    def __init__(self, answer_per_connection: int):
        super().__init__(("127.0.0.1", 0), Handler)
        self.answer_per_connection = answer_per_connection
        self.connections = self.dropped = 0
        self.collector_on_while_answering: list[bool] = []  # gc.isenabled() at each answer
        self.lock = threading.Lock()


class Handler(socketserver.StreamRequestHandler):
    server: DroppingServer

    def handle(self) -> None:
        with self.server.lock:
            self.server.connections += 1
        for _ in range(self.server.answer_per_connection):
            if not self.read_request():
                return
            self.server.collector_on_while_answering.append(gc.isenabled())  # the client's process too
            head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(ANSWER)}\r\n\r\n"
            self.wfile.write(head.encode() + ANSWER)
        if self.read_request():
            with self.server.lock:
                self.server.dropped += 1  # the connection closes on return, the request unanswered

    def read_request(self) -> bool:
        length = 0
        while (line := self.rfile.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        if line == b"":
            return False
        self.rfile.read(length)
        return True


@pytest.fixture
def server(request) -> Iterator[DroppingServer]:
    srv = DroppingServer(request.param)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


WORK = Workload.build([b"png-a", b"png-b"], [3, 4])  # the second image's answer is wrong on purpose


@pytest.mark.parametrize("server", [1], indirect=True)
def test_a_stale_keep_alive_connection_is_retried_once(server):
    """Every second request on a connection is dropped: each is retried on a fresh connection."""
    lg = LoadGenerator(f"http://127.0.0.1:{server.server_address[1]}", timeout_s=30)
    result = lg.closed_loop(WORK, concurrency=1, warmup_s=0, measure_s=0, min_requests=6)
    summary = result.summary(num_stages=2)
    assert summary["errors"] == {} and result.unfinished == 0
    assert summary["requests"] >= 6 and len(result.samples) == summary["requests"]
    assert server.dropped >= 5  # the retry path ran, and every retried request was answered
    assert 0 < summary["accuracy"] < 100 and summary["exit_share"] == [1.0, 0.0]
    by_stage = summary["latency_ms_by_exit_stage"]  # every answer left at stage 0
    assert list(by_stage) == ["0"] and by_stage["0"]["requests"] == summary["requests"]
    assert by_stage["0"]["p50"] <= by_stage["0"]["p99"]


@pytest.mark.parametrize("server", [0], indirect=True)
def test_a_fresh_connection_dropped_is_an_error(server):
    """A request the server drops on a new connection is not sent again: one connection each."""
    lg = LoadGenerator(f"http://127.0.0.1:{server.server_address[1]}", timeout_s=30)
    result = lg.closed_loop(WORK, concurrency=1, warmup_s=0, measure_s=0.2)
    assert result.samples and {s.error for s in result.samples} == {"ServerDisconnectedError"}
    assert server.connections == server.dropped == len(result.samples)


@pytest.mark.parametrize("server", [0], indirect=True)
def test_a_server_that_only_fails_ends_the_run_after_as_many_failures(server):
    """Waiting for ``min_requests`` answers from a server that never answers would never end: the
    window closes once as many requests have failed, and the errors are in the summary."""
    lg = LoadGenerator(f"http://127.0.0.1:{server.server_address[1]}", timeout_s=30)
    result = lg.closed_loop(WORK, concurrency=2, warmup_s=0, measure_s=0, min_requests=5)
    summary = result.summary(num_stages=2)
    assert summary["errors"]["ServerDisconnectedError"] >= 5 and summary["requests"] == 0
    assert math.isnan(summary["accuracy"])  # nothing answered, nothing scored


@pytest.mark.parametrize("server", [100], indirect=True)
def test_the_collector_is_off_during_a_run_and_as_before_after_it(server):
    """The bench process holds torch and the model, and a full collection in the client stalls
    every arrival behind it (counted as the server's latency): no collection runs during a run,
    and the caller's setting is back afterwards, whichever it was."""
    lg = LoadGenerator(f"http://127.0.0.1:{server.server_address[1]}", timeout_s=30)
    assert gc.isenabled()
    lg.open_loop(WORK, rate=200.0, warmup_s=0, measure_s=0, min_requests=4)
    assert gc.isenabled()
    gc.disable()
    try:
        lg.closed_loop(WORK, concurrency=2, warmup_s=0, measure_s=0, min_requests=4)
        assert not gc.isenabled()
    finally:
        gc.enable()
    answers = server.collector_on_while_answering
    assert len(answers) >= 8 and not any(answers)


@pytest.mark.parametrize("server", [100], indirect=True)
def test_runs_on_uvloop(server):
    """The client shares the cores with the server it measures: its loop is uvloop's, the lighter
    one (a meter is read inside the run, on its loop)."""
    loops: list[asyncio.AbstractEventLoop] = []

    def meter() -> float:
        loops.append(asyncio.get_running_loop())
        return 0.0

    lg = LoadGenerator(f"http://127.0.0.1:{server.server_address[1]}", meters={"probe": meter}, timeout_s=30)
    lg.open_loop(WORK, rate=200.0, warmup_s=0, measure_s=0, min_requests=2)
    lg.closed_loop(WORK, concurrency=1, warmup_s=0, measure_s=0, min_requests=2)
    assert len(loops) >= 4 and all(isinstance(loop, uvloop.Loop) for loop in loops)
