"""Service fixtures: a tiny random checkpoint, test images, and real uvicorn servers on loopback."""

from __future__ import annotations

import io
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

STARTUP_TIMEOUT_S = 120  # loading, spawning the model process and warming up, on a busy machine
TINY_CLASSES = [f"class-{i}" for i in range(10)]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """tiny-test preset (16 px grayscale, stages (2, 4)) with random weights, seeded."""
    import torch

    from model.checkpoint import build_metadata, save_checkpoint
    from model.preprocess import Preprocess
    from model.thinkingvit import create_model

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = create_model("tiny-test")
    preprocess = Preprocess(
        size=16, resize=16, crop_pct=1.0, interpolation="bilinear", mean=(0.5,), std=(0.5,), channels=1
    )
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    metadata = build_metadata(model, "tiny-test", class_names=TINY_CLASSES, preprocess=preprocess.to_dict())
    save_checkpoint(path, model, metadata)
    return path


def png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def test_images() -> list[bytes]:
    """PNGs of mixed sizes (resized by the server), grayscale and RGB."""
    rng = np.random.default_rng(0)
    shapes = [(16, 16), (20, 24), (16, 16, 3), (32, 32)]
    return [png_bytes(rng.integers(0, 256, shapes[i % 4], dtype=np.uint8)) for i in range(48)]


@dataclass
class Server:
    url: str
    app: object  # the FastAPI app, for its runtime and metrics
    server: object  # the uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


def launch_server(hooks=None, **settings) -> Server:
    """A real uvicorn server with these settings on a 127.0.0.1 ephemeral port, in a thread.

    The listening socket is bound before the server starts, so clients can connect at once;
    their connections wait in the backlog until the model is loaded and warmed up (uvicorn accepts
    only after the lifespan's startup). One such request returns when the server is up, so tests
    start with a ready server whatever their own client timeouts are.
    """
    import httpx
    import uvicorn

    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings(**settings), hooks)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    httpx.get(f"{url}/healthz", timeout=STARTUP_TIMEOUT_S).raise_for_status()
    return Server(url, app, server, thread)


@pytest.fixture
def start_server(tiny_checkpoint) -> Iterator[Callable[..., Server]]:
    """Factory: start_server(hooks=Hooks(...), **settings) -> a running server on 127.0.0.1,
    stopped after the test."""
    servers: list[Server] = []

    def start(hooks=None, **overrides) -> Server:
        servers.append(launch_server(hooks, **{"checkpoint": tiny_checkpoint, **overrides}))
        return servers[-1]

    yield start
    for running in servers:
        running.stop()


class WorkerGate:
    """Engine hooks that record admissions, aborts and batches, and can hold the worker.

    With ``hold=True`` the first stage batch blocks on the worker thread until ``release()``;
    requests sent meanwhile pile up in the queues, which makes queue states deterministic.
    ``fail_first=True`` raises inside the first batch once it is released.
    """

    TIMEOUT_S = 60

    def __init__(self, hold: bool = False, fail_first: bool = False):
        self.hold, self.fail_first = hold, fail_first
        self.held, self._released = threading.Event(), threading.Event()
        self.batches: list[tuple[int, tuple[int, ...]]] = []  # (stage, request ids)
        self.admitted: list[int] = []
        self.aborted: list[int] = []
        self._changed = threading.Condition()

    def hooks(self):
        from service.engine import Hooks

        return Hooks(before_batch=self._before_batch, on_admit=self._on_admit, on_abort=self._on_abort)

    def release(self) -> None:
        self._released.set()

    def wait_held(self) -> None:
        assert self.held.wait(self.TIMEOUT_S), "the worker never started a batch"

    def wait_admitted(self, n: int) -> None:
        self._wait_for(lambda: len(self.admitted) >= n, f"{n} admissions")

    def wait_aborted(self, n: int) -> None:
        self._wait_for(lambda: len(self.aborted) >= n, f"{n} aborts")

    def computed(self) -> set[int]:
        return {r for _, ids in self.batches for r in ids}

    def _wait_for(self, predicate, what: str) -> None:
        with self._changed:
            assert self._changed.wait_for(predicate, self.TIMEOUT_S), f"timed out waiting for {what}"

    def _before_batch(self, stage: int, request_ids) -> None:
        first = not self.batches
        with self._changed:
            self.batches.append((stage, tuple(request_ids)))
        if first and self.hold:
            self.held.set()
            assert self._released.wait(self.TIMEOUT_S), "the test never released the worker"
        if first and self.fail_first:
            raise RuntimeError("injected fault")

    def _on_admit(self, request_id: int) -> None:
        with self._changed:
            self.admitted.append(request_id)
            self._changed.notify_all()

    def _on_abort(self, request_id: int) -> None:
        with self._changed:
            self.aborted.append(request_id)
            self._changed.notify_all()


def metric_value(text: str, name: str, **labels) -> float:
    """One sample from a Prometheus exposition (0.0 if absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0
