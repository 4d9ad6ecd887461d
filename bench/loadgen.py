"""The load generator: one asyncio process, the same for every system.

The bench's checking client: every answer is parsed as JSON and scored against its image's label
(accuracy, exit stages, GMACs, the SLO's threshold and ``degraded``), which a generic load tool
such as wrk cannot do. The transport is aiohttp (a kept library, issue #16), one ``ClientSession``
per run on keep-alive connections; the multipart/form-data bodies are built once per image before
the run and posted as bytes, so the client's CPU goes to HTTP, not to encoding.
Closed loop: ``concurrency`` users sending their next request when the previous one is answered, on
a pool of as many connections. Open loop: Poisson arrivals at a rate that may change over time,
on a pool with room for every request in flight; latency counted from the scheduled arrival (no
coordinated omission). The client's own CPU time is measured with ``getrusage``, the server's by
the caller.

The client shares the machine with the server it measures, so it is kept light and still: its
loop is uvloop's (the one uvicorn runs on; 0.50-0.53 against 0.53-0.57 ms of client CPU per
request in four alternating pairs of open loops at 570/s, every pair lower), and no garbage
collection runs during a run (``collector_paused``).
"""
from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import json
import math
import random
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace

import aiohttp
import uvloop
import yarl

BOUNDARY = "thinkingvit-bench-boundary"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"
HEADERS = {"Content-Type": CONTENT_TYPE}
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
    server_s: float | None = None  # the server's own total_ms for a single image (ours only)


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
            started = [s for s in ok if t0 <= s.start <= t1]  # sent and answered inside the window
            # single-image requests by the stage they left at: whether a tail is the images that go on
            by_stage = {k: sorted(s.end - s.start for s in started if s.exit_stages == [k]) for k in range(num_stages)}
            server = sorted(s.server_s for s in started if s.server_s is not None)
            if server:  # from the handler's start to its answer: what the client's own delays are not in
                out["server_latency_ms"] = {f"p{q}": 1000 * percentile(server, q) for q in (50, 99)}
            out["latency_ms_by_exit_stage"] = {
                str(k): {"requests": len(v), "p50": 1000 * percentile(v, 50), "p99": 1000 * percentile(v, 99)}
                for k, v in by_stage.items() if v
            }
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


class LoadGenerator:
    """Runs a workload against one server. ``meters`` are CPU-seconds counters (e.g. the server's
    process tree, the whole machine) read at the window's ends, next to this process's own."""

    def __init__(
        self, base_url: str, meters: dict[str, Callable[[], float]] | None = None,
        timeout_s: float = 60.0, drain_s: float = 10.0,
    ):  # fmt: skip
        self.base_url = base_url.rstrip("/")
        self.meters = {"client": _cpu_now, **(meters or {})}
        self.timeout_s, self.drain_s = timeout_s, drain_s  # drain_s: wait for in-flight after the window

    def _session(self, connections: int) -> aiohttp.ClientSession:
        """One session per run, its pool at most ``connections`` keep-alive connections. The
        timeout is ours (``asyncio.timeout`` around request and body), so aiohttp keeps none. A
        trace marks a request sent on a reused connection, the only kind ``_send`` retries."""
        trace = aiohttp.TraceConfig()
        trace.on_connection_reuseconn.append(_mark_reused)
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=connections), timeout=aiohttp.ClientTimeout(total=None),
            trace_configs=[trace], skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )  # fmt: skip

    def _url(self, work: Workload) -> yarl.URL:
        return yarl.URL(f"{self.base_url}{work.path}{work.query}", encoded=True)  # parsed once per run

    async def _send(self, session: aiohttp.ClientSession, url: yarl.URL, body: bytes, labels: list[int],
                    start: float) -> Sample:  # fmt: skip
        """One request and its checked answer. A POST is not idempotent, so aiohttp does not retry
        it; a reused connection the server closed meanwhile (its keep-alive timeout, HTTP/1.1's
        keep-alive race) fails without reaching the server, and is retried once here."""
        for retry in (True, False):
            sent_on = SimpleNamespace(reused=False)
            try:
                async with asyncio.timeout(self.timeout_s):
                    async with session.post(url, data=body, headers=HEADERS, trace_request_ctx=sent_on) as response:
                        status, payload = response.status, await response.read()
                correct, stages, gmacs, error, answers = parse(status, payload, labels)
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError, KeyError) as e:
                correct, stages, gmacs, error, answers = 0, [], 0.0, type(e).__name__, []
                stale = isinstance(e, (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError))
                if retry and sent_on.reused and stale:
                    continue
            break
        thresholds = [a["threshold"] for a in answers if "degraded" in a]  # ours, with issue #18's fields
        degraded = sum(bool(a.get("degraded")) for a in answers)
        server_s = answers[0]["timings"]["total_ms"] / 1000 if len(answers) == 1 and "timings" in answers[0] else None
        return Sample(start, time.perf_counter(), len(labels), correct, stages, gmacs, error, thresholds, degraded,
                      server_s)  # fmt: skip

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
        with collector_paused(), asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(self._closed_loop(work, concurrency, warmup_s, measure_s, min_requests))

    async def _closed_loop(self, work, concurrency, warmup_s, measure_s, min_requests) -> RunResult:
        order, url = itertools.count(), self._url(work)
        async with self._session(concurrency) as session:  # one connection per user, opened in the warm-up
            begin = time.perf_counter()
            window = _Window(self.meters, begin + warmup_s, begin + warmup_s + measure_s, min_requests)
            opener = asyncio.create_task(window.open_at_start())
            samples: list[Sample] = []

            async def user() -> None:
                while not window.should_close(time.perf_counter()):
                    i = next(order) % len(work.bodies)
                    sample = await self._send(session, url, work.bodies[i], work.labels[i], time.perf_counter())
                    window.count(sample)
                    samples.append(sample)

            users = {asyncio.create_task(user()) for _ in range(concurrency)}
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
        with collector_paused(), asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(self._open_loop(work, rate, warmup_s, measure_s, min_requests, seed))

    async def _open_loop(self, work, rate, warmup_s, measure_s, min_requests, seed) -> RunResult:
        rng = random.Random(seed)
        in_flight: set[asyncio.Task] = set()
        samples: list[Sample] = []
        dropped, url = 0, self._url(work)
        # The pool never holds back an arrival: it has room for every request allowed in flight.
        async with self._session(MAX_OPEN_LOOP_IN_FLIGHT) as session:

            async def arrive(i: int, arrival: float) -> None:
                sample = await self._send(session, url, work.bodies[i], work.labels[i], arrival)
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
                task = asyncio.create_task(arrive(i % len(work.bodies), arrival))
                task.add_done_callback(in_flight.discard)
                in_flight.add(task)
            await opener
            unfinished = await self._drain(set(in_flight))
        return window.result(samples, unfinished=unfinished, dropped=dropped)


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Run without the cyclic garbage collector, then collect what the run left.

    The client's own pauses count as the server's latency (an open loop's arrivals keep their
    schedule while the client stalls), and the bench process holds torch, the model and the data:
    a full collection walks all of it. Measured in the open loop at 70 % of the peak: the client's
    full collections took 170-320 ms, once per 8 s run, and the run's p99 requests arrived inside
    them (with the heap frozen instead, still 28-51 ms). Reference counting still frees everything
    not in a cycle while the collector is off: 10,566 requests in 20 s left 518 objects in cycles
    and 3.4 MB more peak memory."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
        gc.collect()


async def _mark_reused(_session, context, _params) -> None:
    """aiohttp's trace hook: the request took a pooled keep-alive connection (see ``_send``)."""
    if context.trace_request_ctx is not None:
        context.trace_request_ctx.reused = True


class _Window:
    """The measured interval: it opens after the warm-up and closes at ``t1``, or later if fewer than
    ``min_requests`` were answered inside it by then, but no later than when as many have failed
    (a server that only errors must not keep the client waiting for answers that never come);
    the meters' CPU seconds inside it."""

    def __init__(self, meters: dict[str, Callable[[], float]], t0: float, t1: float, min_requests: int = 0):
        self.meters, self.t0, self.t1, self.min_requests = meters, t0, t1, min_requests
        self.answered, self.failed, self.end = 0, 0, None
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
        if self.end is None and sample.end >= self.t0:
            if sample.error is None:
                self.answered += 1
            else:
                self.failed += 1

    def should_close(self, now: float) -> bool:
        if self.end is None and now >= self.t1 and max(self.answered, self.failed) >= self.min_requests:
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
