"""The CPU image, built for real and run for real.

docker/podman-build-cpu.sh builds the image with the project's Dockerfile from a debootstrap base
(no registry). Two server containers then run as the compose stack's replicas would (read-only
root, no capabilities): one with the image's own default model, one with a checkpoint from the
/models volume. A real Prometheus (Debian's binary) scrapes both; real Fashion-MNIST test images
are classified through them; the exits are read back through Prometheus' HTTP API, and every query
of the Grafana dashboard is run against it. Everything listens on 127.0.0.1 only.

Needs podman, runc, debootstrap and prometheus (scripts/install test puts them in place): without them
these tests fail; they never skip.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "thinkingvit.json"
DEFAULT_MODEL = ROOT / "service" / "default_model" / "fmnist-3-6.safetensors"
IMAGE = "localhost/thinkingvit-serve:test"
TOOLS = ("podman", "runc", "debootstrap", "prometheus")
# What this kind of host needs (docs/deployment.md): runc (crun fails on hybrid cgroups), the
# host's network, and limits that podman does not try to raise.
PODMAN_FLAGS = ["--runtime", "runc", "--network", "host", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
# As docker-compose.yml and deploy/k8s run it.
HARDENING = ["--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL", "--security-opt", "no-new-privileges"]
N_IMAGES = 60  # through POST /classify, plus BATCH_IMAGES through POST /classify/batch
BATCH_IMAGES = 8
READY_DEADLINE_S = 180
SCRAPE_DEADLINE_S = 60
POLL_S = 0.2

pytestmark = pytest.mark.timeout(1500)


@dataclass
class Timings:
    """Seconds per phase, printed at the end of the module."""

    phases: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def add(self, name: str, since: float) -> None:
        self.phases[name] = self.phases.get(name, 0.0) + time.monotonic() - since


@pytest.fixture(scope="module")
def timings(request):
    t = Timings()
    yield t
    total = time.monotonic() - t.started
    parts = ", ".join(f"{k} {v:.1f} s" for k, v in t.phases.items())
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\ntest_container: {total:.1f} s in all ({parts})")


def run(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def poll(condition, deadline_s: float, what: str):
    """``condition()`` until it returns something truthy, or fail after ``deadline_s``."""
    deadline = time.monotonic() + deadline_s
    last = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(POLL_S)
    pytest.fail(f"{what}: not within {deadline_s} s (last: {last!r})")


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def image(timings) -> Iterator[str]:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed: run scripts/install test (the container tests need them)")
    started = time.monotonic()
    build = [str(DOCKER / "podman-build-cpu.sh"), IMAGE]
    try:
        out = subprocess.run(build, capture_output=True, text=True, timeout=1200, check=False)
        timings.add("image build", started)
        assert out.returncode == 0, f"image build failed:\n{out.stdout[-6000:]}\n{out.stderr[-3000:]}"
        yield IMAGE
    finally:
        remove_image(IMAGE)


def remove_image(image: str) -> None:
    """The test image (1.2 GB) is rebuilt by every run, so it is no cache: removed afterwards, with
    the build's intermediate layers, unless THINKINGVIT_KEEP_TEST_IMAGE=1. The debootstrap base
    image (docker/build-base.sh) stays: that one is a deliberate cache (docs/deployment.md)."""
    if os.environ.get("THINKINGVIT_KEEP_TEST_IMAGE") == "1":
        return
    run("podman", "rmi", "--force", image, check=False, timeout=300)


@pytest.fixture(scope="module")
def user_checkpoint(tmp_path_factory) -> Path:
    """A random fmnist-3-6 checkpoint in a folder to mount at /models, readable by the image's user."""
    import torch

    from model.checkpoint import build_metadata, save_checkpoint
    from model.data import FASHION_MNIST_CLASSES
    from model.preprocess import FASHION_MNIST
    from model.thinkingvit import create_model

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = create_model("fmnist-3-6")
    folder = tmp_path_factory.mktemp("models")
    path = folder / "user.safetensors"
    classes = list(FASHION_MNIST_CLASSES)
    metadata = build_metadata(model, "fmnist-3-6", class_names=classes, preprocess=FASHION_MNIST.to_dict())
    save_checkpoint(path, model, metadata)
    folder.chmod(0o755)
    path.chmod(0o644)
    return path


@dataclass
class Container:
    name: str
    url: str
    uses_default_model: bool

    def logs(self) -> str:
        out = run("podman", "logs", "--tail", "40", self.name, check=False)
        return out.stdout + out.stderr

    def running(self) -> bool:
        return run("podman", "inspect", "--format", "{{.State.Running}}", self.name).stdout.strip() == "true"


def start_container(image: str, name: str, checkpoint: Path | None) -> Container:
    """Runs the server on 127.0.0.1:<free port>; with ``checkpoint``, from the /models volume."""
    port = free_port()
    args = ["podman", "run", "-d", "--name", name, *PODMAN_FLAGS, *HARDENING, "--health-interval", "disable",
            "-e", "THINKINGVIT_HOST=127.0.0.1", "-e", f"THINKINGVIT_PORT={port}"]  # fmt: skip
    if checkpoint is not None:
        args += ["-v", f"{checkpoint.parent}:/models:ro", "-e", f"THINKINGVIT_CHECKPOINT=/models/{checkpoint.name}"]
    run("podman", "rm", "-f", name, check=False)
    run(*args, image)
    return Container(name, f"http://127.0.0.1:{port}", uses_default_model=checkpoint is None)


def wait_ready(container: Container) -> None:
    def ready():
        if not container.running():
            pytest.fail(f"{container.name} exited before it was ready:\n{container.logs()}")
        try:
            return httpx.get(container.url + "/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    poll(ready, READY_DEADLINE_S, f"{container.name} ready")


@pytest.fixture(scope="module")
def servers(image, user_checkpoint, timings):
    """Two replicas: the image's default model (or, until it ships, the user checkpoint), and the
    user checkpoint from the /models volume."""
    tag = f"thinkingvit-test-{os.getpid()}"
    default = None if DEFAULT_MODEL.is_file() else user_checkpoint
    started = time.monotonic()
    containers = [start_container(image, f"{tag}-a", default), start_container(image, f"{tag}-b", user_checkpoint)]
    try:
        for c in containers:
            wait_ready(c)
        timings.add("containers ready", started)
        yield containers
    finally:
        for c in containers:
            run("podman", "rm", "-f", "-t", "5", c.name, check=False, timeout=60)


@pytest.fixture(scope="module")
def prometheus(servers, tmp_path_factory, timings):
    """Debian's Prometheus scraping every replica each second; yields its query function."""
    folder = tmp_path_factory.mktemp("prometheus")
    targets = [c.url.removeprefix("http://") for c in servers]
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "thinkingvit", "static_configs": [{"targets": targets}]}],
    }
    (folder / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    command = ["prometheus", f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
               f"--web.listen-address=127.0.0.1:{port}"]  # fmt: skip

    def query(promql: str) -> list[dict]:
        response = httpx.get(url + "/api/v1/query", params={"query": promql}, timeout=5)
        body = response.json()
        assert body["status"] == "success", (promql, body)
        return body["data"]["result"]

    with open(folder / "prometheus.log", "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

        def targets_up():
            if proc.poll() is not None:
                pytest.fail(f"prometheus exited:\n{(folder / 'prometheus.log').read_text()[-3000:]}")
            try:  # 503 until its storage is open
                ready = httpx.get(url + "/-/ready", timeout=2).status_code == 200
            except httpx.TransportError:
                return False
            return ready and len(query('up{job="thinkingvit"} == 1')) == len(targets)

        try:
            poll(targets_up, SCRAPE_DEADLINE_S, "prometheus scraping every replica")
            timings.add("prometheus up", started)
            yield query
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def png(image) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image[0].numpy()).save(buffer, format="PNG")  # (1, 28, 28) -> 28x28 grayscale
    return buffer.getvalue()


@dataclass
class Traffic:
    answers: list[tuple[Container, float | None, int, dict]]  # (replica, threshold, true label, response)
    num_stages: int

    def exits(self) -> dict[str, int]:
        counts = Counter(str(a["exit_stage"]) for _, _, _, a in self.answers)
        return {str(s): counts.get(str(s), 0) for s in range(self.num_stages)}


@pytest.fixture(scope="module")
def traffic(servers, prometheus, timings) -> Traffic:
    """Real Fashion-MNIST test images through both replicas: thresholds 0, 1 and the default."""
    from model.data import load_fashion_mnist

    data = load_fashion_mnist("test")
    thresholds = [0.0, 1.0, None]
    started = time.monotonic()
    model_info = httpx.get(servers[0].url + "/v1/model", timeout=10).json()
    num_stages = len(model_info["stages"])

    def classify(i: int):
        server, threshold = servers[i % len(servers)], thresholds[i % len(thresholds)]
        params = {} if threshold is None else {"threshold": threshold}
        response = httpx.post(server.url + "/classify", params=params, content=png(data.images[i]),
                              headers={"content-type": "image/png"}, timeout=60)  # fmt: skip
        assert response.status_code == 200, response.text
        return server, threshold, int(data.labels[i]), response.json()

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(classify, range(N_IMAGES)))
    batch = range(N_IMAGES, N_IMAGES + BATCH_IMAGES)
    files = [("files", (f"{i}.png", png(data.images[i]), "image/png")) for i in batch]
    response = httpx.post(servers[1].url + "/classify/batch", files=files, timeout=60)
    assert response.status_code == 200, response.text
    for i, item in zip(batch, response.json()["results"], strict=True):
        assert item["error"] is None, item
        answers.append((servers[1], None, int(data.labels[i]), item["result"]))
    timings.add("classify", started)
    return Traffic(answers, num_stages)


# --------------------------------------------------------------------------------------- tests


def test_image_runs_as_non_root(image, servers):
    assert run("podman", "image", "inspect", "--format", "{{.Config.User}}", image).stdout.strip() == "thinkingvit"
    for c in servers:
        status = run("podman", "exec", c.name, "cat", "/proc/1/status").stdout
        uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
        assert uids and "0" not in uids, (c.name, uids)


def test_healthcheck_passes_when_ready(servers):
    for c in servers:
        out = run("podman", "healthcheck", "run", c.name, check=False)
        assert out.returncode == 0, (c.name, out.stdout, out.stderr)
        health = run("podman", "inspect", "--format", "{{.State.Health.Status}}", c.name).stdout.strip()
        assert health == "healthy"


def test_serves_the_default_model_and_a_mounted_checkpoint(servers, user_checkpoint):
    from model.data import FASHION_MNIST_CLASSES

    infos = [httpx.get(c.url + "/v1/model", timeout=10).json() for c in servers]
    for info in infos:
        assert info["class_names"] == FASHION_MNIST_CLASSES and info["device"] == "cpu"
    assert infos[1]["checkpoint"] == user_checkpoint.name  # only in the /models volume
    if DEFAULT_MODEL.is_file():
        assert infos[0]["checkpoint"] == DEFAULT_MODEL.name  # only in the image


def test_classifies_fashion_mnist_through_the_container(traffic):
    from model.data import FASHION_MNIST_CLASSES

    last = traffic.num_stages - 1
    assert len(traffic.answers) == N_IMAGES + BATCH_IMAGES
    for _, threshold, _, answer in traffic.answers:
        assert answer["label"] == FASHION_MNIST_CLASSES[answer["class_index"]]
        if threshold == 0.0:
            assert answer["exit_stage"] == 0
        if threshold == 1.0:
            assert answer["exit_stage"] == last and answer["stages_run"] == traffic.num_stages
    trained = [(label, a) for c, _, label, a in traffic.answers if c.uses_default_model]
    if trained:  # the shipped model is trained; random weights are not
        accuracy = sum(label == a["class_index"] for label, a in trained) / len(trained)
        assert accuracy > 0.7, accuracy


def test_prometheus_scraped_the_exits(traffic, prometheus, timings):
    """Per stage, the exits summed over both replicas equal the stages the answers report."""
    from service.metrics import ServiceMetrics

    exits = ServiceMetrics().exits._name + "_total"  # a counter's samples carry _total
    expected = traffic.exits()
    assert expected[str(traffic.num_stages - 1)] > 0 and expected["0"] > 0
    started = time.monotonic()

    def scraped():
        result = prometheus(f'sum by (stage) ({exits}{{job="thinkingvit"}})')
        got = {r["metric"]["stage"]: int(float(r["value"][1])) for r in result}
        return got if got == expected else None

    poll(scraped, SCRAPE_DEADLINE_S, f"Prometheus showing exits {expected}")
    per_replica = prometheus(f'sum by (instance) ({exits}{{job="thinkingvit"}})')
    assert len(per_replica) == 2 and all(float(r["value"][1]) > 0 for r in per_replica)
    timings.add("scrape", started)


def test_every_dashboard_query_returns_data(traffic, prometheus, timings):
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = {}
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", "1m").replace("$instance", ".*")
            exprs[f"{panel['title']} / {target['refId']}"] = expr
    started = time.monotonic()

    def empty_queries():
        missing = [name for name, expr in exprs.items() if not prometheus(expr)]
        return missing or None

    deadline = time.monotonic() + SCRAPE_DEADLINE_S
    while (missing := empty_queries()) and time.monotonic() < deadline:
        time.sleep(POLL_S)
    assert not missing, {name: exprs[name] for name in missing}
    timings.add("dashboard queries", started)


def test_sigterm_drains_and_exits_cleanly(image, user_checkpoint, timings):
    """`podman stop` sends SIGTERM to PID 1, the server itself: it drains and exits 0."""
    started = time.monotonic()
    container = start_container(image, f"thinkingvit-test-{os.getpid()}-stop", user_checkpoint)
    try:
        wait_ready(container)
        run("podman", "stop", "-t", "60", container.name, timeout=120)
        state = run("podman", "inspect", "--format", "{{.State.ExitCode}} {{.State.Status}}", container.name).stdout
        assert state.split() == ["0", "exited"], (state, container.logs())
    finally:
        run("podman", "rm", "-f", container.name, check=False)
    timings.add("stop test", started)
