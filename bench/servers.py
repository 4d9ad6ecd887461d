"""Server processes for the benchmark: start on a free 127.0.0.1 port, wait for readiness, measure
their CPU time, stop. Every system runs as its own process group with the same environment."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
READY_DEADLINE_S = 180.0
STOP_DEADLINE_S = 30.0
POLL_INTERVAL_S = 0.05


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class SystemSpec:
    """How to start one system; ``settings`` is what the report records about it."""

    name: str
    command: list[str]  # without the port
    ready_path: str
    settings: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)


@dataclass
class RunningServer:
    spec: SystemSpec
    url: str
    process: subprocess.Popen
    log_path: Path
    launched: float  # perf_counter at launch
    startup_s: float = 0.0  # launch to ready

    def cpu_seconds(self) -> float:
        """CPU time of the server's whole process tree (LitServe runs several processes)."""
        return sum(_proc_cpu_s(pid) for pid in _tree(self.process.pid))

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def terminate(self) -> None:
        """SIGTERM to the server's process group, without waiting (``stop`` waits)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)

    def stop(self) -> None:
        """SIGTERM, wait for the server's main process (SIGKILL after ``STOP_DEADLINE_S``), then
        SIGKILL whatever of its process group outlived it. LitServe's inference worker survives its
        server's SIGTERM: orphaned, it spun on a full core for tens of seconds, outside the next
        system's process tree, so that system's runs counted it as "other processes" (about one of
        the two cores in the 2026-12-03 bench, from LitServe's second tuning configuration on)."""
        if self.process.poll() is None:
            self.terminate()
            try:
                self.process.wait(STOP_DEADLINE_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # the group's stragglers (our server's children
        except ProcessLookupError:  # run in sessions of their own and exit with their launcher)
            pass


def start(spec: SystemSpec, log_dir: Path) -> RunningServer:
    """Start ``spec`` and return once its readiness route answers 200 (or raise, with its log);
    its log goes to ``log_dir`` (the run's temporary folder, see bench.serving.run)."""
    return ready(launch(spec, log_dir))


def launch(spec: SystemSpec, log_dir: Path) -> RunningServer:
    """Start ``spec``'s process and return at once; :func:`ready` waits for it."""
    port = free_port()
    log_path = log_dir / f"{spec.name}.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [*spec.command, "--port", str(port)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            env={**clean_environment(), **spec.env}, start_new_session=True,
        )  # fmt: skip
    return RunningServer(spec, f"http://127.0.0.1:{port}", process, log_path, time.perf_counter())


def ready(server: RunningServer) -> RunningServer:
    """``server`` once its readiness route answers 200, its ``startup_s`` set (from its launch);
    stopped, and the error raised with its log, if it exits or the deadline passes first."""
    try:
        wait_ready(server)
    except BaseException:
        server.stop()
        raise
    server.startup_s = time.perf_counter() - server.launched
    return server


def wait_ready(server: RunningServer) -> None:
    deadline = time.monotonic() + READY_DEADLINE_S
    url = server.url + server.spec.ready_path
    with httpx.Client(timeout=5) as client:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise RuntimeError(f"{server.spec.name} exited with {server.process.returncode}:\n{server.log_tail()}")
            try:
                if client.get(url).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(POLL_INTERVAL_S)  # polling interval against a deadline
    raise TimeoutError(f"{server.spec.name} not ready after {READY_DEADLINE_S} s:\n{server.log_tail()}")


def clean_environment() -> dict[str, str]:
    """This environment without THINKINGVIT_* variables: every server runs its documented defaults
    plus the flags the harness gives (and records)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("THINKINGVIT_")}


def python_command(*args: str) -> list[str]:
    return [sys.executable, *args]


# ------------------------------------------------------------------------------------ /proc


def machine_busy_and_steal_seconds() -> tuple[float, float]:
    """From one read of /proc/stat, since boot and summed over cores: the whole machine's busy CPU
    seconds, CPU steal included (time the VM's host gave to someone else is time no process here
    got), and the steal alone (the share of "other" that is the host)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields)
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq + steal) / tick, steal / tick


def machine_cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine since boot, steal included (a load generator's meter)."""
    return machine_busy_and_steal_seconds()[0]


def machine_steal_seconds() -> float:
    """CPU steal since boot, summed over cores (a load generator's meter)."""
    return machine_busy_and_steal_seconds()[1]


def process_names(root: int) -> dict[int, str]:
    """The process tree under ``root``, itself included: each live process's name (/proc/PID/comm)
    by pid; our server names its children by role (``service.processes.become_child``)."""
    names = {}
    for pid in _tree(root):
        try:
            names[pid] = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:  # gone meanwhile
            pass
    return names


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat:
                children.setdefault(int(stat[1]), []).append(int(entry.name))
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(children.get(pid, []))
    return pids


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, ...), or None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def _proc_cpu_s(pid: int) -> float:
    stat = _stat(pid)
    if stat is None:
        return 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(stat[11]) + int(stat[12])) / ticks  # utime, stime
