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
floor's CPU per request. The open-loop points (Poisson arrivals at 70 % of the peak, for p99 / p50)
come from ``bench.loadgen``'s aiohttp client: wrk cannot pace an open loop (see ``bench.wrk``).

The goals that compare points of the same kind of work (elastic gain, front end / floor, and p99 /
p50 at 70 % of the peak) are taken ``--repeats`` times in rounds: ours at 0, the floor, ours at the
elastic threshold, the open loop at 70 % of that point's images/s, ours at 1, with ours and the
floor both up, and the offline stage timings taken again after each round. A
shared 2-core VM changes speed by tens of percent within a minute (the same Python loop took 0.37
to 0.54 s of CPU in one minute here), so a ratio of two points minutes apart measures the host as
much as the server; each round's ratios come from points seconds apart, and the report gives
their median and range.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import sys
import tempfile
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import httpx
import torch
from PIL import Image
from tqdm import tqdm

from bench import wrk
from bench.limit import StageTimer, analytic_limit, scrape, server_stats
from bench.loadgen import CONTENT_TYPE, LoadGenerator, Workload, multipart
from bench.machine import write_result
from bench.report import ratio
from bench.servers import SystemSpec, machine_steal_seconds, python_command, start
from bench.serving import elastic_threshold, png
from model.checkpoint import load_checkpoint
from model.data import load_fashion_mnist
from model.preprocess import preprocess_image
from service.settings import DEFAULT_CHECKPOINT


def measure(server, url: str, script: Path, seconds: float, connections: int, body: bytes, threads: int = 1,
            warmup_s: float = 2.0) -> dict:  # fmt: skip
    """A warm-up of ``warmup_s`` (none at 0), then the measured window (``wrk.measure``; wrk with
    ``threads`` threads)."""
    if warmup_s > 0:
        wrk.run(url, script, warmup_s, connections, threads)
    point = wrk.measure(server.cpu_seconds, url, script, seconds, connections, body, CONTENT_TYPE, threads)
    run = point.run
    return {"images_per_s": run.requests_per_s, "requests": run.requests, "non_2xx": run.http_errors,
            "socket_errors": run.socket_errors, "p50_ms": run.latency_ms["p50"], "p99_ms": run.latency_ms["p99"],
            "busy_cores": point.server_cores, "client_cores": point.client_cores, "other_cores": point.other_cores,
            "steal_cores": point.steal_cores,
            "cpu_ms_per_request": point.server_cpu_ms_per_request}  # fmt: skip


def open_loop_at(server, pngs: list[bytes], threshold: float, rate: float, seconds: float) -> dict:
    """Poisson arrivals at ``rate`` images/s (latency from the scheduled arrival): the p99 / p50 goal,
    with the cores the server, the client and the host's CPU steal took meanwhile (steal is what
    most often spoils this figure on a VM)."""
    labels = [0] * len(pngs)  # accuracy is not scored here
    work = Workload.build(pngs, labels, query=f"?threshold={threshold}")
    meters = {"server": server.cpu_seconds, "steal": machine_steal_seconds}
    summary = LoadGenerator(server.url, meters).open_loop(work, rate, 1.0, seconds).summary(2)
    latency = summary["latency_ms"]
    return {"rate": rate, "images_per_s": summary["images_per_s"], "errors": summary.get("errors", {}),
            "p50_ms": latency["p50"], "p99_ms": latency["p99"], "p99_over_p50": latency["p99"] / latency["p50"],
            "busy_cores": summary["server_cpu_cores"], "client_cores": summary["client_cpu_cores"],
            "steal_cores": summary["steal_cpu_cores"]}  # fmt: skip


def ours_point(ours, threshold: float, point) -> dict:
    """One wrk point of our server at ``threshold``, with its batches, exits and in-server compute
    from /metrics."""
    url = f"{ours.url}/classify?threshold={threshold}"
    before = scrape(httpx.get(f"{ours.url}/metrics").text)
    row = point(ours, url)
    stats = server_stats(before, scrape(httpx.get(f"{ours.url}/metrics").text), num_stages=2)
    first, last = stats["stages"]
    row["mean_batch"] = [first["mean_batch"], last["mean_batch"]]
    row["sent_on"] = stats["r"]
    row["engine_compute_ms_per_image"] = first["compute_ms_per_image"] + stats["r"] * last["compute_ms_per_image"]
    return row


def add_offline_limits(rows: list[dict], timer: StageTimer) -> None:
    """The model's offline CPU per image and the analytic limit at each row's batches, all timed
    back to back (``timer``: a fresh one per round), so a limit ratio does not mix host speeds."""
    for row in rows:
        first, last = row["mean_batch"]
        t1, t2 = timer.per_image_s(0, first), timer.per_image_s(1, last or first)
        row["limit_images_per_s"] = analytic_limit(t1, t2, row["sent_on"])
        row["model_cpu_ms_per_image"] = 1000 * (t1 + row["sent_on"] * t2)


def round_goals(row: dict[str, dict], elastic: float) -> dict:
    """The same-kind ratios of one round (points seconds apart), and its open loop's p99 / p50 (at
    70 % of the elastic point's peak, measured just before it)."""
    zero, high, full, floor = row["ours@0"], row[f"ours@{elastic:g}"], row["ours@1"], row["floor"]
    front_ms = zero["cpu_ms_per_request"] - zero["model_cpu_ms_per_image"]
    gain, analytic = high["images_per_s"] / full["images_per_s"], high["limit_images_per_s"] / full["limit_images_per_s"]
    return {
        "elastic_gain": gain, "analytic_ratio": analytic, "elastic_gain_over_analytic_ratio": gain / analytic,
        "front_end_cpu_ms_per_request": front_ms, "floor_cpu_ms_per_request": floor["cpu_ms_per_request"],
        "front_end_over_floor": front_ms / floor["cpu_ms_per_request"],
        # the same with the model's cost as the engine timed it in that very window (wall time of
        # its batches, one torch thread on its own core): no offline timing involved
        "front_end_over_floor_engine_timed": (zero["cpu_ms_per_request"] - zero["engine_compute_ms_per_image"])
        / floor["cpu_ms_per_request"],
        "p99_over_p50_at_70_percent_open_loop": row["open_loop_70"]["p99_over_p50"],
    }  # fmt: skip


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "rounds": values}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--repeats", type=int, default=3, help="rounds of ours at 0 / elastic / 1 and the floor")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--warmup-s", type=float, default=2.0, help="unmeasured wrk before each point (0: none)")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--fastapi-threads", type=int, default=1, help="torch threads of the plain FastAPI peer")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)

    loaded = load_checkpoint(DEFAULT_CHECKPOINT)
    pngs = [png(im) for im in load_fashion_mnist("test").subset(args.images).images]
    images = torch.stack([preprocess_image(Image.open(io.BytesIO(b)), loaded.preprocess) for b in pngs])
    torch.set_num_threads(1)  # the offline timings: the engine's one thread
    elastic, _why = elastic_threshold(DEFAULT_CHECKPOINT)
    work = Path(tempfile.mkdtemp(prefix="thinkingvit-bench-"))
    bodies = [multipart([data], "file") for data in pngs]
    script = wrk.write_script(bodies, CONTENT_TYPE, work)
    point = partial(measure, script=script, seconds=args.seconds, connections=args.connections, body=bodies[0],
                    warmup_s=args.warmup_s)  # fmt: skip
    results: dict = {"date": datetime.now(UTC).isoformat(timespec="minutes"), "elastic_threshold": elastic,
                     "repeats": args.repeats,
                     "wrk": {"version": wrk.version(), "threads": 1, "connections": args.connections,
                             "seconds": wrk.whole_seconds(args.seconds), "warmup_s": args.warmup_s}}  # fmt: skip
    keys = ("ours@0", f"ours@{elastic:g}", "ours@1", "floor")
    rounds: list[dict[str, dict]] = []

    ours = start(SystemSpec("ours", python_command("-m", "service.cli", "serve", "--log-level", "warning"), "/readyz"), work)
    floor = start(SystemSpec("floor", python_command("-m", "bench.floor"), "/readyz"), work)
    try:
        for i in tqdm(range(args.repeats), desc="rounds", unit="round"):
            row = {"ours@0": ours_point(ours, 0.0, point), "floor": point(floor, f"{floor.url}/classify")}
            row[f"ours@{elastic:g}"] = ours_point(ours, elastic, point)
            wrk.settle(f"{ours.url}/classify", bodies[0], CONTENT_TYPE)  # at 70 % of the peak just measured
            row["open_loop_70"] = open_loop_at(ours, pngs, elastic, 0.7 * row[f"ours@{elastic:g}"]["images_per_s"],
                                               args.seconds)  # fmt: skip
            row["ours@1"] = ours_point(ours, 1.0, point)
            add_offline_limits([row[k] for k in keys if k != "floor"], StageTimer(loaded.model, images, torch.device("cpu")))
            row["goals"] = round_goals(row, elastic)
            rounds.append(row)
            tqdm.write(f"round {i + 1}: " + ", ".join(f"{k} {row[k]['images_per_s']:.0f}/s" for k in keys)
                       + f"; {json.dumps(row['goals'])}")  # fmt: skip
        for key in keys:  # each system's round with the median images/s
            ranked = sorted((r[key] for r in rounds), key=lambda r: r["images_per_s"])
            results[key] = ranked[len(ranked) // 2] | {"images_per_s_rounds": [r[key]["images_per_s"] for r in rounds]}
        loops = sorted((r["open_loop_70"] for r in rounds), key=lambda r: r["p99_over_p50"])
        results["open_loop_70"] = loops[len(loops) // 2]  # the median round's
        print(f"ours @ {elastic:g}, open loop at 70 % of each round's peak, median round: "
              f"{json.dumps(results['open_loop_70'])}", flush=True)  # fmt: skip
    finally:
        ours.stop()
        floor.stop()

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

    high = results[f"ours@{elastic:g}"]["images_per_s"]
    per_round = {name: spread([r["goals"][name] for r in rounds]) for name in rounds[0]["goals"]}
    results["rounds"] = rounds
    results["goals"] = {
        "ours_at_elastic_over_litserve": ratio(high, results["litserve"]["images_per_s"]),
        "ours_at_elastic_over_fastapi": ratio(high, results["fastapi"]["images_per_s"]),
        **{name: figures["median"] for name, figures in per_round.items()},
        "p99_over_p50_at_70_percent_open_loop": per_round["p99_over_p50_at_70_percent_open_loop"]["median"],
    }  # fmt: skip
    results["goals_per_round"] = per_round
    print("goals:", json.dumps(results["goals"], indent=2))
    print("wrote", write_result(results, args.out, "engine-core"))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
