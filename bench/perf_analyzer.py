"""NVIDIA's perf_analyzer against our Open Inference Protocol route, ``POST /v2/models/{name}/infer``:
a load generator we did not write, reading our ``/v2`` metadata and config as it reads Triton's.

    python -m bench.perf_analyzer [--concurrency 1,8,32,64] [--window-ms 3000] [--thresholds 0,elastic,1]

For each threshold, our server (every setting at its default, ``--default-threshold T``: over HTTP
perf_analyzer cannot send request parameters) serves the shipped model; perf_analyzer sends one
Fashion-MNIST test PNG per request (binary tensor data, ``--input-data``), closed loop at each
concurrency, each point measured over windows of ``--window-ms`` until stable (at most
``--max-trials``). Reported, never asserted: inferences/s, p50 and p99 latency, and the server's own
count of answered images (``exits_total``). Writes ``<out>/<date>-<machine>-perf-analyzer.json``.

perf_analyzer is installed by ``scripts/install test`` (``scripts/install-perf-analyzer`` says how
and why not by pip) as ``perf_analyzer`` next to the Python that runs this.
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

MISSING = "perf_analyzer is not installed: scripts/install test installs it (see scripts/install-perf-analyzer)"


def find_binary() -> str:
    """The ``perf_analyzer`` next to this Python (a virtual environment's), else on PATH."""
    found = shutil.which("perf_analyzer", path=str(Path(sys.executable).parent)) or shutil.which("perf_analyzer")
    if found is None:
        raise FileNotFoundError(MISSING)
    return found


def write_input_data(pngs: list[bytes], path: Path) -> Path:
    """perf_analyzer's ``--input-data`` JSON: one step per image, each the ``image`` input as a
    BYTES tensor of one element (4-byte little-endian length, then the PNG), base64 as ``b64``."""
    steps = [{"image": {"b64": base64.b64encode(struct.pack("<I", len(p)) + p).decode()}} for p in pngs]
    path.write_text(json.dumps({"data": steps}))
    return path


@dataclass(frozen=True)
class Point:
    concurrency: int
    infer_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int  # measured requests (perf_analyzer's "Request count", warm-up excluded)


def run(url: str, model: str, data: Path, concurrencies: list[int], window_ms: int, max_trials: int,
        workdir: Path, headers: dict[str, str] | None = None, timeout_s: float = 600) -> list[Point]:  # fmt: skip
    """One perf_analyzer run over ``concurrencies``; raises with its output if it fails.

    Stability is not required (``--stability-percentage 999``): on a shared CPU three windows
    rarely agree within perf_analyzer's default 10 %, and a point is a point either way. It still
    needs three windows to call any point stable, so ``max_trials`` is at least 3."""
    if max_trials < 3:
        raise ValueError(f"max_trials {max_trials}: perf_analyzer needs 3 windows for a point")
    report = workdir / "perf_analyzer.csv"
    command = [
        find_binary(), "-m", model, "-u", url.removeprefix("http://"), "-i", "http", "--input-data", str(data),
        "--measurement-interval", str(window_ms), "--max-trials", str(max_trials),
        "--stability-percentage", "999", "-f", str(report),
    ]  # fmt: skip
    for name, value in (headers or {}).items():
        command += ["-H", f"{name}: {value}"]
    points: list[Point] = []
    for concurrency in concurrencies:  # one run per point: --concurrency-range takes only start:end:step
        args = [*command, "--concurrency-range", str(concurrency)]
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0 or not report.exists():
            raise RuntimeError(f"perf_analyzer failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        with report.open() as f:
            (row,) = list(csv.DictReader(f))
        count = re.search(r"Request count: (\d+)", done.stdout)
        points.append(Point(
            concurrency=int(row["Concurrency"]), infer_per_s=float(row["Inferences/Second"]),
            p50_ms=int(row["p50 latency"]) / 1000, p99_ms=int(row["p99 latency"]) / 1000,
            requests=int(count.group(1)) if count else 0,
        ))  # fmt: skip
        report.unlink()
    return points


def main(argv: list[str] | None = None) -> int:
    import httpx

    from bench.limit import scrape
    from bench.machine import write_result
    from bench.servers import SystemSpec, python_command, start
    from bench.serving import elastic_threshold, png
    from model.data import load_fashion_mnist
    from service.settings import DEFAULT_CHECKPOINT

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", default="1,8,32,64", help="comma-separated concurrencies")
    p.add_argument("--window-ms", type=int, default=3000, help="perf_analyzer's measurement window")
    p.add_argument("--max-trials", type=int, default=3, help="windows per point at most")
    p.add_argument("--thresholds", default="0,elastic,1", help="comma-separated; 'elastic': within 0.3 pp of full")
    p.add_argument("--images", type=int, default=256, help="Fashion-MNIST test images, sent in turn")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)

    elastic, _why = elastic_threshold(DEFAULT_CHECKPOINT)
    thresholds = [elastic if t == "elastic" else float(t) for t in args.thresholds.split(",")]
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    work = Path(tempfile.mkdtemp(prefix="thinkingvit-perf-analyzer-"))
    data = write_input_data([png(im) for im in load_fashion_mnist("test").subset(args.images).images], work / "input.json")
    model = DEFAULT_CHECKPOINT.stem
    results: dict = {
        "date": datetime.now(UTC).isoformat(timespec="minutes"), "client": "perf_analyzer",
        "perf_analyzer": {"window_ms": args.window_ms, "max_trials": args.max_trials, "images": args.images},
        "elastic_threshold": elastic, "points": {},
    }  # fmt: skip
    for threshold in thresholds:
        command = python_command("-m", "service.cli", "serve", "--log-level", "warning", "--default-threshold", str(threshold))
        server = start(SystemSpec(f"ours@{threshold:g}", command, "/readyz"), work)
        try:
            before = scrape(httpx.get(f"{server.url}/metrics").text)
            points = run(server.url, model, data, concurrencies, args.window_ms, args.max_trials, work)
            after = scrape(httpx.get(f"{server.url}/metrics").text)
        finally:
            server.stop()
        answered = sum(v - before.get(k, 0) for k, v in after.items() if k.startswith("thinkingvit_exits_total"))
        results["points"][f"ours@{threshold:g}"] = {"answered_images": answered, "by_concurrency": [vars(p) for p in points]}
        for point in points:
            print(f"ours @ {threshold:g}  c={point.concurrency:3d}  {point.infer_per_s:8.1f} infer/s  "
                  f"p50 {point.p50_ms:7.2f} ms  p99 {point.p99_ms:7.2f} ms", flush=True)  # fmt: skip
    print("wrote", write_result(results, args.out, "perf-analyzer"))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
