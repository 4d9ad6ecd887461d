"""The load generator: one asyncio process, the same for every system.

Requests are complete HTTP/1.1 messages (multipart/form-data bodies) built once per image before a
run, written on keep-alive connections by a minimal client on asyncio streams; every response is
parsed as JSON and checked against the image's label. A general client costs too much CPU on a
2-core machine shared with the server: httpx measured 0.6 ms of CPU per request at 4 connections
and 2.4 to 3.4 ms at 64 (its pool scans every connection), this client 0.03 ms (docs/benchmarks.md).
Closed loop: ``concurrency`` users, each on its own connection, sending its next request when the
previous one is answered. Open loop: Poisson arrivals at a fixed rate on a pool of connections,
latency counted from the scheduled arrival (no coordinated omission). The client's own CPU time is
measured with ``getrusage``, the server's by the caller.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

BOUNDARY = "thinkingvit-bench-boundary"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"
MAX_OPEN_LOOP_IN_FLIGHT = 512  # arrivals beyond this are counted as dropped, not sent


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
    def build(cls, pngs: list[bytes], labels: list[int], batch: int = 1, query: str = "") -> Workload:
        if batch == 1:
            return cls("/classify", query, [multipart([p], "file") for p in pngs], [[l] for l in labels])
        groups = range(0, len(pngs) - batch + 1, batch)
        bodies = [multipart(pngs[i : i + batch], "files") for i in groups]
        return cls("/classify/batch", query, bodies, [labels[i : i + batch] for i in groups])

    def with_query(self, query: str) -> Workload:
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
    thresholds: list[float] = field(default_factory=list)  # effective threshold per image (ours only)
    degraded: int = 0  # images the latency SLO answered early (ours only)


@dataclass
class RunResult:
    samples: list[Sample] = field(default_factory=list)
    window: tuple[float, float] = (0.0, 0.0)  # the measured interval (after warm-up)
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds inside the window, by meter
    unfinished: int = 0  # requests still unanswered when the drain after the window ended
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
            "unfinished": self.unfinished,
        } | {f"{name}_cpu_cores": seconds / wall for name, seconds in self.cpu_s.items()}
        if "machine" in self.cpu_s:  # what neither the client nor the server used: other processes
            others = self.cpu_s["machine"] - sum(v for k, v in self.cpu_s.items() if k != "machine")
            out["other_cpu_cores"] = max(0.0, others / wall)
        stages = [e for s in ok for e in s.exit_stages]
        if stages and num_stages:
            out["exit_share"] = [stages.count(k) / len(stages) for k in range(num_stages)]
            out["gmacs_per_image"] = sum(s.gmacs for s in ok) / len(stages)
        thresholds = [t for s in ok for t in s.thresholds]
        if thresholds:
            out["mean_threshold"] = sum(thresholds) / len(thresholds)
            out["degraded"] = sum(s.degraded for s in ok)
        return out


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (NaN when empty)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def parse(status: int, body: bytes, labels: list[int]) -> tuple[int, list[int], float, str | None, list[dict]]:
    """(correct, exit stages, gmacs, error, the answers) of one response."""
    if status != 200:
        return 0, [], 0.0, f"http {status}", []
    data = json.loads(body)
    answers = [item.get("result") for item in data["results"]] if "results" in data else [data]
    if len(answers) != len(labels) or any(a is None for a in answers):
        return 0, [], 0.0, "bad response", []
    correct = sum(a["class_index"] == label for a, label in zip(answers, labels))
    stages = [a["exit_stage"] for a in answers if "exit_stage" in a]
    return correct, stages, sum(a.get("gmacs", 0.0) for a in answers), None, answers


class HttpError(Exception):
    """The connection broke or the response was not HTTP/1.1 as expected."""


class Connection:
    """One keep-alive HTTP/1.1 connection: write a complete request, read one response."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer, self.usable = reader, writer, True

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        return cls(*await asyncio.open_connection(host, port))

    async def request(self, message: bytes) -> tuple[int, bytes]:
        self.writer.write(message)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
        headers = {k.strip().lower(): v.strip().lower() for k, v in headers.items()}
        if headers.get("transfer-encoding") == "chunked":
            body = await self._chunked()
        else:
            body = await self.reader.readexactly(int(headers.get("content-length", 0)))
        self.usable = headers.get("connection") != "close"
        return status, body

    async def _chunked(self) -> bytes:
        chunks = []
        while size := int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16):
            chunks.append(await self.reader.readexactly(size + 2))
        await self.reader.readuntil(b"\r\n")
        return b"".join(c[:-2] for c in chunks)

    def close(self) -> None:
        self.writer.close()


class LoadGenerator:
    """Runs a workload against one server. ``meters`` are CPU-seconds counters (e.g. the server's
    process tree, the whole machine) read at the window's ends, next to this process's own."""

    def __init__(
        self, base_url: str, meters: dict[str, Callable[[], float]] | None = None,
        timeout_s: float = 60.0, drain_s: float = 10.0,
    ):  # fmt: skip
        url = urlsplit(base_url)
        self.host, self.port = url.hostname, url.port
        self.meters = {"client": _cpu_now, **(meters or {})}
        self.timeout_s, self.drain_s = timeout_s, drain_s  # drain_s: wait for in-flight after the window

    def messages(self, work: Workload) -> list[bytes]:
        """Every request of ``work`` as the bytes written on the wire."""
        head = f"POST {work.path}{work.query} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
        return [
            f"{head}Content-Type: {CONTENT_TYPE}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
            for body in work.bodies
        ]

    async def _send(self, conn: Connection | None, message: bytes, labels: list[int], start: float):
        """(sample, the connection to reuse or None). A reused connection the server has closed
        meanwhile (its keep-alive timeout) is replaced once, as HTTP clients do."""
        for retry in (True, False):
            reused = conn is not None
            try:
                conn = conn or await Connection.open(self.host, self.port)
                async with asyncio.timeout(self.timeout_s):
                    status, body = await conn.request(message)
                correct, stages, gmacs, error, answers = parse(status, body, labels)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError,
                    KeyError) as e:  # fmt: skip
                correct, stages, gmacs, error, answers = 0, [], 0.0, type(e).__name__, []
                if conn is not None:
                    conn.close()
                conn = None
                stale = isinstance(e, (asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError))
                if retry and reused and stale:
                    continue
            break
        if conn is not None and not conn.usable:
            conn.close()
            conn = None
        thresholds = [a["threshold"] for a in answers if "degraded" in a]  # ours, with issue #18's fields
        degraded = sum(bool(a.get("degraded")) for a in answers)
        return Sample(start, time.perf_counter(), len(labels), correct, stages, gmacs, error, thresholds, degraded), conn

    async def _drain(self, tasks: set[asyncio.Task]) -> int:
        """Wait up to ``drain_s`` for requests still in flight, cancel the rest; how many were cancelled."""
        if not tasks:
            return 0
        _, pending = await asyncio.wait(tasks, timeout=self.drain_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        return len(pending)

    def closed_loop(
        self, work: Workload, concurrency: int, warmup_s: float, measure_s: float, min_requests: int = 0
    ) -> RunResult:
        return asyncio.run(self._closed_loop(work, concurrency, warmup_s, measure_s, min_requests))

    async def _closed_loop(self, work, concurrency, warmup_s, measure_s, min_requests) -> RunResult:
        order, messages = itertools.count(), self.messages(work)
        conns = [await Connection.open(self.host, self.port) for _ in range(concurrency)]
        begin = time.perf_counter()
        window = _Window(self.meters, begin + warmup_s, begin + warmup_s + measure_s, min_requests)
        opener = asyncio.create_task(window.open_at_start())
        samples: list[Sample] = []

        async def user(conn: Connection | None) -> None:
            try:
                while not window.should_close(time.perf_counter()):
                    i = next(order) % len(messages)
                    sample, conn = await self._send(conn, messages[i], work.labels[i], time.perf_counter())
                    window.count(sample)
                    samples.append(sample)
            finally:
                if conn is not None:
                    conn.close()

        users = {asyncio.create_task(user(c)) for c in conns}
        closed = asyncio.create_task(window.closed.wait())
        running = set(users)
        while not closed.done():  # until the window closes, or a user fails (a bug: re-raised)
            done, running = await asyncio.wait(running | {closed}, return_when=asyncio.FIRST_COMPLETED)
            running.discard(closed)
            for task in done - {closed}:
                task.result()
        unfinished = await self._drain(users)
        await opener
        return window.result(samples, unfinished=unfinished)

    def open_loop(
        self, work: Workload, rate: float | Callable[[float], float], warmup_s: float, measure_s: float,
        min_requests: int = 0, seed: int = 0,
    ) -> RunResult:  # fmt: skip
        """Poisson arrivals at ``rate`` per second, or at ``rate(seconds since the start)`` (a load step)."""
        return asyncio.run(self._open_loop(work, rate, warmup_s, measure_s, min_requests, seed))

    async def _open_loop(self, work, rate, warmup_s, measure_s, min_requests, seed) -> RunResult:
        rng = random.Random(seed)
        in_flight: set[asyncio.Task] = set()
        samples: list[Sample] = []
        dropped = 0
        messages, idle = self.messages(work), []  # idle: open connections not in use

        async def arrive(i: int, arrival: float) -> None:
            sample, conn = await self._send(idle.pop() if idle else None, messages[i], work.labels[i], arrival)
            if conn is not None:
                idle.append(conn)
            window.count(sample)
            samples.append(sample)

        begin = time.perf_counter()
        window = _Window(self.meters, begin + warmup_s, begin + warmup_s + measure_s, min_requests)
        opener = asyncio.create_task(window.open_at_start())
        arrival, rate_at = begin, rate if callable(rate) else (lambda _t: rate)
        for i in itertools.count():
            arrival += rng.expovariate(rate_at(arrival - begin))
            delay = arrival - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)  # pacing the Poisson arrivals, not synchronisation
            if window.should_close(arrival):
                break
            if len(in_flight) >= MAX_OPEN_LOOP_IN_FLIGHT:
                dropped += arrival >= window.t0
                continue
            task = asyncio.create_task(arrive(i % len(messages), arrival))
            task.add_done_callback(in_flight.discard)
            in_flight.add(task)
        await opener
        unfinished = await self._drain(set(in_flight))
        for conn in idle:
            conn.close()
        return window.result(samples, unfinished=unfinished, dropped=dropped)


class _Window:
    """The measured interval: it opens after the warm-up and closes at ``t1``, or later if fewer than
    ``min_requests`` were answered inside it by then; the meters' CPU seconds inside it."""

    def __init__(self, meters: dict[str, Callable[[], float]], t0: float, t1: float, min_requests: int = 0):
        self.meters, self.t0, self.t1, self.min_requests = meters, t0, t1, min_requests
        self.answered, self.end = 0, None
        self.closed = asyncio.Event()
        self._start: dict[str, float] | None = None
        self._used: dict[str, float] = {}

    async def open_at_start(self) -> None:
        await asyncio.sleep(max(0.0, self.t0 - time.perf_counter()))  # the window's start
        self._open()

    def _open(self) -> None:
        if self._start is None:
            self._start = {name: read() for name, read in self.meters.items()}

    def count(self, sample: Sample) -> None:
        if self.end is None and sample.end >= self.t0 and sample.error is None:
            self.answered += 1

    def should_close(self, now: float) -> bool:
        if self.end is None and now >= self.t1 and self.answered >= self.min_requests:
            self._open()
            self.end = now
            self._used = {name: read() - self._start[name] for name, read in self.meters.items()}
            self.closed.set()
        return self.end is not None

    def result(self, samples: list[Sample], unfinished: int = 0, dropped: int = 0) -> RunResult:
        return RunResult(samples, (self.t0, self.end or self.t1), self._used, unfinished, dropped)


def _cpu_now() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
