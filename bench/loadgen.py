"""The load generator: one asyncio httpx client, the same for every system.

Request bodies are multipart/form-data built once per image before a run (the client does no
encoding while it measures). Every response is parsed and checked against the image's label.
Closed loop: ``concurrency`` clients, each sending its next request when the previous one is
answered. Open loop: Poisson arrivals at a fixed rate, latency counted from the scheduled arrival
(no coordinated omission). The client's own CPU time is measured with ``getrusage``.
"""
from __future__ import annotations

import asyncio
import itertools
import math
import random
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

BOUNDARY = "thinkingvit-bench-boundary"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"
MAX_OPEN_LOOP_IN_FLIGHT = 2048  # arrivals beyond this are counted as dropped, not sent


def multipart(pngs: list[bytes], field_name: str) -> bytes:
    parts = []
    for i, png in enumerate(pngs):
        head = (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{field_name}"; filename="{i}.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        )
        parts.append(head.encode() + png + b"\r\n")
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


@dataclass(frozen=True)
class Workload:
    """Pre-built request bodies; each request carries ``len(labels[i])`` images."""

    path: str  # "/classify" or "/classify/batch"
    query: str  # e.g. "?threshold=0.9"
    bodies: list[bytes]
    labels: list[list[int]]  # per request, the label of each image in it

    @classmethod
    def build(cls, pngs: list[bytes], labels: list[int], batch: int = 1, query: str = "") -> "Workload":
        if batch == 1:
            return cls("/classify", query, [multipart([p], "file") for p in pngs], [[l] for l in labels])
        groups = range(0, len(pngs) - batch + 1, batch)
        bodies = [multipart(pngs[i : i + batch], "files") for i in groups]
        return cls("/classify/batch", query, bodies, [labels[i : i + batch] for i in groups])

    def with_query(self, query: str) -> "Workload":
        return Workload(self.path, query, self.bodies, self.labels)


@dataclass
class Sample:
    start: float  # perf_counter when sent (open loop: when scheduled)
    end: float
    images: int
    correct: int
    exit_stages: list[int]  # ours only; empty for peers
    gmacs: float  # summed over the images (ours only)
    error: str | None = None


@dataclass
class RunResult:
    samples: list[Sample] = field(default_factory=list)
    window: tuple[float, float] = (0.0, 0.0)  # the measured interval (after warm-up)
    client_cpu_s: float = 0.0  # client process CPU time inside the window
    server_cpu_s: float = 0.0  # server process tree CPU time inside the window
    dropped: int = 0  # open loop: arrivals not sent because too many were in flight

    def summary(self, num_stages: int | None = None) -> dict:
        t0, t1 = self.window
        wall = max(t1 - t0, 1e-9)
        done = [s for s in self.samples if t0 <= s.end <= t1]  # answered inside the window: throughput
        ok = [s for s in done if s.error is None]
        timed = sorted(s.end - s.start for s in self.samples if s.error is None and t0 <= s.start <= t1)
        images = sum(s.images for s in ok)
        errors: dict[str, int] = {}
        for s in done:
            if s.error is not None:
                errors[s.error] = errors.get(s.error, 0) + 1
        out = {
            "requests": len(ok),
            "images": images,
            "seconds": round(wall, 3),
            "requests_per_s": len(ok) / wall,
            "images_per_s": images / wall,
            "latency_ms": {f"p{q}": 1000 * percentile(timed, q) for q in (50, 90, 95, 99)}
            | {"mean": 1000 * sum(timed) / len(timed) if timed else math.nan},
            "accuracy": 100 * sum(s.correct for s in ok) / images if images else math.nan,
            "errors": errors,
            "dropped": self.dropped,
            "client_cpu_cores": self.client_cpu_s / wall,
            "server_cpu_cores": self.server_cpu_s / wall,
        }
        stages = [e for s in ok for e in s.exit_stages]
        if stages and num_stages:
            out["exit_share"] = [stages.count(k) / len(stages) for k in range(num_stages)]
            out["gmacs_per_image"] = sum(s.gmacs for s in ok) / len(stages)
        return out


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (NaN when empty)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def parse(response: httpx.Response, labels: list[int]) -> tuple[int, list[int], float, str | None]:
    """(correct, exit stages, gmacs, error) of one response."""
    if response.status_code != 200:
        return 0, [], 0.0, f"http {response.status_code}"
    body = response.json()
    answers = [item.get("result") for item in body["results"]] if "results" in body else [body]
    if len(answers) != len(labels) or any(a is None for a in answers):
        return 0, [], 0.0, "bad response"
    correct = sum(a["class_index"] == label for a, label in zip(answers, labels))
    stages = [a["exit_stage"] for a in answers if "exit_stage" in a]
    return correct, stages, sum(a.get("gmacs", 0.0) for a in answers), None


class LoadGenerator:
    def __init__(
        self, base_url: str, server_cpu: Callable[[], float] = lambda: 0.0,
        max_connections: int = 256, timeout_s: float = 60.0,
    ):  # fmt: skip
        self.base_url, self.server_cpu = base_url, server_cpu
        self.max_connections, self.timeout_s = max_connections, timeout_s

    def client(self) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=self.max_connections, max_keepalive_connections=self.max_connections)
        return httpx.AsyncClient(base_url=self.base_url, limits=limits, timeout=self.timeout_s)

    async def _send(self, client, work: Workload, i: int, start: float) -> Sample:
        labels = work.labels[i]
        try:
            response = await client.post(
                work.path + work.query, content=work.bodies[i], headers={"content-type": CONTENT_TYPE}
            )
            correct, stages, gmacs, error = parse(response, labels)
        except httpx.HTTPError as e:
            correct, stages, gmacs, error = 0, [], 0.0, type(e).__name__
        return Sample(start, time.perf_counter(), len(labels), correct, stages, gmacs, error)

    def closed_loop(
        self, work: Workload, concurrency: int, warmup_s: float, measure_s: float, min_requests: int = 0
    ) -> RunResult:
        return asyncio.run(self._closed_loop(work, concurrency, warmup_s, measure_s, min_requests))

    async def _closed_loop(self, work, concurrency, warmup_s, measure_s, min_requests) -> RunResult:
        order = itertools.count()
        async with self.client() as client:
            begin = time.perf_counter()
            window = _Window(self.server_cpu, begin + warmup_s, begin + warmup_s + measure_s, min_requests)
            opener = asyncio.create_task(window.open_at_start())
            samples: list[Sample] = []

            async def user() -> None:
                while not window.should_close(time.perf_counter()):
                    sample = await self._send(client, work, next(order) % len(work.bodies), time.perf_counter())
                    window.count(sample)
                    samples.append(sample)

            await asyncio.gather(*(user() for _ in range(concurrency)))
            await opener
        return window.result(samples)

    def open_loop(
        self, work: Workload, rate: float, warmup_s: float, measure_s: float, min_requests: int = 0, seed: int = 0
    ) -> RunResult:
        return asyncio.run(self._open_loop(work, rate, warmup_s, measure_s, min_requests, seed))

    async def _open_loop(self, work, rate, warmup_s, measure_s, min_requests, seed) -> RunResult:
        rng = random.Random(seed)
        in_flight: set[asyncio.Task] = set()
        samples: list[Sample] = []
        dropped = 0

        def done(task: asyncio.Task) -> None:
            in_flight.discard(task)
            window.count(task.result())
            samples.append(task.result())

        async with self.client() as client:
            begin = time.perf_counter()
            window = _Window(self.server_cpu, begin + warmup_s, begin + warmup_s + measure_s, min_requests)
            opener = asyncio.create_task(window.open_at_start())
            arrival = begin
            for i in itertools.count():
                arrival += rng.expovariate(rate)
                delay = arrival - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)  # pacing the Poisson arrivals, not synchronisation
                if window.should_close(arrival):
                    break
                if len(in_flight) >= MAX_OPEN_LOOP_IN_FLIGHT:
                    dropped += arrival >= window.t0
                    continue
                task = asyncio.create_task(self._send(client, work, i % len(work.bodies), arrival))
                task.add_done_callback(done)
                in_flight.add(task)
            await opener
            if in_flight:
                await asyncio.wait(in_flight)
        result = window.result(samples)
        result.dropped = dropped
        return result


class _Window:
    """The measured interval: it opens after the warm-up and closes at ``t1``, or later if fewer than
    ``min_requests`` were answered inside it by then; CPU time of client and server inside it."""

    def __init__(self, server_cpu: Callable[[], float], t0: float, t1: float, min_requests: int = 0):
        self.server_cpu, self.t0, self.t1, self.min_requests = server_cpu, t0, t1, min_requests
        self.answered, self.end = 0, None
        self._cpu_start: tuple[float, float] | None = None
        self._cpu_end = (0.0, 0.0)

    async def open_at_start(self) -> None:
        await asyncio.sleep(max(0.0, self.t0 - time.perf_counter()))  # the window's start
        self._open()

    def _open(self) -> None:
        if self._cpu_start is None:
            self._cpu_start = (_cpu_now(), self.server_cpu())

    def count(self, sample: Sample) -> None:
        if self.end is None and sample.end >= self.t0 and sample.error is None:
            self.answered += 1

    def should_close(self, now: float) -> bool:
        if self.end is None and now >= self.t1 and self.answered >= self.min_requests:
            self._open()
            self.end = now
            self._cpu_end = (_cpu_now(), self.server_cpu())
        return self.end is not None

    def result(self, samples: list[Sample]) -> RunResult:
        start = self._cpu_start or self._cpu_end
        return RunResult(samples, (self.t0, self.end or self.t1), self._cpu_end[0] - start[0],
                         self._cpu_end[1] - start[1])  # fmt: skip


def _cpu_now() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
