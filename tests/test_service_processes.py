"""The server's processes die: nothing hangs, health says so, and the launcher does what it promises.

- The engine core is killed under load: every open request gets a 503 or a closed connection,
  health fails, and the launcher exits 4 for the orchestrator to restart the server.
- An API server is killed: its open connections close, the others keep serving, and the launcher
  starts a new one on the same socket.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.conftest import REPO
from tests.test_service_limits import post_image

EXIT_ENGINE_DIED = 4


def outcome(url: str, image: bytes) -> int | str:
    try:
        return post_image(url, image).status_code
    except httpx.TransportError as e:
        return type(e).__name__


def health(url: str) -> int | str:
    try:
        return httpx.get(f"{url}/healthz", timeout=10).status_code
    except httpx.TransportError as e:
        return type(e).__name__


def test_engine_killed_under_load_answers_every_request_and_exits_4(start_server, probe, test_images):
    server = start_server(probe, api_servers=2, max_batch_size=[4], max_wait_ms=[1.0])
    probe.pause()
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(outcome, server.url, image) for image in test_images[:16]]
        probe.wait_admitted(16)
        os.kill(server.children()["engine-core"], signal.SIGKILL)
        outcomes = [f.result() for f in futures]  # none hangs: each returns well within its timeout
    assert all(o == 503 or isinstance(o, str) for o in outcomes), outcomes
    assert health(server.url) != 200
    assert server.process.wait(60) == EXIT_ENGINE_DIED


def test_engine_death_is_a_503_with_a_reason(start_server, probe, test_images):
    server = start_server(probe, drain_grace_s=30)
    probe.pause()
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(post_image, server.url, test_images[0])
        probe.wait_admitted(1)
        os.kill(server.children()["engine-core"], signal.SIGKILL)
        response = future.result()
    assert response.status_code == 503 and response.json()["error"]["reason"] == "engine_gone"
    assert "retry-after" in response.headers
    assert server.process.wait(60) == EXIT_ENGINE_DIED


def test_a_killed_api_server_is_replaced_and_the_others_keep_serving(start_server, probe, test_images):
    server = start_server(probe, api_servers=2, log_level="info")
    server.wait_log(r"API server \d+ ready", count=2)
    before = server.children()
    victim = before["api-server-0"]
    os.kill(victim, signal.SIGKILL)
    server.wait_log(rf"API server 0 \(pid {victim}\) died with exit code -9: restarting it")
    server.wait_log(r"API server \d+ ready", count=3)  # the replacement
    with ThreadPoolExecutor(8) as pool:  # every request is answered, whichever process takes it
        assert list(pool.map(lambda image: outcome(server.url, image), test_images[:16])) == [200] * 16
    after = server.children()
    assert after["api-server-1"] == before["api-server-1"]
    assert after["api-server-0"] != victim
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    assert server.stop() == 0


def test_sigterm_while_an_api_server_starts_is_still_a_clean_exit(start_server, probe):
    """A replacement API server that is still importing when SIGTERM comes dies of that signal: it
    had accepted nothing, so the launcher still exits 0 (whichever moment the signal lands in)."""
    server = start_server(probe, api_servers=2, log_level="info")
    server.wait_log(r"API server \d+ ready", count=2)
    victim = server.children()["api-server-0"]
    os.kill(victim, signal.SIGKILL)
    server.wait_log(rf"API server 0 \(pid {victim}\) died with exit code -9: restarting it")
    assert server.stop() == 0


def test_startup_failure_exits_3(tiny_checkpoint, tmp_path):
    """A port that is taken: the launcher says so and exits 3."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        run = subprocess.run(
            [sys.executable, "-m", "service.cli", "serve", "--checkpoint", str(tiny_checkpoint),
             "--port", str(port)], cwd=REPO, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert run.returncode == 3, run.stderr[-2000:]
    assert "cannot listen" in run.stderr


def test_engine_death_reaches_batch_items_as_503(start_server, probe, test_images):
    from tests.test_service_limits import batch_post, item_statuses

    server = start_server(probe)
    probe.pause()
    with ThreadPoolExecutor(1) as pool:
        batch = pool.submit(batch_post, server.url, test_images[:2])
        probe.wait_admitted(2)
        os.kill(server.children()["engine-core"], signal.SIGKILL)
        assert item_statuses(batch.result()) == [503, 503]
    assert server.process.wait(60) == EXIT_ENGINE_DIED


def test_only_the_engine_loads_torch_and_each_process_runs_where_the_plan_puts_it(start_server):
    """The engine core makes the CPU plan (it alone loads torch, so it alone knows whether it has a
    GPU) and the launcher places the API servers by it; the launcher and the API servers never load
    torch (each would take about 2 s and 180 MB more)."""
    from service.processes import available_cpus, plan_cpus

    server = start_server()
    children = server.children()

    def maps_torch(pid: int) -> bool:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()

    assert maps_torch(children["engine-core"])
    assert not maps_torch(server.process.pid) and not maps_torch(children["api-server-0"])
    plan = plan_cpus(1, None, pin=True, gpu=False)  # what start_server asks for, on this machine
    everywhere = set(available_cpus())
    assert os.sched_getaffinity(children["engine-core"]) == (plan.engine_cpus or everywhere)
    assert os.sched_getaffinity(children["api-server-0"]) == (plan.api_cpus or everywhere)
