"""Issue #14's side-by-side run: our server per threshold, LitServe (full model), and the floor, all
driven by ``wrk`` (Debian) with the same multipart Fashion-MNIST PNG uploads, one after another.

    python -m bench.engine_core [--seconds 10] [--connections 64] [--out bench/results]

- ours at threshold 0, the within-0.3-pp threshold and 1 (every setting at its default);
- LitServe with the batching the issue #7 bench tuned for it (batch 16, 5 ms, 2 workers, 1 thread);
- the floor: a bare FastAPI endpoint (uvicorn, uvloop, httptools) that reads the same multipart
  upload, decodes and preprocesses the image and returns JSON, with no model (``bench.floor``).

Reported, never asserted: images/s, p50/p99 from wrk, busy cores of each server's process tree,
elastic gain against the analytic ratio limit(T) / limit(1) (offline stage timings at the
server's mean batches, ``bench.limit``), ours / LitServe, and the front-end CPU per request at
threshold 0 (server CPU-seconds per request minus the model's offline CPU per image) against the
floor's CPU per request.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import torch
from PIL import Image

from bench.limit import StageTimer, analytic_limit, scrape
from bench.loadgen import BOUNDARY, LoadGenerator, Workload, multipart
from bench.machine import write_result
from bench.servers import SystemSpec, python_command, start
from bench.serving import elastic_threshold, png
from model.checkpoint import load_checkpoint
from model.data import load_fashion_mnist
from model.preprocess import preprocess_image
from service.settings import DEFAULT_CHECKPOINT

LUA = """
local bodies, n = {}, 0
for line in io.lines("%(list)s") do
  local f = io.open(line, "rb"); n = n + 1; bodies[n] = f:read("*all"); f:close()
end
local i = 0
request = function()
  i = i %% n + 1
  return wrk.format("POST", nil, {["Content-Type"] = "multipart/form-data; boundary=%(boundary)s"}, bodies[i])
end
"""


def multipart_bodies(pngs: list[bytes], folder: Path) -> Path:
    """One file per request body, and the list wrk's script reads them from."""
    paths = []
    for i, data in enumerate(pngs):
        path = folder / f"body-{i}.bin"
        path.write_bytes(multipart([data], "file"))
        paths.append(str(path))
    listing = folder / "bodies.txt"
    listing.write_text("\n".join(paths) + "\n")
    script = folder / "post.lua"
    script.write_text(LUA % {"list": listing, "boundary": BOUNDARY})
    return script


def run_wrk(url: str, script: Path, seconds: float, connections: int) -> dict:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{round(seconds)}s", "--latency", "-s", str(script), url],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    latency = {q: _ms(re.search(rf"\s{q}%\s+([\d.]+\w+)", out).group(1)) for q in ("50", "99")}
    return {"images_per_s": rps, "requests": total, "non_2xx": int(errors.group(1)) if errors else 0,
            "p50_ms": latency["50"], "p99_ms": latency["99"]}  # fmt: skip


def _ms(text: str) -> float:
    value, unit = re.match(r"([\d.]+)(\w+)", text).groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def measure(server, url: str, script: Path, seconds: float, connections: int) -> dict:
    """A short warm-up, then the measured window with the server tree's CPU time around it."""
    run_wrk(url, script, 2, connections)
    cpu_before, wall_before = server.cpu_seconds(), time.monotonic()
    result = run_wrk(url, script, seconds, connections)
    busy = (server.cpu_seconds() - cpu_before) / (time.monotonic() - wall_before)
    return result | {"busy_cores": busy, "cpu_ms_per_request": 1000 * busy / result["images_per_s"]}


def open_loop_at(url: str, pngs: list[bytes], threshold: float, rate: float, seconds: float) -> dict:
    """Poisson arrivals at ``rate`` images/s (latency from the scheduled arrival): the p99 / p50 goal."""
    labels = [0] * len(pngs)  # accuracy is not scored here
    work = Workload.build(pngs, labels, query=f"?threshold={threshold}")
    summary = LoadGenerator(url).open_loop(work, rate, 1.0, seconds).summary(2)
    latency = summary["latency_ms"]
    return {"rate": rate, "images_per_s": summary["images_per_s"], "errors": summary.get("errors", {}),
            "p50_ms": latency["p50"], "p99_ms": latency["p99"], "p99_over_p50": latency["p99"] / latency["p50"]}  # fmt: skip


def server_counters(url: str) -> dict[str, float]:
    """Batch sizes and exits from our server's /metrics, keyed 'name{stage}' without the namespace."""
    return {k.removeprefix("thinkingvit_"): v for k, v in scrape(httpx.get(f"{url}/metrics").text).items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)

    loaded = load_checkpoint(DEFAULT_CHECKPOINT)
    pngs = [png(im) for im in load_fashion_mnist("test").subset(args.images).images]
    images = torch.stack([preprocess_image(Image.open(io.BytesIO(b)), loaded.preprocess) for b in pngs])
    elastic, _why = elastic_threshold(DEFAULT_CHECKPOINT)
    work = Path(tempfile.mkdtemp(prefix="thinkingvit-bench-"))
    script = multipart_bodies(pngs, work)
    results: dict = {"date": datetime.now(UTC).isoformat(timespec="minutes"), "elastic_threshold": elastic,
                     "wrk": {"threads": 1, "connections": args.connections, "seconds": args.seconds}}  # fmt: skip

    ours = start(SystemSpec("ours", python_command("-m", "service.cli", "serve", "--log-level", "warning"), "/readyz"), work)
    try:
        for threshold in (0.0, elastic, 1.0):
            before = server_counters(ours.url)
            row = measure(ours, f"{ours.url}/classify?threshold={threshold}", script, args.seconds, args.connections)
            after = server_counters(ours.url)
            delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
            row["mean_batch"] = [delta[f"batch_size_sum{{{s}}}"] / max(1, delta[f"batch_size_count{{{s}}}"]) for s in (0, 1)]
            row["sent_on"] = delta["exits_total{1}"] / max(1, delta["exits_total{0}"] + delta["exits_total{1}"])
            results[f"ours@{threshold:g}"] = row
            print(f"ours @ {threshold:g}: {json.dumps(row)}", flush=True)
        results["open_loop_70"] = open_loop_at(ours.url, pngs, elastic, 0.7 * results[f"ours@{elastic:g}"]["images_per_s"],
                                               args.seconds)  # fmt: skip
        print(f"ours @ {elastic:g}, open loop at 70 % of peak: {json.dumps(results['open_loop_70'])}", flush=True)
    finally:
        ours.stop()

    litserve = start(SystemSpec("litserve", python_command(
        "-m", "bench.peers", "litserve", "--checkpoint", str(DEFAULT_CHECKPOINT), "--max-batch-size", "16",
        "--batch-timeout-ms", "5", "--workers", "2", "--threads", "1"), "/health"), work)  # fmt: skip
    try:
        results["litserve"] = measure(litserve, f"{litserve.url}/classify", script, args.seconds, args.connections)
        print(f"litserve: {json.dumps(results['litserve'])}", flush=True)
    finally:
        litserve.stop()

    floor = start(SystemSpec("floor", python_command("-m", "bench.floor"), "/readyz"), work)
    try:
        results["floor"] = measure(floor, f"{floor.url}/classify", script, args.seconds, args.connections)
        print(f"floor: {json.dumps(results['floor'])}", flush=True)
    finally:
        floor.stop()

    # the analytic limit, from offline timings with the engine's one thread at the server's batches
    torch.set_num_threads(1)
    timer = StageTimer(loaded.model, images, torch.device("cpu"))
    for key in ("ours@0", f"ours@{elastic:g}", "ours@1"):
        row = results[key]
        t1 = timer.per_image_s(0, row["mean_batch"][0])
        t2 = timer.per_image_s(1, row["mean_batch"][1] or row["mean_batch"][0])
        row["limit_images_per_s"] = analytic_limit(t1, t2, row["sent_on"])
        row["model_cpu_ms_per_image"] = 1000 * (t1 + row["sent_on"] * t2)
    high, full, zero = results[f"ours@{elastic:g}"], results["ours@1"], results["ours@0"]
    front_ms = zero["cpu_ms_per_request"] - zero["model_cpu_ms_per_image"]
    results["goals"] = {
        "ours_at_elastic_over_litserve": high["images_per_s"] / results["litserve"]["images_per_s"],
        "elastic_gain": high["images_per_s"] / full["images_per_s"],
        "analytic_ratio": high["limit_images_per_s"] / full["limit_images_per_s"],
        "elastic_gain_over_analytic_ratio": (high["images_per_s"] / full["images_per_s"])
        / (high["limit_images_per_s"] / full["limit_images_per_s"]),
        "front_end_cpu_ms_per_request": front_ms,
        "floor_cpu_ms_per_request": results["floor"]["cpu_ms_per_request"],
        "front_end_over_floor": front_ms / results["floor"]["cpu_ms_per_request"],
        "p99_over_p50_at_70_percent_open_loop": results["open_loop_70"]["p99_over_p50"],
    }
    print("goals:", json.dumps(results["goals"], indent=2))
    print("wrote", write_result(results, args.out, "engine-core"))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
