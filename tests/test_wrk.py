"""bench.wrk drives the real wrk binary: its Lua script posts the given bodies in turn with the given
Content-Type, and its counts (answered, 4xx) agree with what the server saw.

The server is the standard library's HTTP/1.1 server, recording every request it reads.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bench import wrk

CONTENT_TYPE = "multipart/form-data; boundary=test-boundary"
BODIES = [b"first", b"second body", b"bad"]  # the server answers "bad" with 400

pytestmark = pytest.mark.skipif(shutil.which("wrk") is None, reason=wrk.MISSING)


class Recorder(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.seen: list[tuple[str, str, bytes]] = []  # (path, Content-Type, body), in arrival order
        self.lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as wrk expects
    server: Recorder

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.server.lock:  # recorded before the answer: wrk cannot count what is not here yet
            self.server.seen.append((self.path, self.headers["Content-Type"], body))
        status = 400 if body == b"bad" else 200
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server() -> Iterator[Recorder]:
    recorder = Recorder()
    thread = threading.Thread(target=recorder.serve_forever, daemon=True)
    thread.start()
    yield recorder
    recorder.shutdown()
    recorder.server_close()


def test_wrk_posts_the_bodies_in_turn_and_counts_as_the_server_did(server, tmp_path):
    script = wrk.write_script(BODIES, CONTENT_TYPE, tmp_path)
    url = f"http://127.0.0.1:{server.server_port}/classify?threshold=0.5"
    run = wrk.run(url, script, seconds=1, connections=1)
    with server.lock:
        seen = list(server.seen)
    assert len(seen) >= len(BODIES)
    assert {(path, content_type) for path, content_type, _ in seen} == {("/classify?threshold=0.5", CONTENT_TYPE)}
    start = BODIES.index(seen[0][2])  # wrk may build a request before the first it sends
    assert [body for _, _, body in seen] == [BODIES[(start + i) % len(BODIES)] for i in range(len(seen))]
    # one connection: at most the last request was read by the server and not answered to wrk
    ok = sum(body != b"bad" for _, _, body in seen)
    bad = len(seen) - ok
    assert 0 <= ok - run.requests <= 1 and 0 <= bad - run.http_errors <= 1
    assert run.requests > 0 and run.http_errors > 0 and not run.socket_errors
    assert run.seconds > 0 and run.requests_per_s == run.requests / run.seconds
    assert 0 < run.latency_ms["p50"] <= run.latency_ms["p90"] <= run.latency_ms["p95"] <= run.latency_ms["p99"]
    assert run.cpu_s > 0  # wrk's own CPU time, from getrusage of the finished child


def test_settle_returns_once_its_request_is_answered(server):
    wrk.settle(f"http://127.0.0.1:{server.server_port}/classify", b"first", CONTENT_TYPE)
    with server.lock:
        assert server.seen == [("/classify", CONTENT_TYPE, b"first")]


def test_durations_are_whole_seconds():
    assert [wrk.whole_seconds(s) for s in (0.2, 1, 1.4, 3.0, 6.0)] == [1, 1, 1, 3, 6]
