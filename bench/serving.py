"""The serving benchmark of issue #7: our server at several thresholds against its analytic limit and
against peers serving the full model, all over HTTP, under the same clients.

    python -m bench                         # the shipped model, Fashion-MNIST test PNGs (~7 min on 2 cores)
    python -m bench --smoke                 # a tiny random model, seconds (CI)
    python -m bench --device cuda --preset deit-s-3-6 --synthetic   # ImageNet-size, random weights
    thinkingvit bench ...                   # the same

Steps: (1) our server, one process, every threshold with single-image requests and with the batch
endpoint, reading its /metrics for the batch sizes and the share r of images sent on; (2) the
concurrency sweep and the open-loop Poisson run at 70 % of the sweep's peak, for our server at the
within-0.3-pp threshold and at threshold 1, the per-request FastAPI peer and LitServe (batching
tuned on a small grid first); (3) in-process per-stage timings at the server's batch sizes for the
analytic limit. Writes ``<out>/<date>-<machine>.{json,md}`` and two PNG plots.

Clients (issue #16: throughput from a client we did not write):
- every throughput point (each threshold, the batch endpoint, the sweep, the tuning runs, for us and
  every peer) comes from ``wrk`` (``bench.wrk``), closed loop;
- accuracy, exit shares and GMACs come from the checking client (``bench.loadgen``, aiohttp), which
  scores ``plan.check_images`` answers per row and per system against their labels, untimed;
- the open-loop run stays on that aiohttp client too: wrk cannot pace Poisson arrivals, and wrk2,
  which can, is not in Debian.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import shlex
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import httpx
import torch

from bench import report, wrk
from bench.limit import StageTimer, analytic_limit, scrape, server_stats
from bench.loadgen import CONTENT_TYPE, LoadGenerator, Workload
from bench.machine import describe, package_version
from bench.servers import (
    RunningServer,
    SystemSpec,
    launch,
    machine_cpu_seconds,
    python_command,
    ready,
    start,
)

log = logging.getLogger("bench")
STANDARD_THRESHOLDS = (0.0, 0.5, 0.8, 0.9, 1.0)
FALLBACK_ELASTIC_THRESHOLD = 0.9  # when the checkpoint has no calibration profile
OPEN_LOOP_LOAD = 0.7
OTHER_LOAD_WARNING = 0.25  # cores used by other processes during a run that make it worth a warning
SYNTHETIC_IMAGES = 512  # distinct synthetic PNGs; requests cycle through them


@dataclass(frozen=True)
class Plan:
    """How long and how hard each part runs. wrk's runs (every throughput point) last whole
    seconds, at least one; a warm-up of 0 is none."""

    images: int = 10_000  # test images turned into PNGs (requests cycle through them)
    concurrency: int = 64  # closed-loop connections of the per-threshold runs
    warmup_s: float = 1.0
    measure_s: float = 6.0
    batch_images: int = 32  # images per /classify/batch request
    batch_concurrency: int = 4
    sweep: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    sweep_warmup_s: float = 1.0
    sweep_measure_s: float = 3.0
    check_images: int = 1000  # images the checking client scores per threshold row and per system
    open_loop_warmup_s: float = 1.0
    open_loop_measure_s: float = 10.0
    # LitServe batching grid: (max_batch_size, batch_timeout_ms, workers_per_device); each is tried
    # with every torch thread count (per worker) that fits the cores
    litserve_grid: tuple[tuple[int, float, int], ...] = ((32, 2.0, 1), (32, 10.0, 1), (16, 5.0, 2))
    tune: bool = True  # try each system's torch thread counts (and LitServe's grid), keep the best
    threads: int = 0  # torch threads per server process when not tuning (0: torch's default)
    tune_measure_s: float = 3.0
    min_requests: int = 20  # an open-loop window stays open until this many were answered in it
    timing_s: float = 0.25  # offline: least seconds timed per (stage, batch)
    # launch the peers' servers (untuned only) once ours is ready, so their startup overlaps its
    # runs, and let ours shut down while they run: it disturbs the figures, which only a smoke run
    # may afford
    start_peers_early: bool = False


FULL = Plan()
SMOKE = Plan(
    images=128, concurrency=8, warmup_s=0, measure_s=1, batch_images=8, batch_concurrency=2,
    sweep=(1, 8), sweep_warmup_s=0, sweep_measure_s=1, check_images=16, open_loop_warmup_s=0.1,
    open_loop_measure_s=0.4, litserve_grid=((8, 2.0, 1),), tune=False, threads=1, tune_measure_s=1,
    min_requests=4, timing_s=0.02, start_peers_early=True,
)  # fmt: skip


@dataclass
class Context:
    args: argparse.Namespace
    plan: Plan
    checkpoint: Path
    device: str
    threads: int
    pngs: list[bytes]
    labels: list[int]
    synthetic: bool
    log_dir: Path
    early: dict[str, RunningServer] = field(default_factory=dict)  # launched early, by spec name
    stopping: list[RunningServer] = field(default_factory=list)  # told to stop, not yet waited for


# ------------------------------------------------------------------------------------ inputs


def resolve_checkpoint(args, tmp: Path) -> Path:
    """The checkpoint to serve: --checkpoint, a random one for --preset/--smoke, or the shipped model."""
    if args.checkpoint:
        return Path(args.checkpoint)
    if args.smoke or args.preset:
        return random_checkpoint(args.preset or "tiny-test", tmp / "random.safetensors")
    from service.settings import DEFAULT_CHECKPOINT

    return DEFAULT_CHECKPOINT


def random_checkpoint(preset: str, path: Path) -> Path:
    """Random weights (seeded), with a calibration profile swept on synthetic images so the
    within-0.3-pp path runs too (its accuracies mean nothing)."""
    from model.checkpoint import build_metadata, save_checkpoint
    from model.data import ImageDataset
    from model.evaluate import calibration_profile, sweep
    from model.preprocess import IMAGENET_EVAL, Preprocess
    from model.thinkingvit import create_model

    torch.manual_seed(0)
    model = create_model(preset).eval()
    cfg = model.config
    pre = IMAGENET_EVAL if cfg.in_chans == 3 else Preprocess(
        size=cfg.img_size, resize=cfg.img_size, crop_pct=1.0, interpolation="bilinear",
        mean=(0.5,), std=(0.5,), channels=1,
    )  # fmt: skip
    images, labels = synthetic_images(64, pre.size, cfg.in_chans, cfg.num_classes)
    data = ImageDataset(images, labels, [str(i) for i in range(cfg.num_classes)])
    result = sweep(model, data, pre, speed_images=0, progress=False)
    metadata = build_metadata(
        model, preset, class_names=data.class_names, preprocess=pre.to_dict(),
        calibration=calibration_profile(result, "synthetic[:64]"),
    )  # fmt: skip
    save_checkpoint(path, model, metadata)
    return path


def synthetic_images(n: int, size: int, channels: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth random images (upsampled noise, so PNGs stay small) and random labels."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(n, channels, max(2, size // 8), max(2, size // 8), generator=g)
    images = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return (images * 255).to(torch.uint8), torch.randint(0, classes, (n,), generator=g)


def load_images(args, plan: Plan, checkpoint: Path) -> tuple[list[bytes], list[int], bool]:
    """PNG bytes and labels: Fashion-MNIST test images, or synthetic ones at the model's input size."""
    from model.checkpoint import read_metadata
    from model.preprocess import Preprocess
    from model.thinkingvit import ThinkingViTConfig

    meta = read_metadata(checkpoint)
    cfg = ThinkingViTConfig.from_dict(meta["config"])
    synthetic = args.synthetic or args.smoke
    if synthetic:
        size = Preprocess.from_dict(meta["preprocess"]).size if meta.get("preprocess") else cfg.img_size
        images, labels = synthetic_images(min(plan.images, SYNTHETIC_IMAGES), size, cfg.in_chans, cfg.num_classes)
    else:
        from model.data import load_fashion_mnist

        data = load_fashion_mnist("test").subset(plan.images)
        images, labels = data.images, data.labels
    return [png(im) for im in images], labels.tolist(), synthetic


def png(image: torch.Tensor) -> bytes:
    import io

    from PIL import Image

    array = image.permute(1, 2, 0).numpy()  # (H, W, C)
    buffer = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buffer, format="PNG")
    return buffer.getvalue()


# ------------------------------------------------------------------------------------ systems


def server_env(threads: int) -> dict:
    return {"OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}


def thread_options(ctx: Context, workers: int = 1) -> list[int]:
    """Torch thread counts (per process) worth trying: 1 and all cores' share; the default on a GPU."""
    if not ctx.plan.tune or not ctx.device.startswith("cpu"):
        return [ctx.plan.threads or max(1, ctx.threads // workers)]
    return sorted({1, max(1, ctx.threads // workers)})


def ours_spec(ctx: Context, threads: int) -> SystemSpec:
    """Our server with ``threads`` torch threads in its engine core on a CPU: the engine sets its
    own count (``engine_threads``), so OMP_NUM_THREADS alone would not change it. On a GPU the
    engine keeps its own default."""
    from service.settings import Settings

    flags = ["--checkpoint", str(ctx.checkpoint), "--device", ctx.device, "--log-level", "warning"]
    on_cpu = ctx.device.startswith("cpu")
    if on_cpu:
        flags += ["--engine-threads", str(threads)]
    extra = shlex.split(ctx.args.serve_args or "")
    defaults = {name: info.default for name, info in Settings.model_fields.items() if name not in ("host", "port")}
    recorded = {**defaults, "checkpoint": _shown_path(ctx.checkpoint), "device": ctx.device,
                "log_level": "warning", "extra_flags": extra}  # fmt: skip
    if on_cpu:
        recorded["engine_threads"] = threads
    return SystemSpec(
        f"ours-t{threads}", python_command("-m", "service.cli", "serve", *flags, *extra), "/readyz",
        {"system": "thinkingvit serve (this repo)", "torch_threads": threads, **recorded}, server_env(threads),
    )  # fmt: skip


def plain_spec(ctx: Context, threads: int) -> SystemSpec:
    flags = ["--checkpoint", str(ctx.checkpoint), "--device", ctx.device, "--threads", str(threads)]
    return SystemSpec(
        f"fastapi-t{threads}", python_command("-m", "bench.peers", "plain", *flags), "/readyz",
        {"system": "FastAPI + uvicorn, model inline in the handler, one request at a time",
         "torch_threads": threads, "batching": "none (/classify/batch: the client's batch as one forward)",
         "device": ctx.device, "uvicorn_workers": 1},
        server_env(threads),
    )  # fmt: skip


def litserve_spec(ctx: Context, max_batch: int, timeout_ms: float, workers: int, threads: int) -> SystemSpec:
    flags = [
        "--checkpoint", str(ctx.checkpoint), "--device", ctx.device, "--threads", str(threads),
        "--max-batch-size", str(max_batch), "--batch-timeout-ms", str(timeout_ms), "--workers", str(workers),
    ]  # fmt: skip
    return SystemSpec(
        f"litserve-b{max_batch}-{timeout_ms:g}ms-w{workers}-t{threads}",
        python_command("-m", "bench.peers", "litserve", *flags), "/health",
        {"system": f"LitServe {package_version('litserve')}", "max_batch_size": max_batch,
         "batch_timeout_ms": timeout_ms, "workers_per_device": workers, "torch_threads": threads,
         "num_api_servers": 1, "fast_queue": False, "device": ctx.device},
        server_env(threads),
    )  # fmt: skip


def peer_specs(ctx: Context) -> dict[str, list[SystemSpec]]:
    """Each peer's candidate servers (one each unless tuning), LitServe only when wanted."""
    specs = {"fastapi": [plain_spec(ctx, t) for t in thread_options(ctx)]}
    if want_litserve(ctx.args):
        grid = ctx.plan.litserve_grid if ctx.plan.tune else ctx.plan.litserve_grid[:1]
        specs["litserve"] = [litserve_spec(ctx, b, ms, w, t) for b, ms, w in grid for t in thread_options(ctx, w)]
    return specs


def want_litserve(args: argparse.Namespace) -> bool:
    return not args.no_litserve and _has("litserve")


def launch_peers_early(ctx: Context) -> None:
    """With ``plan.start_peers_early`` and nothing to tune: launch every peer's one server now."""
    if ctx.plan.start_peers_early:
        for specs in peer_specs(ctx).values():
            if len(specs) == 1:
                ctx.early[specs[0].name] = launch(specs[0], ctx.log_dir)


def start_system(ctx: Context, spec: SystemSpec) -> RunningServer:
    """``spec``'s server, ready: the one launched early if there is one, else a new one."""
    early = ctx.early.pop(spec.name, None)
    return ready(early) if early else start(spec, ctx.log_dir)


# ------------------------------------------------------------------------------------ runs


@dataclass(frozen=True)
class Requests:
    """One kind of request for both clients: the checking client's workload (bodies and labels) and
    wrk's script posting the same bodies."""

    work: Workload
    script: Path  # wrk's Lua script
    images: int  # per request

    @classmethod
    def build(cls, pngs: list[bytes], labels: list[int], folder: Path, batch: int = 1) -> Requests:
        work = Workload.build(pngs, labels, batch=batch)
        return cls(work, wrk.write_script(work.bodies, CONTENT_TYPE, folder, f"batch{batch}"), batch)


def warm_up(server: RunningServer, requests: Requests, query: str, concurrency: int, seconds: float) -> None:
    """wrk for ``seconds`` (none when 0), unmeasured: connections open, queues and caches fill."""
    if seconds > 0:
        wrk.run(f"{server.url}{requests.work.path}{query}", requests.script, seconds, concurrency)


def throughput(server: RunningServer, requests: Requests, query: str, concurrency: int, measure_s: float) -> dict:
    """A closed-loop point from wrk on a settled server (``wrk.measure``), with the CPU time of the
    server's process tree, of wrk and of the whole machine around it (other processes: what
    neither used)."""
    url = f"{server.url}{requests.work.path}{query}"
    point = wrk.measure(server.cpu_seconds, url, requests.script, measure_s, concurrency, requests.work.bodies[0],
                        CONTENT_TYPE)  # fmt: skip
    run = point.run
    if point.other_cores > OTHER_LOAD_WARNING:
        log.warning("  other processes used %.2f cores during this run (%.2f of them CPU steal): its figures are "
                    "disturbed", point.other_cores, point.steal_cores)  # fmt: skip
    errors = {"http >= 400": run.http_errors} if run.http_errors else {}
    return {
        "concurrency": concurrency, "client": "wrk", "requests": run.requests, "images": run.requests * requests.images,
        "seconds": round(run.seconds, 3), "requests_per_s": run.requests_per_s,
        "images_per_s": run.requests_per_s * requests.images, "latency_ms": run.latency_ms,
        "errors": errors | {f"socket {k}": n for k, n in run.socket_errors.items()},
        "server_cpu_cores": point.server_cores, "client_cpu_cores": point.client_cores,
        "other_cpu_cores": point.other_cores, "steal_cpu_cores": point.steal_cores,
    }  # fmt: skip


def check(server: RunningServer, requests: Requests, query: str, concurrency: int, plan: Plan) -> dict:
    """The checking client (``bench.loadgen``, aiohttp), not timed: at least ``plan.check_images``
    images, every answer scored against its label; what wrk, which does not read answers, cannot tell."""
    need = math.ceil(plan.check_images / requests.images)  # requests
    run = LoadGenerator(server.url).closed_loop(requests.work.with_query(query), min(concurrency, need), 0.0, 0.0, need)
    summary = run.summary(num_stages=2)
    keep = ("accuracy", "exit_share", "gmacs_per_image", "mean_threshold", "degraded", "errors")
    return {"client": "aiohttp", "images": summary["images"], **{k: summary[k] for k in keep if k in summary}}


def open_loop(server: RunningServer, work: Workload, rate: float, plan: Plan) -> dict:
    """Poisson arrivals from the aiohttp client: wrk cannot pace an open loop (see ``bench.wrk``)."""
    gen = LoadGenerator(server.url, {"server": server.cpu_seconds, "machine": machine_cpu_seconds})
    run = gen.open_loop(work, rate, plan.open_loop_warmup_s, plan.open_loop_measure_s, plan.min_requests)
    summary = run.summary(num_stages=2)
    lat = summary["latency_ms"]
    return {"offered_rate": rate, "client": "aiohttp", **summary, "p99_over_p50": report.ratio(lat["p99"], lat["p50"])}


def threshold_run(server: RunningServer, requests: Requests, threshold: float, concurrency: int, plan: Plan) -> dict:
    """One threshold: its answers scored (aiohttp), then wrk's throughput point, with the server's
    /metrics around the measured run for its batch sizes and the share r sent on."""
    metrics = lambda: scrape(httpx.get(server.url + "/metrics", timeout=10).text)
    query = f"?threshold={threshold:g}"
    scored = check(server, requests, query, concurrency, plan)
    warm_up(server, requests, query, concurrency, plan.warmup_s)
    before = metrics()
    point = throughput(server, requests, query, concurrency, plan.measure_s)
    return {"threshold": threshold, **point, "check": scored, "server": server_stats(before, metrics(), num_stages=2)}


def sweep_and_open_loop(
    ctx: Context, server: RunningServer, requests: Requests, label: str, query: str = "",
    measured: dict[int, dict] | None = None, scored: dict | None = None,
) -> dict:  # fmt: skip
    """wrk at each of the sweep's concurrencies (a point in ``measured``, taken by a per-threshold
    run on the same server, is not measured twice), then the open loop at 70 % of the peak and the
    system's answers scored (unless ``scored`` already has them)."""
    plan, points = ctx.plan, []
    for c in plan.sweep:
        if c in (measured or {}):
            points.append(measured[c])
        else:
            warm_up(server, requests, query, c, plan.sweep_warmup_s)
            points.append(throughput(server, requests, query, c, plan.sweep_measure_s))
        log.info("  %s c=%d: %.0f img/s p50 %.1f ms p99 %.1f ms", label, c, points[-1]["images_per_s"],
                 points[-1]["latency_ms"]["p50"], points[-1]["latency_ms"]["p99"])
    peak = max(points, key=lambda p: p["images_per_s"])
    if not peak["requests"]:
        raise RuntimeError(f"{label}: no successful response ({peak['errors']}); server log:\n{server.log_tail()}")
    rate = OPEN_LOOP_LOAD * peak["requests_per_s"]
    wrk.settle(f"{server.url}{requests.work.path}{query}", requests.work.bodies[0], CONTENT_TYPE)
    poisson = open_loop(server, requests.work.with_query(query), rate, plan)
    log.info("  %s open loop at %.0f req/s: p50 %.1f ms p99 %.1f ms (p99/p50 %.2f)", label, rate,
             poisson["latency_ms"]["p50"], poisson["latency_ms"]["p99"], poisson["p99_over_p50"])
    scored = scored or check(server, requests, query, plan.concurrency, plan)
    return {"sweep": points, "peak": peak, "open_loop": poisson, "check": scored}


def tune(ctx: Context, specs: list[SystemSpec], requests: Requests, query: str = "") -> tuple[SystemSpec, list[dict]]:
    """Start each candidate, measure it with wrk at the sweep's top concurrency, keep the best (images/s)."""
    if len(specs) == 1:
        return specs[0], []
    plan, top, rows = ctx.plan, max(ctx.plan.sweep), []
    for spec in specs:
        server = start(spec, ctx.log_dir)
        try:
            warm_up(server, requests, query, top, plan.sweep_warmup_s)
            row = throughput(server, requests, query, top, plan.tune_measure_s)
        finally:
            server.stop()
        rows.append({"name": spec.name, **spec.settings, "images_per_s": row["images_per_s"],
                     "p50_ms": row["latency_ms"]["p50"], "other_cpu_cores": row["other_cpu_cores"]})  # fmt: skip
        log.info("  tuning %s: %.0f img/s at c=%d", spec.name, row["images_per_s"], top)
    best = max(rows, key=lambda r: r["images_per_s"])
    return next(s for s in specs if s.name == best["name"]), rows


def bench_ours(ctx: Context, single: Requests, batch: Requests, thresholds: list[float], elastic: float) -> dict:
    plan, out = ctx.plan, {"single": [], "batch": [], "systems": {}}
    spec, out["tuning"] = tune(ctx, [ours_spec(ctx, t) for t in thread_options(ctx)], single, "?threshold=1")
    out["settings"] = spec.settings
    server = start(spec, ctx.log_dir)
    log.info("our server (%s) ready in %.1f s at %s", spec.name, server.startup_s, server.url)
    launch_peers_early(ctx)
    try:
        for t in thresholds:
            out["single"].append(threshold_run(server, single, t, plan.concurrency, plan))
            log.info("  threshold %g: %s", t, _brief(out["single"][-1]))
        for t in thresholds:
            out["batch"].append(threshold_run(server, batch, t, plan.batch_concurrency, plan))
            log.info("  batch endpoint, threshold %g: %s", t, _brief(out["batch"][-1]))
        for name, t in ((f"ours@{elastic:g}", elastic), ("ours@1", 1.0)):
            log.info("sweep: %s", name)
            row = report.row_at(out["single"], t)
            run = sweep_and_open_loop(ctx, server, single, name, f"?threshold={t:g}",
                                      measured={plan.concurrency: dict(row)}, scored=row["check"])  # fmt: skip
            out["systems"][name] = {"threshold": t, "startup_s": server.startup_s, **run}
    finally:
        if ctx.plan.start_peers_early:
            server.terminate()  # waited for at the end of the run
            ctx.stopping.append(server)
        else:
            server.stop()
    return out


def bench_plain(ctx: Context, single: Requests, batch: Requests) -> dict:
    spec, tuning = tune(ctx, peer_specs(ctx)["fastapi"], single)
    server = start_system(ctx, spec)
    log.info("per-request FastAPI (%s) ready in %.1f s", spec.name, server.startup_s)
    try:
        run = sweep_and_open_loop(ctx, server, single, "fastapi")
        plan = ctx.plan
        scored = check(server, batch, "", plan.batch_concurrency, plan)
        warm_up(server, batch, "", plan.batch_concurrency, plan.warmup_s)
        run["batch_endpoint"] = {**throughput(server, batch, "", plan.batch_concurrency, plan.measure_s), "check": scored}
    finally:
        server.stop()
    return {"startup_s": server.startup_s, "tuning": tuning, "settings": spec.settings, **run}


def bench_litserve(ctx: Context, single: Requests) -> dict:
    """Tune batching and threads on the grid, then the sweep and the open-loop run with the best."""
    spec, tuning = tune(ctx, peer_specs(ctx)["litserve"], single)
    server = start_system(ctx, spec)
    log.info("LitServe (%s) ready in %.1f s", spec.name, server.startup_s)
    try:
        run = sweep_and_open_loop(ctx, server, single, "litserve")
    finally:
        server.stop()
    return {"startup_s": server.startup_s, "tuning": tuning, "settings": spec.settings, **run}


def add_limits(ctx: Context, ours: dict) -> dict:
    """In-process per-stage timings at the batch sizes each run saw, for every torch thread count
    tried; a row's limit is the best over thread counts (what the machine can do offline)."""
    from model.checkpoint import load_checkpoint
    from model.preprocess import normalise

    loaded = load_checkpoint(ctx.checkpoint, device=ctx.device)
    loaded.model.set_attention_backend("auto")
    rows = ours["single"] + ours["batch"]
    n = max(1, math.ceil(max(r["server"]["stages"][s]["mean_batch"] for r in rows for s in (0, 1))))
    raw = torch.stack([torch_image(p) for p in ctx.pngs[:n]] * math.ceil(n / len(ctx.pngs[:n])))[:n]
    images = normalise(raw, loaded.preprocess)
    tables = {}
    for threads in sorted({*thread_options(ctx), ours["settings"]["torch_threads"]}):
        torch.set_num_threads(threads)
        timer = StageTimer(loaded.model, images, torch.device(ctx.device), ctx.plan.timing_s)
        for row in rows:
            s0, s1 = row["server"]["stages"]
            t1 = timer.per_image_s(0, s0["mean_batch"] or 1)
            t2 = timer.per_image_s(1, s1["mean_batch"] or 1)
            limit = {"torch_threads": threads, "t1_ms": 1000 * t1, "t2_ms": 1000 * t2, "r": row["server"]["r"],
                     "images_per_s": analytic_limit(t1, t2, row["server"]["r"])}  # fmt: skip
            if limit["images_per_s"] > row.get("limit", {}).get("images_per_s", 0.0):
                row["limit"] = limit | {"served_over_limit": report.ratio(row["images_per_s"], limit["images_per_s"])}
        tables[str(threads)] = timer.table()
    torch.set_num_threads(ctx.threads)
    return {"stage_timings_by_threads": tables}


def torch_image(png_bytes: bytes) -> torch.Tensor:
    import io

    import numpy as np
    from PIL import Image

    array = np.asarray(Image.open(io.BytesIO(png_bytes)))
    array = array[..., None] if array.ndim == 2 else array
    return torch.from_numpy(array.copy()).permute(2, 0, 1)  # (C, H, W) uint8


# ------------------------------------------------------------------------------------ report


def max_other_load(rows: list[dict]) -> float | None:
    """The most CPU (in cores) other processes used during any measured window."""
    loads = [r["other_cpu_cores"] for r in rows if r.get("other_cpu_cores") is not None]
    return max(loads, default=None)


def all_runs(ours: dict, systems: dict) -> list[dict]:
    runs = ours["single"] + ours["batch"]
    for s in systems.values():
        runs += s["sweep"] + [s["open_loop"]] + ([s["batch_endpoint"]] if "batch_endpoint" in s else [])
    return runs


def metadata(ctx: Context, started: float, result_rows: list[dict]) -> dict:
    from model.checkpoint import read_metadata

    meta = read_metadata(ctx.checkpoint)
    return describe(ctx.device, ctx.args.machine) | {
        "default_torch_threads": ctx.threads,
        "max_other_cpu_cores": max_other_load(result_rows),
        "versions": {p: package_version(p) for p in ("torch", "fastapi", "starlette", "uvicorn", "httpx", "aiohttp",
                                              "litserve", "uvloop", "httptools", "pydantic")} | {"wrk": wrk.version()},
        "uvicorn_loop_http": f"{'uvloop' if _has('uvloop') else 'asyncio'} + "
                             f"{'httptools' if _has('httptools') else 'h11'} (uvicorn 'auto', every server)",
        "checkpoint": _shown_path(ctx.checkpoint),
        "preset": meta.get("preset"),
        "config": meta.get("config"),
        "images": "synthetic (random labels)" if ctx.synthetic else "Fashion-MNIST test split",
        "image_count": len(ctx.pngs),
        "smoke": bool(ctx.args.smoke),
        "plan": asdict(ctx.plan),
        "clients": {
            "throughput": f"wrk {wrk.version()} (closed loop, 1 thread, a Lua script posting the pre-built "
                          "multipart bodies; it does not read the answers)",
            "checking": "bench/loadgen.py (aiohttp, one asyncio process), untimed: every answer scored against "
                        "its label",
            "open_loop": "bench/loadgen.py (aiohttp), latency from the scheduled arrival (wrk cannot pace an "
                         "open loop; wrk2 is not in Debian)",
        },
        "wall_s": round(time.perf_counter() - started, 1),
    }  # fmt: skip


def _shown_path(path: Path) -> str:
    """Repository paths relative to the repository; others as given."""
    try:
        return str(path.resolve().relative_to(Path(__file__).resolve().parents[1]))
    except ValueError:
        return str(path)


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _brief(row: dict) -> str:
    lat = row["latency_ms"]
    return (f"{row['images_per_s']:.0f} img/s, acc {row['check']['accuracy']:.2f} %, p50 {lat['p50']:.1f} ms, "
            f"p99 {lat['p99']:.1f} ms, r {row['server']['r']:.2f}, CPU cores: server {row['server_cpu_cores']:.2f}, "
            f"client {row['client_cpu_cores']:.2f}, other processes {row['other_cpu_cores']:.2f}")


# ------------------------------------------------------------------------------------ main


def add_calibrated_accuracy(result: dict, checkpoint: Path) -> None:
    """Each threshold row's accuracy (percent) on the calibration split, from the checkpoint's profile."""
    from model.checkpoint import read_metadata

    rows = (read_metadata(checkpoint).get("calibration") or {}).get("rows", [])
    by_threshold = {round(r["threshold"], 6): round(r["accuracy"] * 100, 4) for r in rows}
    for row in result["thresholds"] + result["batch_endpoint"]:
        row["calibrated_accuracy"] = by_threshold.get(round(row["threshold"], 6))


def elastic_threshold(checkpoint: Path) -> tuple[float, str]:
    """The cheapest calibrated threshold within 0.3 pp of the full model's accuracy."""
    from model.checkpoint import read_metadata
    from model.evaluate import ACCURACY_TOLERANCE_PP, threshold_within

    calibration = read_metadata(checkpoint).get("calibration")
    if calibration:
        target = calibration["stage_accuracy"][-1] - ACCURACY_TOLERANCE_PP / 100  # the profile holds fractions
        t = threshold_within(calibration["rows"], target)
        if t is not None:
            return float(t), f"within {ACCURACY_TOLERANCE_PP} pp of the full model on {calibration['split']}"
    return FALLBACK_ELASTIC_THRESHOLD, "no calibration profile: fixed fallback"


def parse_args(argv=None) -> argparse.Namespace:
    """``python -m bench``'s options (``thinkingvit bench`` passes its arguments through to it)."""
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="model to serve (default: the shipped model)")
    p.add_argument("--preset", help="serve random weights of this preset (e.g. deit-s-3-6) instead of a checkpoint")
    p.add_argument("--synthetic", action="store_true", help="random images at the model's size, random labels")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N], for every server and the offline timings")
    p.add_argument("--smoke", action="store_true", help="tiny counts (and a tiny random model unless --preset/--checkpoint): checks the harness runs")
    p.add_argument("--no-litserve", action="store_true", help="leave LitServe out")
    p.add_argument("--machine", help="name in the result files (default: cpu-<N>core or the GPU's name)")
    p.add_argument("--out", type=Path, help="results folder (default: bench/results; --smoke: a temporary one)")
    p.add_argument("--keep-logs", action="store_true",
                   help="keep the temporary folder of server logs after a successful run (a failed run always keeps it)")
    p.add_argument("--concurrency", type=int, help="closed-loop clients of the per-threshold runs")
    p.add_argument("--measure-s", type=float, help="seconds measured per threshold run")
    p.add_argument("--serve-args", default="",
                   help="extra flags for our server, e.g. '--api-servers 8 --max-batch-size 128' (recorded)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    return run(parse_args(argv))


def run(args: argparse.Namespace) -> dict:
    """The benchmark. Server logs and the random checkpoint go to a temporary folder, removed after
    a successful run (kept after a failure, or with --keep-logs, and named in the log)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="thinkingvit-bench-"))
    out = args.out or (tmp if args.smoke else Path(__file__).parent / "results")
    try:
        result = measure(args, tmp, out)
    except BaseException:
        log.error("server logs kept in %s", tmp)
        raise
    if out != tmp and not args.keep_logs:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def measure(args: argparse.Namespace, tmp: Path, out: Path) -> dict:
    started = time.perf_counter()
    plan = SMOKE if args.smoke else FULL
    plan = replace(plan, **{k: v for k, v in (("concurrency", args.concurrency), ("measure_s", args.measure_s)) if v})
    checkpoint = resolve_checkpoint(args, tmp)
    pngs, labels, synthetic = load_images(args, plan, checkpoint)
    ctx = Context(args, plan, checkpoint, args.device, torch.get_num_threads(), pngs, labels, synthetic, tmp)
    elastic, why = elastic_threshold(checkpoint)
    thresholds = sorted(set(STANDARD_THRESHOLDS) | {elastic})
    log.info("%d PNGs; thresholds %s (elastic %g: %s); server logs in %s", len(pngs), thresholds, elastic, why, tmp)
    single = Requests.build(pngs, labels, tmp)
    batch = Requests.build(pngs, labels, tmp, batch=plan.batch_images)

    try:
        ours = bench_ours(ctx, single, batch, thresholds, elastic)
        systems = dict(ours.pop("systems"))
        systems["fastapi"] = bench_plain(ctx, single, batch)
        if want_litserve(args):
            systems["litserve"] = bench_litserve(ctx, single)
        else:
            log.info("LitServe skipped (%s)", "--no-litserve" if args.no_litserve else "not installed")
    finally:
        for server in [*ctx.early.values(), *ctx.stopping]:  # launched early but not reached (a failure
            server.stop()  # on the way), or stopping
    offline = add_limits(ctx, ours)

    result = {
        "meta": metadata(ctx, started, all_runs(ours, systems)),
        "elastic_threshold": {"threshold": elastic, "why": why},
        "systems_settings": {
            "ours": ours["settings"], "fastapi": systems["fastapi"]["settings"],
            **({"litserve": systems["litserve"]["settings"]} if "litserve" in systems else {}),
        },
        "tuning": {"ours": ours["tuning"], **{k: systems[k]["tuning"] for k in ("fastapi", "litserve") if k in systems}},
        "thresholds": ours["single"],
        "batch_endpoint": ours["batch"],
        "offline": offline,
        "systems": systems,
    }
    add_calibrated_accuracy(result, checkpoint)
    result["goals"] = report.goals(result)
    paths = report.write(result, out)
    log.info("wrote %s", ", ".join(map(str, paths)))
    print(report.headline(result))
    return result


if __name__ == "__main__":
    main()
