"""Issue #14's side-by-side run: our server per threshold, the peers serving the full model, and the
floor, all driven by ``wrk`` (Debian; ``bench.wrk``) with the same multipart Fashion-MNIST PNG
uploads, one after another.

    python -m bench.engine_core [--seconds 10] [--connections 64] [--out bench/results]

- ours at threshold 0, the within-0.3-pp threshold and 1 (every setting at its default);
- LitServe with the batching the issue #7 bench tuned for it (batch 16, 5 ms, 2 workers, 1 thread);
- plain FastAPI with the model inline in its handler, one request at a time (``bench.peers plain``),
  with 1 torch thread (``--fastapi-threads``): the issue #7 bench's tuning found 1 and 2 equal on 2
  cores (131 / 132 images/s), and with 2 it collapses to a few images/s whenever another process
  wants a core;
- the floor: a bare FastAPI endpoint (uvicorn, uvloop, httptools) that reads the same multipart
  upload, decodes and preprocesses the image and returns JSON, with no model (``bench.floor``).

Reported, never asserted: images/s, p50/p99 from wrk, busy cores of each server's process tree,
elastic gain against the analytic ratio limit(T) / limit(1) (offline stage timings at the
server's mean batches, ``bench.limit``), ours / LitServe, and the front-end CPU per request at
threshold 0 (server CPU-seconds per request minus the model's offline CPU per image) against the
floor's CPU per request. The one open-loop point (Poisson arrivals at 70 % of the peak, for p99 / p50)
comes from ``bench.loadgen``'s aiohttp client: wrk cannot pace an open loop (see ``bench.wrk``).
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import httpx
import torch
from PIL import Image

from bench import wrk
from bench.limit import StageTimer, analytic_limit, scrape
from bench.loadgen import CONTENT_TYPE, LoadGenerator, Workload, multipart
from bench.machine import write_result
from bench.report import ratio
from bench.servers import SystemSpec, python_command, start
from bench.serving import elastic_threshold, png
from model.checkpoint import load_checkpoint
from model.data import load_fashion_mnist
from model.preprocess import preprocess_image
from service.settings import DEFAULT_CHECKPOINT


def measure(server, url: str, script: Path, seconds: float, connections: int, body: bytes) -> dict:
    """A short warm-up, then (once the warm-up's leftovers are answered, ``wrk.settle`` with
    ``body``) the measured window with the server tree's CPU time around it."""
    wrk.run(url, script, 2, connections)
    wrk.settle(url, body, CONTENT_TYPE)
    cpu_before, wall_before = server.cpu_seconds(), time.monotonic()
    run = wrk.run(url, script, seconds, connections)
    busy = (server.cpu_seconds() - cpu_before) / (time.monotonic() - wall_before)
    return {"images_per_s": run.requests_per_s, "requests": run.requests, "non_2xx": run.http_errors,
            "socket_errors": run.socket_errors, "p50_ms": run.latency_ms["p50"], "p99_ms": run.latency_ms["p99"],
            "busy_cores": busy, "cpu_ms_per_request": 1000 * busy / run.requests_per_s if run.requests else None}  # fmt: skip


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
    p.add_argument("--fastapi-threads", type=int, default=1, help="torch threads of the plain FastAPI peer")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)

    loaded = load_checkpoint(DEFAULT_CHECKPOINT)
    pngs = [png(im) for im in load_fashion_mnist("test").subset(args.images).images]
    images = torch.stack([preprocess_image(Image.open(io.BytesIO(b)), loaded.preprocess) for b in pngs])
    elastic, _why = elastic_threshold(DEFAULT_CHECKPOINT)
    work = Path(tempfile.mkdtemp(prefix="thinkingvit-bench-"))
    bodies = [multipart([data], "file") for data in pngs]
    script = wrk.write_script(bodies, CONTENT_TYPE, work)
    point = partial(measure, script=script, seconds=args.seconds, connections=args.connections, body=bodies[0])
    results: dict = {"date": datetime.now(UTC).isoformat(timespec="minutes"), "elastic_threshold": elastic,
                     "wrk": {"version": wrk.version(), "threads": 1, "connections": args.connections,
                             "seconds": wrk.whole_seconds(args.seconds)}}  # fmt: skip

    ours = start(SystemSpec("ours", python_command("-m", "service.cli", "serve", "--log-level", "warning"), "/readyz"), work)
    try:
        for threshold in (0.0, elastic, 1.0):
            before = server_counters(ours.url)
            row = point(ours, f"{ours.url}/classify?threshold={threshold}")
            after = server_counters(ours.url)
            delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
            row["mean_batch"] = [delta[f"batch_size_sum{{{s}}}"] / max(1, delta[f"batch_size_count{{{s}}}"]) for s in (0, 1)]
            row["sent_on"] = delta["exits_total{1}"] / max(1, delta["exits_total{0}"] + delta["exits_total{1}"])
            results[f"ours@{threshold:g}"] = row
            print(f"ours @ {threshold:g}: {json.dumps(row)}", flush=True)
        wrk.settle(f"{ours.url}/classify", bodies[0], CONTENT_TYPE)
        results["open_loop_70"] = open_loop_at(ours.url, pngs, elastic, 0.7 * results[f"ours@{elastic:g}"]["images_per_s"],
                                               args.seconds)  # fmt: skip
        print(f"ours @ {elastic:g}, open loop at 70 % of peak: {json.dumps(results['open_loop_70'])}", flush=True)
    finally:
        ours.stop()

    litserve = start(SystemSpec("litserve", python_command(
        "-m", "bench.peers", "litserve", "--checkpoint", str(DEFAULT_CHECKPOINT), "--max-batch-size", "16",
        "--batch-timeout-ms", "5", "--workers", "2", "--threads", "1"), "/health"), work)  # fmt: skip
    try:
        results["litserve"] = point(litserve, f"{litserve.url}/classify")
        print(f"litserve: {json.dumps(results['litserve'])}", flush=True)
    finally:
        litserve.stop()

    threads = args.fastapi_threads
    plain = start(SystemSpec("fastapi", python_command(
        "-m", "bench.peers", "plain", "--checkpoint", str(DEFAULT_CHECKPOINT), "--threads", str(threads)), "/readyz",
        env={"OMP_NUM_THREADS": str(threads)}), work)  # fmt: skip
    try:
        results["fastapi"] = point(plain, f"{plain.url}/classify")
        results["fastapi"]["torch_threads"] = threads
        print(f"plain FastAPI, model inline: {json.dumps(results['fastapi'])}", flush=True)
    finally:
        plain.stop()

    floor = start(SystemSpec("floor", python_command("-m", "bench.floor"), "/readyz"), work)
    try:
        results["floor"] = point(floor, f"{floor.url}/classify")
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
        "ours_at_elastic_over_fastapi": ratio(high["images_per_s"], results["fastapi"]["images_per_s"]),
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
