"""Overload soak: open-loop arrivals at a multiple of the server's capacity; nothing may be lost.

First a closed-loop phase measures the capacity (answers per second with enough clients to keep
every batch full). Then requests arrive as a Poisson process at ``load_factor`` x that rate for
``duration_s``, whatever the server answers (open loop; ``send_lag`` says how late the client
sent them, if it could not keep up). They mix thresholds; a share of the
clients hang up after a random delay, a share sets a short ``timeout_ms``. Every request must
end in exactly one way the client can see: 200, 429 (queue full), 504 (its deadline), or the
client hung up itself. A request that ends otherwise (no answer within ``client_timeout_s``,
a connection error, any other status) counts as lost.

``tests/test_soak.py`` runs a short soak in CI against an in-process server and also checks
the server's side (counters agree, queues and carried tokens empty, memory back to baseline).
``python -m bench.soak`` runs a longer one against a server process:

    python -m bench.soak --duration 120 --simulate-device-ms 20 2      # a slow "device"
    python -m bench.soak --duration 120 --checkpoint model.safetensors  # real compute only

and prints the figures as JSON (docs/reliability.md quotes them).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import io
import json
import random
import re
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from bench.loadgen import CONTENT_TYPE, multipart, percentile

THRESHOLDS = (0.0, 0.5, 0.8, 0.95, 1.0)
OUTCOMES = ("ok", "invalid", "rejected", "timeout", "cancelled", "error")


@dataclass(frozen=True)
class SoakConfig:
    duration_s: float = 20.0  # of the open-loop phase
    load_factor: float = 3.0  # arrival rate / measured capacity
    capacity_s: float = 4.0  # closed-loop phase that measures the capacity
    capacity_clients: int = 32
    disconnect_share: float = 0.1  # clients that hang up after a random delay
    disconnect_after_s: tuple[float, float] = (0.0, 0.5)
    short_timeout_share: float = 0.15  # clients with a short timeout_ms
    short_timeout_ms: float = 100.0
    client_timeout_s: float = 60.0  # no answer by then: hung, counted as lost
    seed: int = 0


@dataclass
class SoakReport:
    capacity_rps: float = 0.0  # closed-loop answers per second
    offered_rps: float = 0.0  # the open loop's target arrival rate
    achieved_rps: float = 0.0  # arrivals actually sent per second (lower if the client fell behind)
    duration_s: float = 0.0  # of the open-loop phase, until the last answer
    sent: int = 0
    statuses: Counter = field(default_factory=Counter)  # client view: "200", "429", "504", "hung up", ...
    lost: int = 0  # no answer, a transport error or an unexpected status
    lost_examples: list[str] = field(default_factory=list)
    latencies_ok_s: list[float] = field(default_factory=list)  # 200s, from sending to the answer
    send_lag_s: list[float] = field(default_factory=list)  # how late each request left vs its schedule
    server_before: dict = field(default_factory=dict)  # /metrics values as the open loop starts

    def summary(self) -> dict:
        hidden = ("latencies_ok_s", "send_lag_s", "statuses", "server_before")
        out = {k: v for k, v in asdict(self).items() if k not in hidden}
        out["statuses"] = dict(sorted(self.statuses.items()))
        out |= {"p50_ms": percentile_ms(self.latencies_ok_s, 50), "p99_ms": percentile_ms(self.latencies_ok_s, 99)}
        out["send_lag_p99_ms"] = percentile_ms(self.send_lag_s, 99)  # the client keeping up?
        return out


def percentile_ms(seconds: list[float], q: float) -> float | None:
    """The load generator's percentile, in ms; None (JSON null, not NaN) when there is none."""
    return 1000 * percentile(sorted(seconds), q) if seconds else None


class Soak:
    """The client side; ``run()`` returns the report. ``url`` is the server's base URL."""

    def __init__(self, url: str, images: list[bytes], config: SoakConfig = SoakConfig()):
        self.url, self.config = url, config
        self.bodies = [multipart([image], "file") for image in images]
        self.rng = random.Random(config.seed)
        host, port = re.match(r"http://([^:/]+):(\d+)", url).groups()
        self.host, self.port = host, int(port)

    async def run(self) -> SoakReport:
        report = SoakReport()
        # One connection per request: with keep-alive, a request sent on a pooled connection
        # that the server is just closing (idle timeout) fails on the client without ever
        # reaching the server, HTTP/1.1's keep-alive race, which is the client's to retry.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
        timeout = httpx.Timeout(self.config.client_timeout_s)
        async with httpx.AsyncClient(base_url=self.url, limits=limits, timeout=timeout) as client:
            report.capacity_rps = await self.capacity(client)
            report.offered_rps = self.config.load_factor * report.capacity_rps
            report.server_before = await asyncio.to_thread(scrape, self.url)
            await self.open_loop(client, report)
        return report

    async def capacity(self, client: httpx.AsyncClient) -> float:
        """Closed loop: ``capacity_clients`` clients, each sending again once answered."""
        answered, end = 0, time.perf_counter() + self.config.capacity_s

        async def one_client():
            nonlocal answered
            while time.perf_counter() < end:
                response = await self.post(client, self.rng.choice(THRESHOLDS), timeout_ms=None)
                answered += response.status_code == 200

        start = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(self.config.capacity_clients)))
        return answered / (time.perf_counter() - start)

    async def open_loop(self, client: httpx.AsyncClient, report: SoakReport) -> None:
        """Poisson arrivals at the offered rate; each request runs as its own task."""
        cfg, tasks = self.config, []
        start = time.perf_counter()
        arrival, end = start, start + cfg.duration_s
        while arrival < end and time.perf_counter() < end:  # a client that falls behind stops on time
            await asyncio.sleep(max(0.0, arrival - time.perf_counter()))
            tasks.append(asyncio.create_task(self.one_request(client, arrival, report)))
            arrival += self.rng.expovariate(report.offered_rps)
        report.sent = len(tasks)
        report.achieved_rps = len(tasks) / max(1e-9, time.perf_counter() - start)
        await asyncio.gather(*tasks)
        report.duration_s = time.perf_counter() - start

    async def one_request(self, client: httpx.AsyncClient, arrival: float, report: SoakReport) -> None:
        cfg, roll, sent = self.config, self.rng.random(), time.perf_counter()
        report.send_lag_s.append(sent - arrival)
        threshold = self.rng.choice(THRESHOLDS)
        if roll < cfg.disconnect_share:
            await self.hang_up(threshold, self.rng.uniform(*cfg.disconnect_after_s), report)
            return
        timeout_ms = cfg.short_timeout_ms if roll < cfg.disconnect_share + cfg.short_timeout_share else None
        try:
            response = await self.post(client, threshold, timeout_ms)
        except httpx.HTTPError as e:
            self.lose(report, f"{type(e).__name__}: {e}")
            return
        status = response.status_code
        if status == 200:
            report.latencies_ok_s.append(time.perf_counter() - sent)
        expected = {200: None, 429: "queue_full", 504: "timeout"}
        if status not in expected or (expected[status] and response.json()["error"]["reason"] != expected[status]):
            self.lose(report, f"{status}: {response.text[:200]}")
            return
        if status == 504 and timeout_ms is None:
            self.lose(report, "504 without a short timeout_ms")  # the server's own deadline: too slow
            return
        report.statuses[str(status)] += 1

    async def post(self, client: httpx.AsyncClient, threshold: float, timeout_ms: float | None) -> httpx.Response:
        params = {"threshold": threshold} | ({"timeout_ms": timeout_ms} if timeout_ms else {})
        body = self.rng.choice(self.bodies)
        headers = {"content-type": CONTENT_TYPE}
        return await client.post("/classify", params=params, content=body, headers=headers)

    async def hang_up(self, threshold: float, after_s: float, report: SoakReport) -> None:
        """Send a whole request on its own connection, then close it after ``after_s`` unless
        the answer came first (then it counts like any answer)."""
        body = self.rng.choice(self.bodies)
        head = (
            f"POST /classify?threshold={threshold} HTTP/1.1\r\nHost: {self.host}\r\n"
            f"Content-Type: {CONTENT_TYPE}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        )
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port)
        except OSError as e:
            self.lose(report, f"connect: {e}")
            return
        try:
            writer.write(head.encode() + body)
            await writer.drain()
            try:
                status_line = await asyncio.wait_for(reader.readline(), after_s)
            except TimeoutError:
                report.statuses["hung up"] += 1
                return
            status = status_line.split()[1].decode() if status_line else "closed"
            if status in ("200", "429"):
                report.statuses[status] += 1
            else:
                self.lose(report, f"hang-up client got {status_line!r}")
        finally:
            writer.close()

    @staticmethod
    def lose(report: SoakReport, why: str) -> None:
        report.lost += 1
        if len(report.lost_examples) < 10:
            report.lost_examples.append(why)


# ---------------------------------------------------------------------------------- server side


def scrape(url: str) -> dict:
    """Request outcomes, rejections and the in-flight gauges from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=30).text
    values: dict = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "thinkingvit_requests_total":
                values[s.labels["outcome"]] = s.value
            elif s.name == "thinkingvit_rejections_total":
                values[f"rejected:{s.labels['reason']}"] = s.value
            elif s.name in ("thinkingvit_requests_in_flight", "thinkingvit_carried_requests"):
                values[s.name.removeprefix("thinkingvit_")] = s.value
    return values


def server_delta(before: dict, after: dict) -> dict:
    return {k: after.get(k, 0) - before.get(k, 0) for k in after if not k.endswith(("in_flight", "requests"))}


def check_agreement(report: SoakReport, delta: dict) -> list[str]:
    """The server counted each request exactly once, consistently with what the client saw.

    The client cannot tell how the server ended a request it hung up on (answered, refused, or
    cancelled), so those may fall in any outcome; every other client-side answer pins one.
    """
    s, hung_up = report.statuses, report.statuses["hung up"]
    total = sum(delta.get(o, 0) for o in OUTCOMES)
    problems = []
    if total != report.sent:
        problems.append(f"the server counted {total} requests, the client sent {report.sent}")
    for outcome, status in (("ok", "200"), ("rejected", "429"), ("timeout", "504")):
        if not s[status] <= delta.get(outcome, 0) <= s[status] + hung_up:
            problems.append(f"server {outcome}={delta.get(outcome)} vs client {status}={s[status]} (+{hung_up} hung up)")
    if delta.get("cancelled", 0) > hung_up:
        problems.append(f"server cancelled={delta.get('cancelled')} > {hung_up} hung up")
    if delta.get("invalid", 0) or delta.get("error", 0):
        problems.append(f"invalid or error outcomes: {delta}")
    return problems


def rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ---------------------------------------------------------------------------------- manual run

def slow_device_hooks():
    """``engine_hooks`` for the manual soak: every stage batch first sleeps BASE + PER_IMAGE ms
    (``THINKINGVIT_SOAK_DEVICE_MS="base,per_image"``), simulated accelerator time."""
    import time

    from service.engine_core import EngineHooks

    base_ms, per_image_ms = map(float, os.environ["THINKINGVIT_SOAK_DEVICE_MS"].split(","))
    return EngineHooks(before_batch=lambda stage, ids: time.sleep((base_ms + per_image_ms * len(ids)) / 1000))


def test_images(n: int = 32) -> list[bytes]:
    import numpy as np
    from PIL import Image

    rng, images = np.random.default_rng(0), []
    for i in range(n):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(buffer, format="PNG")
        images.append(buffer.getvalue())
    return images


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=120.0)
    p.add_argument("--load-factor", type=float, default=3.0)
    p.add_argument("--checkpoint", help="default: the shipped model")
    p.add_argument("--simulate-device-ms", type=float, nargs=2, default=(0.0, 0.0), metavar=("BASE", "PER_IMAGE"))
    p.add_argument("--max-queue-size", type=int, default=128)
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--rounds", type=int, default=1, help="soaks in a row on the same server (memory growth)")
    args = p.parse_args(argv)
    env = os.environ | {
        "THINKINGVIT_PORT": str(args.port), "THINKINGVIT_MAX_QUEUE_SIZE": str(args.max_queue_size),
        "THINKINGVIT_MAX_BATCH_SIZE": f"[{args.max_batch_size}]", "THINKINGVIT_LOG_LEVEL": "warning",
    } | ({"THINKINGVIT_CHECKPOINT": args.checkpoint} if args.checkpoint else {})  # fmt: skip
    if any(args.simulate_device_ms):
        env |= {"THINKINGVIT_ENGINE_HOOKS": "bench.soak:slow_device_hooks",
                "THINKINGVIT_SOAK_DEVICE_MS": ",".join(map(str, args.simulate_device_ms))}  # fmt: skip
    server = subprocess.Popen([sys.executable, "-m", "service.cli", "serve"], env=env)
    url = f"http://127.0.0.1:{args.port}"
    try:
        wait_ready(url, server)
        rounds, failed = [], False
        for seed in range(args.rounds):  # rounds on the same server: a leak grows with each
            rss_before = rss_mb(server.pid)
            config = SoakConfig(duration_s=args.duration, load_factor=args.load_factor, seed=seed)
            report = asyncio.run(Soak(url, test_images(), config).run())
            after = wait_idle(url)
            delta = server_delta(report.server_before, after)
            figures = report.summary() | {
                "server_delta": delta,
                "disagreements": check_agreement(report, delta),
                "in_flight_after": {k: after.get(k) for k in ("requests_in_flight", "carried_requests")},
                "rss_mb": {"before": rss_before, "after": rss_mb(server.pid)},
                "still_answers": httpx.post(f"{url}/classify", files={"file": ("a.png", test_images(1)[0])}).status_code,
            }
            rounds.append(figures)
            failed |= report.lost > 0 or bool(figures["disagreements"])
        print(json.dumps({"rounds": rounds, "config": asdict(config) | vars(args)}, indent=2))
        return 1 if failed else 0
    finally:
        server.terminate()
        server.wait(60)


def wait_ready(url: str, server: subprocess.Popen, limit_s: float = 120) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)  # polling a starting process
    raise SystemExit("the server never became ready")


def wait_idle(url: str, limit_s: float = 60) -> dict:
    """Poll /metrics until nothing is in flight (hung-up requests may still be finishing)."""
    deadline = time.monotonic() + limit_s
    while True:
        values = scrape(url)
        if values.get("requests_in_flight") == 0 and values.get("carried_requests") == 0:
            return values
        if time.monotonic() > deadline:
            return values
        time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main())
