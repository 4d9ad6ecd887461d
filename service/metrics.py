"""Every Prometheus metric of the service, declared once, in seconds, across processes.

The server runs several processes (API servers, the engine core), so metrics use prometheus-client's
own multiprocess mode: each process writes its samples to files in ``PROMETHEUS_MULTIPROC_DIR``
(the launcher makes one per server and sets it before any child starts) and ``/metrics`` merges
them. Each process declares only the metrics it records: ``ApiMetrics`` in the API servers,
``EngineMetrics`` in the engine core. Gauges say how they merge (``multiprocess_mode``).

Label values are bounded: ``stage`` (0-based stage index), ``outcome`` and ``reason`` from the
fixed tuples below, all pre-initialised so dashboards see zeros instead of gaps.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

NAMESPACE = "thinkingvit"
OUTCOMES = ("ok", "invalid", "rejected", "timeout", "cancelled", "error")
REJECTION_REASONS = (
    "queue_full", "draining", "not_ready",  # capacity: 429, 503
    "body_too_large", "unsupported_media_type", "invalid_body", "invalid_image", "invalid_parameter",
    "unknown_parameter",
    "unauthorized",
)  # fmt: skip
BATCH_FAILURE_CAUSES = ("out_of_memory", "error")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
GMACS_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 20, 50)


class ApiMetrics:
    """Recorded by each API server process: what the clients saw."""

    def __init__(self, registry: CollectorRegistry | None = None):
        r, ns = registry or CollectorRegistry(), NAMESPACE  # a private registry: the files are what counts
        self.requests = Counter(
            "requests", "Classifications (one per image) by outcome.", ["outcome"],
            namespace=ns, registry=r,
        )  # fmt: skip
        self.rejections = Counter(
            "rejections", "Classifications refused before reaching a queue, by reason.", ["reason"],
            namespace=ns, registry=r,
        )  # fmt: skip
        self.request_latency = Histogram(
            "request_latency_seconds", "Time from request arrival to answer, successful classifications.",
            namespace=ns, registry=r, buckets=LATENCY_BUCKETS,
        )  # fmt: skip
        self.ready = Gauge(
            "ready", "1 when every live API server accepts work and the engine core runs.",
            namespace=ns, registry=r, multiprocess_mode="livemin",
        )  # fmt: skip
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        for reason in REJECTION_REASONS:
            self.rejections.labels(reason)

    def record_failure(self, outcome: str, reason: str | None = None) -> None:
        """One classification that got no answer; ``reason`` when refused before any queue."""
        self.requests.labels(outcome).inc()
        if reason is not None:
            self.rejections.labels(reason).inc()

    def record_success(self, latency_s: float) -> None:
        self.requests.labels("ok").inc()
        self.request_latency.observe(latency_s)


class EngineMetrics:
    """Recorded by the engine core: batches, exits, queues and compute."""

    def __init__(self, num_stages: int, registry: CollectorRegistry | None = None):
        r, ns = registry or CollectorRegistry(), NAMESPACE
        self.exits = Counter(
            "exits", "Classifications answered at each stage (0 = first).", ["stage"],
            namespace=ns, registry=r,
        )  # fmt: skip
        self.queue_wait = Histogram(
            "queue_wait_seconds", "Time a request waited in a stage's queue.", ["stage"],
            namespace=ns, registry=r, buckets=LATENCY_BUCKETS,
        )  # fmt: skip
        self.batch_size = Histogram(
            "batch_size", "Requests per executed stage batch.", ["stage"],
            namespace=ns, registry=r, buckets=BATCH_SIZE_BUCKETS,
        )  # fmt: skip
        self.stage_compute = Histogram(
            "stage_compute_seconds", "Wall time of one stage batch on the device.", ["stage"],
            namespace=ns, registry=r, buckets=LATENCY_BUCKETS,
        )  # fmt: skip
        self.queue_depth = Gauge(
            "queue_depth", "Requests waiting in each stage's queue.", ["stage"],
            namespace=ns, registry=r, multiprocess_mode="livesum",
        )  # fmt: skip
        self.gmacs = Counter(
            "gmacs", "Model compute spent on answered requests, in GMACs.", namespace=ns, registry=r,
        )  # fmt: skip
        self.request_gmacs = Histogram(
            "request_gmacs", "Model compute spent per answered request, in GMACs.",
            namespace=ns, registry=r, buckets=GMACS_BUCKETS,
        )  # fmt: skip
        self.batch_failures = Counter(
            "batch_failures", "Stage batches that raised, by cause (out_of_memory batches are retried in halves).",
            ["stage", "cause"], namespace=ns, registry=r,
        )  # fmt: skip
        self.in_flight = Gauge(
            "requests_in_flight", "Classifications admitted to the engine's queues and not answered yet.",
            namespace=ns, registry=r, multiprocess_mode="livesum",
        )  # fmt: skip
        self.carried = Gauge(
            "carried_requests", "Requests holding carried tokens on the device between stages.",
            namespace=ns, registry=r, multiprocess_mode="livesum",
        )  # fmt: skip
        for stage in map(str, range(num_stages)):
            for metric in (self.exits, self.queue_wait, self.batch_size, self.stage_compute):
                metric.labels(stage)
            self.queue_depth.labels(stage).set(0)
            for cause in BATCH_FAILURE_CAUSES:
                self.batch_failures.labels(stage, cause)


class ServiceMetrics:
    """Every metric of both kinds of process in one registry, as ``/metrics`` merges them: for the
    tests and tools that check dashboards, alerts and manifests against the exported names."""

    def __init__(self, num_stages: int = 2):
        self.registry = CollectorRegistry()
        self.api = ApiMetrics(self.registry)
        self.engine = EngineMetrics(num_stages, self.registry)

    def __getattr__(self, name: str):
        return getattr(self.api, name) if hasattr(self.api, name) else getattr(self.engine, name)


def exposition() -> bytes:
    """Every process's samples merged, from ``PROMETHEUS_MULTIPROC_DIR`` (read at each scrape)."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return generate_latest(registry)
