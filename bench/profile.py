"""Where our server's CPU goes under load: py-spy samples of the API server and the engine core
while wrk drives ``POST /classify`` (issue #14's per-component breakdown of the front end).

    python -m bench.profile [--threshold 0] [--seconds 8] [--out bench/results]

One server at its defaults, a 2 s warm-up, then ``py-spy record`` (raw, 250 Hz) on each process
while wrk (64 connections, the bench's multipart Fashion-MNIST PNGs) runs. Each process's busy
samples are sorted into components by the innermost frame of the stack that a rule of
``COMPONENTS`` marks; the shares, the rules and the top functions by own samples go to
``<date>-<machine>-profile.json``. Left out: idle threads and the event loop in its poll. py-spy
does not tell idle stacks apart on these VMs, so a leaf in ``Runner.run`` counts as waiting, and
with it uvloop's own native work below that frame.

py-spy pauses a process for each sample, so absolute times under it are inflated; the shares are
what to read. Needs ``py-spy`` (pip) and permission to trace the server's processes (root, or
ptrace_scope 0).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import wrk
from bench.loadgen import CONTENT_TYPE, multipart
from bench.machine import describe, write_result
from bench.servers import SystemSpec, process_names, python_command, start
from bench.serving import png
from model.data import load_fashion_mnist

PROCESSES = {"api-server-0": "api_server", "engine-core": "engine_core"}  # process name -> report key
# (component, markers): a sample belongs to the component of the innermost frame of its stack that
# contains one of the markers (the first such component, if a frame matches several)
COMPONENTS = {
    "api_server": [
        ("decode and preprocess (Pillow, numpy)", ["decode_image"]),
        ("multipart parsing", ["read_uploads"]),
        ("engine client (ZeroMQ send, answers)", ["EngineClient.", "zmq/"]),
        ("response body (top-k, JSON)", ["to_response", "json_response", "top_entries", "readable", "top_classes"]),
        ("query parameters", ["classify_params"]),
        ("disconnect watch", ["until_disconnect", "_disconnected"]),
        ("metrics", ["prometheus_client", "ApiMetrics."]),
        ("route, other", ["answer (", "classify (", "classify_image (", "check_admission ("]),
        ("writing the response (Starlette, uvicorn)", ["Response.__call__", "RequestResponseCycle.send"]),
        ("HTTP protocol (uvicorn, httptools)", ["HttpToolsProtocol.", "RequestResponseCycle.receive"]),
        ("ASGI middleware and routing (FastAPI, Starlette, ours)", ["run_asgi"]),
        ("event loop, other", [""]),
    ],
    "engine_core": [
        ("model (stage batches)", ["StageRunner.", "PendingStage."]),
        ("taking in requests (ZeroMQ, msgspec, scheduler)", ["_Intake"]),
        ("metrics", ["prometheus_client"]),
        ("sending answers (ZeroMQ)", ["send_multipart"]),
        ("scheduling, exit rule, answers", ["EngineCore.", "Scheduler."]),
        ("loop, other", [""]),
    ],
}
IDLE = ("WorkerThread", "Thread._bootstrap", "epoll", "select (", "poll (")  # waiting, not working


def read_raw(path: Path) -> list[tuple[list[str], int]]:
    """py-spy's raw (collapsed) output: one 'frame;frame;... count' line per distinct stack."""
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack:
            stacks.append((stack.split(";"), int(count)))
    return stacks


def component(frames: list[str], rules: list[tuple[str, list[str]]]) -> str:
    """The component of the innermost frame that one of the rules' markers is in."""
    for frame in reversed(frames):
        for name, markers in rules:
            if any(marker and marker in frame for marker in markers):
                return name
    return rules[-1][0]  # the catch-all


def breakdown(stacks: list[tuple[list[str], int]], rules: list[tuple[str, list[str]]], top: int = 15) -> dict:
    """Busy samples per component (shares) and the functions with the most own samples."""
    components: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    busy = 0
    for frames, count in stacks:
        if any(marker in frame for frame in frames for marker in IDLE) or frames[-1].startswith("Runner.run "):
            continue  # a waiting thread, or the event loop in its poll (native, below Runner.run)
        busy += count
        own[frames[-1]] += count
        components[component(frames, rules)] += count
    return {
        "busy_samples": busy,
        "shares": {name: components[name] / busy for name, _ in rules} if busy else {},
        "top_own": [{"function": f, "share": n / busy} for f, n in own.most_common(top)] if busy else [],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threshold", type=float, default=0.0)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))  # a venv's, unactivated
    if spy is None:
        sys.exit("py-spy is not installed: pip install py-spy")

    work = Path(tempfile.mkdtemp(prefix="thinkingvit-profile-"))
    bodies = [multipart([png(im)], "file") for im in load_fashion_mnist("test").subset(256).images]
    script = wrk.write_script(bodies, CONTENT_TYPE, work)
    server = start(SystemSpec("ours", python_command("-m", "service.cli", "serve", "--log-level", "warning"), "/readyz"), work)
    try:
        url = f"{server.url}/classify?threshold={args.threshold:g}"
        wrk.run(url, script, 2, args.connections)
        wrk.settle(url, bodies[0], CONTENT_TYPE)
        pids = {name: pid for pid, name in process_names(server.process.pid).items()}
        seconds = max(1, round(args.seconds) - 1)  # py-spy stops within wrk's run
        spies = {
            key: subprocess.Popen([spy, "record", "--rate", "250", "--duration", str(seconds), "--format", "raw",
                                   "--output", str(work / f"{key}.txt"), "--pid", str(pids[name])],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
            for name, key in PROCESSES.items()
        }
        run = wrk.run(url, script, args.seconds, args.connections)
        for key, process in spies.items():
            if process.wait() != 0:
                sys.exit(f"py-spy on the {key} failed: {process.stderr.read().decode()[-2000:]}")
    finally:
        server.stop()
    results = describe("cpu") | {
        "threshold": args.threshold, "images_per_s_under_py_spy": run.requests_per_s,
        "rules": {key: [[name, markers] for name, markers in rules] for key, rules in COMPONENTS.items()},
    }  # fmt: skip
    for key, rules in COMPONENTS.items():
        results[key] = breakdown(read_raw(work / f"{key}.txt"), rules)
        print(f"{key} ({results[key]['busy_samples']} busy samples):")
        for name, share in results[key]["shares"].items():
            print(f"  {100 * share:5.1f} %  {name}")
    print("wrote", write_result(results, args.out, "profile"))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
