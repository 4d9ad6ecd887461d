"""Three replicas behind a real HAProxy, on one machine: drains, host failures and a wedged engine.

Each replica is a real ``thinkingvit serve`` (launcher, engine core, API server) in its own process
group, bound to its own loopback address (127.0.0.2, .3, .4), as if on its own host. In front of
them runs Debian's HAProxy 2.6 with the compose ``scale`` profile's own config
(docker/haproxy/haproxy.cfg), its replicas given as fixed addresses. Load comes from aiohttp clients
on keep-alive connections; every wait is on something observable (HAProxy's admin socket, a
replica's /metrics, the engine probe's events, the answers), with a deadline.

Every scenario records requests sent, failed by cause and retried by HAProxy (its ``show stat``);
the figures are written to ``fleet-figures.json`` (in ``THINKINGVIT_FLEET_FIGURES`` if set, else the
module's tmp dir) and printed, for docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, Server, launch_server, metric_value
from tests.engine_probe import EngineProbe

pytestmark = pytest.mark.fleet

HAPROXY_CFG = REPO / "docker" / "haproxy" / "haproxy.cfg"
HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
REPLICA_SETTINGS = {
    "api_servers": 1,
    "engine_threads": 1,
    "cpu_affinity": False,  # three replicas share two cores: let the kernel place them
    "max_batch_size": [8],
    "max_wait_ms": [2.0],
    "drain_grace_s": 5.0,
    "engine_stall_s": 1.5,
}
WAIT_S = 90  # deadline of every wait: restarts on a busy 2-core machine
POLL_S = 0.1  # how often a wait re-reads HAProxy's or a replica's state
CONCURRENCY = 16
RESTART_RATE = 60.0  # requests/s while replicas restart: steady, about a third of what three serve here
HALF_OPEN = 1500
FIGURES: dict[str, dict] = {}


def wait_until(predicate: Callable[[], object], what: str, timeout: float = WAIT_S):
    """Re-check ``predicate`` until it holds (its value is returned) or the deadline passes."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(POLL_S)  # a polling interval: the condition itself is what is waited on
    return value


# ----------------------------------------------------------------------------- the replicas


class Replica:
    """One replica: a real server on its own loopback address, restartable on the same port."""

    def __init__(self, index: int, host: str, checkpoint: Path, log_dir: Path):
        self.name = f"replica-{index}"  # HAProxy's name for it (haproxy.cfg)
        self.address = (host, 0)
        self.checkpoint, self.log_dir = checkpoint, log_dir
        self.server: Server | None = None
        self.probe: EngineProbe | None = None

    def start(self) -> None:
        self.probe = EngineProbe()
        self.server = launch_server(self.probe, self.log_dir, address=self.address,
                                    checkpoint=self.checkpoint, **REPLICA_SETTINGS)  # fmt: skip
        self.address = (self.address[0], int(self.server.url.rsplit(":", 1)[1]))  # restarts keep the port

    def wait_exit(self) -> int:
        code = self.server.process.wait(WAIT_S)
        self.probe.close()
        return code

    def kill(self) -> None:
        """kill -9 of the whole process group, as when its host dies."""
        os.killpg(self.server.process.pid, signal.SIGKILL)
        self.wait_exit()

    def stop(self) -> None:
        if self.server.process.poll() is None:
            self.probe.release()  # a test that failed while the engine was held
            self.server.stop()
            self.probe.close()

    def answered(self) -> float:
        """Classifications this replica answered 200 since it started (its own /metrics)."""
        text = httpx.get(f"{self.server.url}/metrics", timeout=10).text
        return metric_value(text, "thinkingvit_requests_total", outcome="ok")


# ----------------------------------------------------------------------------- the balancer


class Balancer:
    """HAProxy with docker/haproxy/haproxy.cfg, the replicas as fixed addresses."""

    def __init__(self, replicas: list[Replica], work_dir: Path):
        assert shutil.which("haproxy"), "HAProxy is missing: scripts/install test installs Debian's haproxy"
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        self.url = f"http://127.0.0.1:{port}"
        self.admin_path = work_dir / "haproxy-admin.sock"
        env = {**os.environ, "THINKINGVIT_LB_BIND": f"127.0.0.1:{port}", "THINKINGVIT_LB_ADMIN_SOCKET": str(self.admin_path)}
        for i, replica in enumerate(replicas, 1):
            env[f"THINKINGVIT_LB_REPLICA_{i}"] = "{}:{}".format(*replica.address)
        self.log_path = work_dir / "haproxy.log"
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(["haproxy", "-db", "-f", str(HAPROXY_CFG)], env=env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        wait_until(lambda: self.process.poll() is not None or self.admin_path.exists(), "HAProxy's admin socket")
        assert self.process.poll() is None, self.log_path.read_text()

    def command(self, command: str) -> str:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(self.admin_path))
            sock.sendall(command.encode() + b"\n")
            return b"".join(iter(lambda: sock.recv(65536), b"")).decode()

    def stats(self) -> dict[str, dict[str, str]]:
        """``show stat`` of the frontend and the backend: rows by svname (FRONTEND, BACKEND, replica-N)."""
        text = self.command("show stat").lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {row["svname"]: row for row in rows if row["pxname"] in ("thinkingvit", "replicas")}

    def status(self, name: str) -> str:
        return self.stats()[name]["status"]

    def wait_status(self, name: str, status: str) -> float:
        """Until HAProxy reports ``status`` ("UP", "DOWN") for the replica; returns when it did."""
        wait_until(lambda: self.status(name) == status, f"HAProxy to see {name} {status}")
        return time.monotonic()

    def counters(self) -> dict[str, int]:
        """HAProxy's cumulative counters of the backend: retries (``wretr``: connection attempts
        retried), redispatches (``wredis``: requests sent again to another replica), connection
        errors (``econ``), response errors (``eresp``: reset or closed before an answer) and the
        5xx answers replicas gave it (503 draining ones are retried, 504 passed on)."""
        stats = self.stats()
        backend, replicas = stats["BACKEND"], [row for name, row in stats.items() if name.startswith("replica-")]
        return {"retried": _count(backend["wretr"]), "redispatched": _count(backend["wredis"]),
                "connect_errors": _count(backend["econ"]), "response_errors": _count(backend["eresp"]),
                "replica_5xx": sum(_count(row["hrsp_5xx"]) for row in replicas)}  # fmt: skip

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(WAIT_S)


def _count(field: str) -> int:
    """A counter of ``show stat`` (empty where HAProxy keeps none for that row)."""
    return int(field or 0)


@dataclass
class Fleet:
    replicas: list[Replica]
    balancer: Balancer

    def wait_all_up(self) -> None:
        for replica in self.replicas:
            self.balancer.wait_status(replica.name, "UP")


@pytest.fixture(scope="module")
def fleet(tiny_checkpoint, tmp_path_factory) -> Iterator[Fleet]:
    work_dir = tmp_path_factory.mktemp("fleet")
    replicas = [Replica(i, host, tiny_checkpoint, work_dir) for i, host in enumerate(HOSTS, 1)]
    with ThreadPoolExecutor(len(replicas)) as pool:
        list(pool.map(Replica.start, replicas))
    balancer = Balancer(replicas, work_dir)
    fleet = Fleet(replicas, balancer)
    try:
        fleet.wait_all_up()
        yield fleet
    finally:
        balancer.stop()
        for replica in replicas:
            replica.stop()
        path = Path(os.environ.get("THINKINGVIT_FLEET_FIGURES", work_dir)) / "fleet-figures.json"
        path.write_text(json.dumps(FIGURES, indent=2) + "\n")
        print(f"\nfleet figures ({path}):\n{json.dumps(FIGURES, indent=2)}")


@pytest.fixture
def all_up(fleet) -> Iterator[Fleet]:
    """Every scenario starts, and must end, with the three replicas UP."""
    fleet.wait_all_up()
    yield fleet
    fleet.wait_all_up()


# ----------------------------------------------------------------------------- the load


@dataclass
class Outcome:
    started: float  # time.monotonic()
    ended: float
    status: int | None  # None: no HTTP answer (``error`` says why)
    error: str | None
    replica: str | None  # HAProxy's X-Thinkingvit-Replica: which replica answered

    @property
    def cause(self) -> str:
        return str(self.status) if self.status is not None else self.error


class Load:
    """Load through the balancer from a thread of its own: ``concurrency`` clients sharing a
    keep-alive connection pool, each sending its next image once answered (closed loop), or at
    most ``rate`` requests/s in all, until ``stop()`` or ``total`` requests. A rate leaves the
    two cores room to restart replicas under load."""

    def __init__(self, url: str, images: list[bytes], concurrency: int = CONCURRENCY,
                 params: dict | None = None, total: int | None = None, rate: float | None = None):  # fmt: skip
        self.url, self.images, self.concurrency = f"{url}/classify", images, concurrency
        self.params, self.total = params or {}, total
        self.interval = 0.0 if rate is None else concurrency / rate  # per client
        self.outcomes: list[Outcome] = []
        self._in_flight: dict[int, float] = {}  # sequence number -> time.monotonic() it was sent
        self._sent = 0
        self._stopping = threading.Event()
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> list[Outcome]:
        self._stopping.set()
        self._thread.join(WAIT_S)
        assert not self._thread.is_alive(), "the load never finished: a request hung"
        return self.outcomes

    def run(self) -> list[Outcome]:
        """With ``total``: send them all, return every outcome."""
        self._thread.start()
        self._thread.join()
        return self.outcomes

    def oldest_in_flight(self) -> float:
        """When the oldest request still unanswered was sent (infinity: none is)."""
        return min(self._in_flight.values(), default=float("inf"))

    def wait_for(self, predicate: Callable[[list[Outcome]], bool], what: str) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: predicate(self.outcomes), WAIT_S), f"timed out waiting for {what}"

    async def _run(self) -> None:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=self.concurrency)  # keep-alive on
        timeout = aiohttp.ClientTimeout(total=WAIT_S)  # a hung request shows as an error, not a hang
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            await asyncio.gather(*(self._client(session) for _ in range(self.concurrency)))

    async def _client(self, session) -> None:
        import aiohttp

        next_at = time.monotonic()
        while not self._stopping.is_set() and (self.total is None or self._sent < self.total):
            if self.interval:  # the load's profile: this client's next slot
                next_at += self.interval
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            number, self._sent = self._sent, self._sent + 1
            form = aiohttp.FormData()
            form.add_field("file", self.images[number % len(self.images)], filename="a.png", content_type="image/png")
            started, status, error, replica = time.monotonic(), None, None, None
            with self._changed:
                self._in_flight[number] = started
            try:
                async with session.post(self.url, params=self.params, data=form) as response:
                    await response.read()
                    status, replica = response.status, response.headers.get("X-Thinkingvit-Replica")
            except (aiohttp.ClientError, TimeoutError) as e:
                error = type(e).__name__
            with self._changed:
                del self._in_flight[number]
                self.outcomes.append(Outcome(started, time.monotonic(), status, error, replica))
                self._changed.notify_all()


def served_by(outcomes: list[Outcome], name: str) -> int:
    return sum(o.replica == name for o in outcomes)


def record(scenario: str, outcomes: list[Outcome], before: dict[str, int], balancer: Balancer, **extra) -> dict:
    """The scenario's figures: sent, failed by cause (a status or a client error), and what HAProxy
    counted meanwhile (``Balancer.counters``)."""
    after = balancer.counters()
    figures = {
        "sent": len(outcomes),
        "ok": sum(o.status == 200 for o in outcomes),
        "failed": dict(Counter(o.cause for o in outcomes if o.status != 200)),
        "haproxy": {name: after[name] - before[name] for name in after},
        "served_by": dict(sorted(Counter(o.replica or "none" for o in outcomes).items())),
        **extra,
    }
    FIGURES[scenario] = figures
    return figures


# ----------------------------------------------------------------------------- the config


def test_the_config_is_valid_for_compose_and_for_fixed_addresses():
    """HAProxy itself checks docker/haproxy/haproxy.cfg both ways: as the compose profile runs it
    (Docker's DNS) and with fixed replica addresses (this module)."""
    fixed = {f"THINKINGVIT_LB_REPLICA_{i}": f"{host}:8000" for i, host in enumerate(HOSTS, 1)}
    for extra in ({}, fixed):
        env = {k: v for k, v in os.environ.items() if not k.startswith("THINKINGVIT_LB_")} | extra
        done = subprocess.run(["haproxy", "-c", "-f", str(HAPROXY_CFG)], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr


def haproxy_seconds(directive: str) -> float:
    """A ``timeout <directive> <N>s`` of the config, in seconds."""
    import re

    (value,) = re.findall(rf"^\s*timeout {directive} (\d+)s\b", HAPROXY_CFG.read_text(), re.MULTILINE)
    return float(value)


def test_the_balancer_gives_up_on_idle_connections_before_the_replicas_do():
    """The keep-alive rule: a replica closes an idle connection (keep_alive_s) only after HAProxy
    has stopped reusing it; HAProxy waits for an answer longer than a replica's request deadline,
    whose 504 then arrives first."""
    from service.settings import Settings

    fields = Settings.model_fields
    assert haproxy_seconds("http-keep-alive") < fields["keep_alive_s"].default
    assert haproxy_seconds("server") < fields["keep_alive_s"].default
    assert haproxy_seconds("server") > fields["request_timeout_s"].default


# ----------------------------------------------------------------------------- scenarios


def test_load_spreads_over_every_replica(all_up, test_images):
    fleet = all_up
    before, answered = fleet.balancer.counters(), {r.name: r.answered() for r in fleet.replicas}
    with Load(fleet.balancer.url, test_images) as load:
        wait_until(lambda: all(r.answered() - answered[r.name] >= 30 for r in fleet.replicas),
                   "every replica to answer 30 requests")  # fmt: skip
    outcomes = load.outcomes
    figures = record("spread", outcomes, before, fleet.balancer)
    assert figures["failed"] == {}, figures
    assert all(served_by(outcomes, r.name) >= 30 for r in fleet.replicas), figures


def test_keep_alive_connections_are_reused_and_never_reset(all_up, test_images):
    """1,000 requests at concurrency 64 on keep-alive connections: every one answered 200, none
    reset, over no more connections than clients."""
    fleet = all_up
    before = fleet.balancer.counters()
    connections = int(fleet.balancer.stats()["FRONTEND"]["conn_tot"])
    outcomes = Load(fleet.balancer.url, test_images, concurrency=64, total=1000).run()
    opened = int(fleet.balancer.stats()["FRONTEND"]["conn_tot"]) - connections
    figures = record("keep_alive", outcomes, before, fleet.balancer, client_connections=opened)
    assert figures["sent"] == 1000 and figures["failed"] == {}, figures
    assert opened <= 64, f"{opened} connections for 1000 requests: keep-alive connections were not reused"


def raise_open_files_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        assert hard == resource.RLIM_INFINITY or hard >= needed, f"the open-files hard limit {hard} < {needed}"
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def test_half_open_connections_do_not_lock_out_normal_clients(all_up, test_images):
    """1,500 clients send half a request header and then nothing. HAProxy holds them (they never
    reach a replica) while normal clients are answered, and closes each with a 408 once
    ``timeout http-request`` has passed."""
    fleet = all_up
    raise_open_files_limit(HALF_OPEN + 1024)
    port = int(fleet.balancer.url.rsplit(":", 1)[1])
    before = fleet.balancer.counters()
    slow: list[socket.socket] = []
    try:
        for _ in range(HALF_OPEN):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"POST /classify HTTP/1.1\r\nHost: fleet\r\nContent-Ty")
            slow.append(sock)
        wait_until(lambda: int(fleet.balancer.stats()["FRONTEND"]["scur"]) >= HALF_OPEN, "HAProxy to hold them all")
        outcomes = Load(fleet.balancer.url, test_images, concurrency=8, total=200).run()
        held = int(fleet.balancer.stats()["FRONTEND"]["scur"])
        closed = Counter()
        for sock in slow:
            sock.settimeout(WAIT_S)
            answer = sock.recv(64)
            closed["408" if answer.startswith(b"HTTP/1.1 408") else "closed" if not answer else "other"] += 1
    finally:
        for sock in slow:
            sock.close()
    figures = record("half_open", outcomes, before, fleet.balancer, half_open=HALF_OPEN,
                     held_while_serving=held, half_open_closed=dict(closed))  # fmt: skip
    assert figures["failed"] == {} and figures["sent"] == 200, figures
    assert held >= HALF_OPEN, figures
    assert closed["other"] == 0, figures


def test_rolling_drain_loses_no_request(all_up, test_images):
    """SIGTERM one replica under load, wait for HAProxy to take it out and for it to exit 0,
    start it again, wait until HAProxy has it UP and it answers, then the next: every request 200."""
    fleet = all_up
    before = fleet.balancer.counters()
    exits = []
    with Load(fleet.balancer.url, test_images, rate=RESTART_RATE) as load:
        for replica in fleet.replicas:
            replica.server.process.send_signal(signal.SIGTERM)
            fleet.balancer.wait_status(replica.name, "DOWN")
            exits.append(replica.wait_exit())
            replica.start()
            fleet.balancer.wait_status(replica.name, "UP")
            wait_until(lambda: replica.answered() >= 5, f"the restarted {replica.name} to answer")
    figures = record("rolling_drain", load.outcomes, before, fleet.balancer, exit_codes=exits)
    assert exits == [0, 0, 0]
    assert figures["failed"] == {}, figures


def test_kill_9_fails_at_most_the_requests_in_flight_and_everything_after_fails_over(all_up, test_images):
    fleet = all_up
    victim = fleet.replicas[1]
    before = fleet.balancer.counters()
    with Load(fleet.balancer.url, test_images, rate=RESTART_RATE) as load:
        load.wait_for(lambda outcomes: served_by(outcomes, victim.name) >= 10, f"{victim.name} to answer")
        killed_at = time.monotonic()
        victim.kill()
        down_at = fleet.balancer.wait_status(victim.name, "DOWN")
        load.wait_for(lambda outcomes: sum(o.started > down_at for o in outcomes) >= 50, "50 answers after DOWN")
        victim.start()
        fleet.balancer.wait_status(victim.name, "UP")
        wait_until(lambda: victim.answered() >= 5, f"the restarted {victim.name} to answer")
    outcomes = load.outcomes
    in_flight = [o for o in outcomes if o.started < killed_at < o.ended]
    failed = [o for o in outcomes if o.status != 200]
    figures = record("kill_9", outcomes, before, fleet.balancer, in_flight_at_kill=len(in_flight))
    assert all(o.started < killed_at < o.ended for o in failed), "only requests in flight at the kill may fail"
    assert all(o.status == 200 for o in outcomes if o.started > killed_at), figures
    assert served_by([o for o in outcomes if o.started > down_at], victim.name) > 0, "it rejoined"


def test_a_wedged_replica_is_taken_out_and_its_queued_requests_get_504(all_up, test_images):
    """One replica's engine blocks inside a batch. Its readiness fails after engine_stall_s, HAProxy
    takes it out, the requests already queued there get 504 at their deadline (timeout_ms), none
    hangs, and every request sent after HAProxy marked it DOWN is answered 200 by the others."""
    fleet = all_up
    wedged = fleet.replicas[2]
    before = fleet.balancer.counters()
    with Load(fleet.balancer.url, test_images, params={"timeout_ms": 3000}) as load:
        load.wait_for(lambda outcomes: served_by(outcomes, wedged.name) >= 10, f"{wedged.name} to answer")
        wedged.probe.hold_next_batch()
        wedged.probe.wait_held()
        down_at = fleet.balancer.wait_status(wedged.name, "DOWN")
        load.wait_for(lambda outcomes: sum(o.started > down_at for o in outcomes) >= 50, "50 answers after DOWN")
        load.wait_for(lambda outcomes: load.oldest_in_flight() > down_at, "every request sent before DOWN to end")
        released_at = time.monotonic()
        wedged.probe.release()
        fleet.balancer.wait_status(wedged.name, "UP")
    outcomes = load.outcomes
    figures = record("wedged_engine", outcomes, before, fleet.balancer)
    assert set(figures["failed"]) <= {"504"}, figures
    timed_out = [o for o in outcomes if o.status == 504]
    assert timed_out and all(o.replica == wedged.name for o in timed_out), figures
    after_down = [o for o in outcomes if down_at < o.started and o.ended < released_at]
    assert after_down and all(o.status == 200 and o.replica != wedged.name for o in after_down), figures
