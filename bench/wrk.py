"""wrk, the bench's throughput client (issue #16: throughput points come from a client we did not
write). Debian's ``wrk`` 4.x posts pre-built request bodies from a Lua script; one implementation
for every bench that measures images/s (``bench.serving``, ``bench.engine_core``).

Closed loop only: each of ``connections`` keep-alive connections sends its next request when the
previous one is answered, for a whole number of seconds (wrk's ``-d`` takes no fractions). wrk
cannot pace Poisson arrivals; wrk2, which can, is not packaged by Debian (``apt-cache policy wrk2``
finds nothing), so open-loop runs stay on ``bench.loadgen``'s aiohttp client, as does every run
whose answers are scored against labels (wrk does not read the answers).

The script ends with a ``done`` hook that prints one JSON line (wrk's own counts and latency
percentiles, in microseconds), so nothing parses wrk's human-readable report.
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from string import Template

import httpx

from bench.servers import machine_busy_and_steal_seconds

MISSING = "wrk is not installed: apt-get install wrk (scripts/install test installs it)"
MARK = "WRK_JSON "
PERCENTILES = (50, 90, 95, 99)

# $bodies: every request body, concatenated; $lengths: their lengths, one per line, in order.
SCRIPT = Template("""\
local file = io.open("$bodies", "rb")
local all = file:read("*all")
file:close()
local bodies, n, at = {}, 0, 1
for length in io.lines("$lengths") do
  n = n + 1
  bodies[n] = all:sub(at, at + tonumber(length) - 1)
  at = at + tonumber(length)
end
local headers = {["Content-Type"] = "$content_type"}
local i = 0

request = function()
  i = i % n + 1
  return wrk.format("POST", nil, headers, bodies[i])
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '$mark{"requests": %d, "duration_us": %d, "status_errors": %d, "connect": %d, "read": %d, ' ..
    '"write": %d, "timeout": %d, "mean_us": %.1f, "p50_us": %d, "p90_us": %d, "p95_us": %d, "p99_us": %d}\\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout, latency.mean,
    latency:percentile(50), latency:percentile(90), latency:percentile(95), latency:percentile(99)))
end
""")


def write_script(bodies: list[bytes], content_type: str, folder: Path, name: str = "post") -> Path:
    """A Lua script posting ``bodies`` in turn (each connection's next request takes the next body);
    the bodies go to ``<name>.bodies`` beside it, read once when wrk starts."""
    folder.mkdir(parents=True, exist_ok=True)
    data, lengths = folder / f"{name}.bodies", folder / f"{name}.lengths"
    data.write_bytes(b"".join(bodies))
    lengths.write_text("".join(f"{len(b)}\n" for b in bodies))
    script = folder / f"{name}.lua"
    script.write_text(SCRIPT.substitute(bodies=data, lengths=lengths, content_type=content_type, mark=MARK))
    return script


@dataclass(frozen=True)
class WrkRun:
    """One wrk run: wrk's own counts and latencies, and its CPU time."""

    requests: int  # answered with a status below 400
    http_errors: int  # answered with 400 or above
    socket_errors: dict[str, int]  # connect / read / write / timeout, those that happened
    seconds: float  # wrk's measured duration
    latency_ms: dict[str, float]  # p50, p90, p95, p99 and mean of every answered request
    cpu_s: float  # wrk's user + system CPU time

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def whole_seconds(seconds: float) -> int:
    """wrk's duration: whole seconds, at least one."""
    return max(1, round(seconds))


def run(url: str, script: Path, seconds: float, connections: int, threads: int = 1, timeout_s: float = 60.0) -> WrkRun:
    """wrk against ``url`` (path and query included: every request goes there) for ``seconds``
    (rounded to whole seconds); raises with wrk's output if it fails. ``timeout_s`` is wrk's
    per-request timeout: a slower answer counts as a timeout error, not in the latencies."""
    if shutil.which("wrk") is None:
        raise FileNotFoundError(MISSING)
    command = [
        "wrk", f"-t{min(threads, connections)}", f"-c{connections}", f"-d{whole_seconds(seconds)}s",
        f"--timeout={round(timeout_s)}s", "-s", str(script), url,
    ]  # fmt: skip
    before = _children_cpu_s()
    done = subprocess.run(command, capture_output=True, text=True, timeout=whole_seconds(seconds) + timeout_s + 30)
    cpu_s = _children_cpu_s() - before
    line = next((l for l in done.stdout.splitlines() if l.startswith(MARK)), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {' '.join(command)}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return parse(json.loads(line.removeprefix(MARK)), cpu_s)


def parse(counts: dict, cpu_s: float = 0.0) -> WrkRun:
    """The ``done`` hook's JSON line as a :class:`WrkRun` (latencies in ms; NaN with no answer)."""
    answered = counts["requests"]
    latency = {f"p{q}": counts[f"p{q}_us"] / 1000 if answered else float("nan") for q in PERCENTILES}
    latency["mean"] = counts["mean_us"] / 1000 if answered else float("nan")
    return WrkRun(
        requests=answered - counts["status_errors"], http_errors=counts["status_errors"],
        socket_errors={k: counts[k] for k in ("connect", "read", "write", "timeout") if counts[k]},
        seconds=counts["duration_us"] / 1e6, latency_ms=latency, cpu_s=cpu_s,
    )  # fmt: skip


@dataclass(frozen=True)
class Point:
    """One measured wrk run and where the machine's CPU went meanwhile, in busy cores."""

    run: WrkRun
    server_cores: float  # the measured server's process tree
    client_cores: float  # wrk
    other_cores: float  # everything else on the machine (other processes, CPU steal)
    steal_cores: float = 0.0  # of which CPU steal: the VM's host running someone else

    @property
    def server_cpu_ms_per_request(self) -> float | None:
        rate = self.run.requests_per_s
        return 1000 * self.server_cores / rate if rate else None


def measure(server_cpu_seconds: Callable[[], float], url: str, script: Path, seconds: float, connections: int,
            settle_body: bytes, content_type: str, threads: int = 1) -> Point:  # fmt: skip
    """The bench's one throughput point: once the server is settled (``settle`` with
    ``settle_body``), a wrk run of ``seconds`` with the CPU time of the server
    (``server_cpu_seconds``: its process tree), of wrk and of the whole machine around it."""
    settle(url, settle_body, content_type)
    server, (machine, steal), wall = server_cpu_seconds(), machine_busy_and_steal_seconds(), time.monotonic()
    result = run(url, script, seconds, connections, threads)
    wall = time.monotonic() - wall
    server_cores, client_cores = (server_cpu_seconds() - server) / wall, result.cpu_s / wall
    machine_after, steal_after = machine_busy_and_steal_seconds()
    other = max(0.0, (machine_after - machine) / wall - server_cores - client_cores)
    return Point(result, server_cores, client_cores, other, (steal_after - steal) / wall)


def settle(url: str, body: bytes, content_type: str, timeout_s: float = 60.0) -> None:
    """Wait out the requests a finished wrk run left behind. wrk stops by closing its connections
    with requests in flight, and a server that does not notice a gone client (the per-request
    FastAPI peer, LitServe) still works them off, for up to ``connections / throughput`` seconds
    that the next run would lose. One request sent now is answered after them on a server that
    answers in arrival order, so the next measured run starts on an idle server."""
    httpx.post(url, content=body, headers={"Content-Type": content_type}, timeout=timeout_s)


def version() -> str:
    """The version ``wrk -v`` prints, e.g. 'debian/4.1.0-3+b2' ('not installed' without wrk)."""
    if shutil.which("wrk") is None:
        return "not installed"
    out = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout  # exits 1 after printing
    words = out.split()  # "wrk debian/4.1.0-3+b2 [epoll] Copyright ..."
    return words[1] if len(words) > 1 else "unknown"


def _children_cpu_s() -> float:
    """CPU time of this process's waited-for children: around one ``subprocess.run``, wrk's own."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
