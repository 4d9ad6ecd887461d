"""Service fixtures: a tiny random checkpoint, test images, and real servers (every process) on loopback."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from tests.engine_probe import EngineProbe

REPO = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 120  # spawning the engine core, loading, warming up, on a busy machine
STOP_TIMEOUT_S = 60
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
    """A real ``thinkingvit serve`` (launcher, engine core, API servers) in its own process group."""

    url: str
    process: subprocess.Popen
    log_path: Path
    probe: EngineProbe | None = None
    _lines: list[str] = field(default_factory=list)
    _logged: threading.Condition = field(default_factory=threading.Condition)

    def _follow(self) -> None:
        """Copy the server's output to its log file, line by line, and wake ``wait_log``."""
        with self.log_path.open("w") as log:
            for line in self.process.stdout:
                log.write(line)
                log.flush()
                with self._logged:
                    self._lines.append(line)
                    self._logged.notify_all()

    def wait_log(self, pattern: str, count: int = 1) -> list[re.Match]:
        """Until ``count`` lines of the server's output match ``pattern``."""
        def found():
            return [m for line in self._lines if (m := re.search(pattern, line))]

        with self._logged:
            assert self._logged.wait_for(lambda: len(found()) >= count, STOP_TIMEOUT_S), (
                f"the server never logged {pattern!r} {count} times:\n{''.join(self._lines)[-3000:]}"
            )
            return found()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal the launcher and wait for it (SIGKILL after a minute); returns its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode

    def log(self) -> str:
        with self._logged:
            return "".join(self._lines)

    def children(self) -> dict[str, int]:
        """The launcher's children by role ('engine-core', 'api-0', ...), from /proc."""
        return server_children(self.process.pid)


def server_children(launcher_pid: int) -> dict[str, int]:
    roles = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        if ppid == launcher_pid and "spawn_main" in command:
            roles[(entry / "comm").read_text().strip()] = int(entry.name)
    return roles


def settings_env(settings: dict) -> dict[str, str]:
    """Settings as THINKINGVIT_* variables (lists as JSON, as pydantic-settings reads them)."""
    env = {}
    for name, value in settings.items():
        env[f"THINKINGVIT_{name.upper()}"] = json.dumps(value) if isinstance(value, list) else str(value)
    return env


def launch_server(probe: EngineProbe | None = None, log_dir: Path | None = None,
                  address: tuple[str, int] = ("127.0.0.1", 0), **settings) -> Server:  # fmt: skip
    """A real server with these settings on a socket the test binds (``address``; by default any
    free 127.0.0.1 port) and hands over.

    The socket is bound and listening before the server starts, so the port cannot be taken
    meanwhile and clients can connect at once: their connections wait in the backlog until an API
    server accepts, which is only once the engine core has loaded and warmed up every stage. One
    such request returns when the server is up; if the server dies instead, the backlog is reset.
    """
    import httpx

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart on the same address
    sock.bind(address)
    sock.listen(1024)
    url = "http://{}:{}".format(*sock.getsockname())
    settings = {"log_level": "warning", "api_servers": 1, **settings, "fd": sock.fileno()}
    env = {k: v for k, v in os.environ.items() if not k.startswith("THINKINGVIT_")}
    env.update(settings_env(settings | (probe.settings if probe else {})))
    env.update(probe.env if probe else {})
    log_path = Path(tempfile.mkstemp(prefix="thinkingvit-server-", suffix=".log", dir=log_dir)[1])
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve"], cwd=REPO, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, pass_fds=(sock.fileno(),), start_new_session=True,
    )  # fmt: skip
    sock.close()  # the server holds its own copy
    server = Server(url, process, log_path, probe)
    threading.Thread(target=server._follow, daemon=True).start()
    try:
        httpx.get(f"{url}/readyz", timeout=STARTUP_TIMEOUT_S).raise_for_status()
    except Exception:
        server.stop(signal.SIGKILL)
        raise AssertionError(f"the server did not start:\n{server.log()[-4000:]}") from None
    return server


@pytest.fixture
def start_server(tiny_checkpoint, tmp_path) -> Iterator[Callable[..., Server]]:
    """Factory: start_server(probe=EngineProbe(), **settings) -> a running server on 127.0.0.1,
    stopped after the test, which then checks that the server exited cleanly."""
    servers: list[Server] = []

    def start(probe: EngineProbe | None = None, **overrides) -> Server:
        servers.append(launch_server(probe, tmp_path, **{"checkpoint": tiny_checkpoint, **overrides}))
        return servers[-1]

    yield start
    for running in servers:
        if running.probe is not None and running.process.poll() is None:
            running.probe.release()  # a test that failed while the engine was held
            running.probe.resume()
        running.stop()
        if running.probe is not None:
            running.probe.close()


@pytest.fixture(scope="module")
def module_server(tiny_checkpoint, tmp_path_factory) -> Iterator[Server]:
    """One real server with the default settings for a whole module whose tests only read answers
    (and metric deltas): a start per module instead of one per test. It must exit cleanly."""
    server = launch_server(log_dir=tmp_path_factory.mktemp("server"), checkpoint=tiny_checkpoint)
    yield server
    assert server.stop() == 0


@pytest.fixture
def probe() -> EngineProbe:
    return EngineProbe()


def metric_value(text: str, name: str, **labels) -> float:
    """One sample from a Prometheus exposition (0.0 if absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0
