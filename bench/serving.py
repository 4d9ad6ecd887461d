"""The serving benchmark of issue #7: our server at several thresholds against its analytic limit and
against peers serving the full model, all over HTTP under one load generator.

    python -m bench                         # the shipped model, Fashion-MNIST test PNGs (~6 min on 2 cores)
    python -m bench --smoke                 # a tiny random model, seconds (CI)
    python -m bench --device cuda --preset deit-s-3-6 --synthetic   # ImageNet-size, random weights
    thinkingvit bench ...                   # the same

Steps: (1) our server, one process, every threshold with single-image requests and with the batch
endpoint, reading its /metrics for the batch sizes and the share r of images sent on; (2) the
concurrency sweep and the open-loop Poisson run at 70 % of the sweep's peak, for our server at the
within-0.3-pp threshold and at threshold 1, the per-request FastAPI peer and LitServe (batching
tuned on a small grid first); (3) in-process per-stage timings at the server's batch sizes for the
analytic limit. Writes ``<out>/<date>-<machine>.{json,md}`` and two PNG plots.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import httpx
import torch

from bench import report
from bench.options import add_arguments
from bench.limit import StageTimer, analytic_limit, scrape, server_stats
from bench.loadgen import LoadGenerator, Workload
from bench.servers import RunningServer, SystemSpec, python_command, start

log = logging.getLogger("bench")
STANDARD_THRESHOLDS = (0.0, 0.5, 0.8, 0.9, 1.0)
FALLBACK_ELASTIC_THRESHOLD = 0.9  # when the checkpoint has no calibration profile
OPEN_LOOP_LOAD = 0.7
SYNTHETIC_IMAGES = 512  # distinct synthetic PNGs; requests cycle through them


@dataclass(frozen=True)
class Plan:
    """How long and how hard each part runs."""

    images: int = 10_000  # test images turned into PNGs (requests cycle through them)
    concurrency: int = 64  # closed-loop clients of the per-threshold runs
    warmup_s: float = 1.0
    measure_s: float = 8.0
    batch_images: int = 32  # images per /classify/batch request
    batch_concurrency: int = 4
    sweep: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    sweep_warmup_s: float = 0.5
    sweep_measure_s: float = 4.0
    open_loop_warmup_s: float = 1.0
    open_loop_measure_s: float = 10.0
    litserve_grid: tuple[tuple[int, float, int], ...] = ((32, 2.0, 1), (32, 10.0, 1), (16, 5.0, 2))
    tune_measure_s: float = 3.0
    min_requests: int = 20  # a closed-loop window stays open until this many were answered in it
    timing_s: float = 0.25  # offline: least seconds timed per (stage, batch)


FULL = Plan()
SMOKE = Plan(
    images=128, concurrency=4, warmup_s=0.2, measure_s=0.5, batch_images=8, batch_concurrency=2,
    sweep=(1, 8), sweep_warmup_s=0.2, sweep_measure_s=0.5, open_loop_warmup_s=0.2,
    open_loop_measure_s=0.5, litserve_grid=((8, 2.0, 1),), tune_measure_s=0.5, min_requests=4,
    timing_s=0.02,
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


# ------------------------------------------------------------------------------------ inputs


def resolve_checkpoint(args, tmp: Path) -> Path:
    """The checkpoint to serve: --checkpoint, a random one for --preset/--smoke, or the shipped model."""
    if args.checkpoint:
        return Path(args.checkpoint)
    if args.smoke or args.preset:
        return random_checkpoint("tiny-test" if args.smoke else args.preset, tmp / "random.safetensors")
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


def server_env(ctx: Context) -> dict:
    return {"OMP_NUM_THREADS": str(ctx.threads), "PYTHONUNBUFFERED": "1"}


def ours_spec(ctx: Context, name: str = "ours") -> SystemSpec:
    from service.settings import Settings

    flags = ["--checkpoint", str(ctx.checkpoint), "--device", ctx.device, "--log-level", "warning"]
    extra = shlex.split(ctx.args.serve_args or "")
    defaults = {name: field.default for name, field in Settings.model_fields.items() if name not in ("host", "port")}
    recorded = {**defaults, "checkpoint": str(ctx.checkpoint), "device": ctx.device, "log_level": "warning",
                "extra_flags": extra}  # fmt: skip
    return SystemSpec(
        name, python_command("-m", "service.cli", "serve", *flags, *extra), "/readyz",
        {"system": "thinkingvit serve (this repo)", **recorded, "torch_threads": ctx.threads},
        server_env(ctx),
    )  # fmt: skip


def plain_spec(ctx: Context) -> SystemSpec:
    flags = ["--checkpoint", str(ctx.checkpoint), "--device", ctx.device, "--threads", str(ctx.threads)]
    return SystemSpec(
        "fastapi", python_command("-m", "bench.peers", "plain", *flags), "/readyz",
        {"system": "FastAPI + uvicorn, model inline in the handler, one request at a time",
         "batching": "none (/classify/batch: the client's batch as one forward)",
         "device": ctx.device, "torch_threads": ctx.threads, "uvicorn_workers": 1},
        server_env(ctx),
    )  # fmt: skip


def litserve_spec(ctx: Context, max_batch: int, timeout_ms: float, workers: int) -> SystemSpec:
    threads = max(1, ctx.threads // workers) if ctx.device == "cpu" else ctx.threads
    flags = [
        "--checkpoint", str(ctx.checkpoint), "--device", ctx.device, "--threads", str(threads),
        "--max-batch-size", str(max_batch), "--batch-timeout-ms", str(timeout_ms), "--workers", str(workers),
    ]  # fmt: skip
    return SystemSpec(
        f"litserve-b{max_batch}-t{timeout_ms:g}ms-w{workers}",
        python_command("-m", "bench.peers", "litserve", *flags), "/health",
        {"system": f"LitServe {_version('litserve')}", "max_batch_size": max_batch,
         "batch_timeout_ms": timeout_ms, "workers_per_device": workers, "num_api_servers": 1,
         "fast_queue": False, "device": ctx.device, "torch_threads_per_worker": threads},
        {**server_env(ctx), "OMP_NUM_THREADS": str(threads)},
    )  # fmt: skip


# ------------------------------------------------------------------------------------ runs


def closed(
    server: RunningServer, work: Workload, concurrency: int, warmup_s: float, measure_s: float, min_requests: int
) -> dict:
    gen = LoadGenerator(server.url, server.cpu_seconds)
    summary = gen.closed_loop(work, concurrency, warmup_s, measure_s, min_requests).summary(num_stages=2)
    return {"concurrency": concurrency, **summary}


def open_loop(server: RunningServer, work: Workload, rate: float, plan: Plan) -> dict:
    gen = LoadGenerator(server.url, server.cpu_seconds)
    run = gen.open_loop(work, rate, plan.open_loop_warmup_s, plan.open_loop_measure_s, plan.min_requests)
    summary = run.summary(num_stages=2)
    lat = summary["latency_ms"]
    return {"offered_rate": rate, **summary, "p99_over_p50": report.ratio(lat["p99"], lat["p50"])}


def threshold_run(server: RunningServer, work: Workload, threshold: float, concurrency: int, plan: Plan) -> dict:
    metrics = lambda: scrape(httpx.get(server.url + "/metrics", timeout=10).text)  # noqa: E731
    before = metrics()
    row = closed(
        server, work.with_query(f"?threshold={threshold:g}"), concurrency, plan.warmup_s, plan.measure_s,
        plan.min_requests,
    )
    return {"threshold": threshold, **row, "server": server_stats(before, metrics(), num_stages=2)}


def sweep_and_open_loop(ctx: Context, server: RunningServer, work: Workload, label: str) -> dict:
    plan = ctx.plan
    points = []
    for c in plan.sweep:
        points.append(closed(server, work, c, plan.sweep_warmup_s, plan.sweep_measure_s, plan.min_requests))
        log.info("  %s c=%d: %.0f img/s p50 %.1f ms p99 %.1f ms", label, c, points[-1]["images_per_s"],
                 points[-1]["latency_ms"]["p50"], points[-1]["latency_ms"]["p99"])
    peak = max(points, key=lambda p: p["images_per_s"])
    if not peak["requests"]:
        raise RuntimeError(f"{label}: no successful response ({peak['errors']}); server log:\n{server.log_tail()}")
    rate = OPEN_LOOP_LOAD * peak["requests_per_s"]
    poisson = open_loop(server, work, rate, plan)
    log.info("  %s open loop at %.0f req/s: p50 %.1f ms p99 %.1f ms (p99/p50 %.2f)", label, rate,
             poisson["latency_ms"]["p50"], poisson["latency_ms"]["p99"], poisson["p99_over_p50"])
    return {"sweep": points, "peak": peak, "open_loop": poisson}


def bench_ours(ctx: Context, single: Workload, batch: Workload, thresholds: list[float], elastic: float) -> dict:
    plan, out = ctx.plan, {"single": [], "batch": [], "systems": {}}
    server = start(ours_spec(ctx), ctx.log_dir)
    log.info("our server ready in %.1f s at %s", server.startup_s, server.url)
    try:
        for t in thresholds:
            out["single"].append(threshold_run(server, single, t, plan.concurrency, plan))
            log.info("  threshold %g: %s", t, _brief(out["single"][-1]))
        for t in thresholds:
            out["batch"].append(threshold_run(server, batch, t, plan.batch_concurrency, plan))
            log.info("  batch endpoint, threshold %g: %s", t, _brief(out["batch"][-1]))
        for name, t in ((f"ours@{elastic:g}", elastic), ("ours@1", 1.0)):
            log.info("sweep: %s", name)
            run = sweep_and_open_loop(ctx, server, single.with_query(f"?threshold={t:g}"), name)
            out["systems"][name] = {"threshold": t, "startup_s": server.startup_s, **run}
    finally:
        server.stop()
    return out


def bench_plain(ctx: Context, single: Workload, batch: Workload) -> dict:
    server = start(plain_spec(ctx), ctx.log_dir)
    log.info("per-request FastAPI ready in %.1f s", server.startup_s)
    try:
        run = sweep_and_open_loop(ctx, server, single, "fastapi")
        plan = ctx.plan
        run["batch_endpoint"] = closed(
            server, batch, plan.batch_concurrency, plan.warmup_s, plan.measure_s, plan.min_requests
        )
    finally:
        server.stop()
    return {"startup_s": server.startup_s, **run}


def bench_litserve(ctx: Context, single: Workload) -> dict:
    """Tune batching on the grid (throughput at the sweep's top concurrency), then the full runs."""
    plan, top = ctx.plan, max(ctx.plan.sweep)
    tuning = []
    for max_batch, timeout_ms, workers in plan.litserve_grid if len(plan.litserve_grid) > 1 else ():
        spec = litserve_spec(ctx, max_batch, timeout_ms, workers)
        server = start(spec, ctx.log_dir)
        try:
            row = closed(server, single, top, plan.sweep_warmup_s, plan.tune_measure_s, plan.min_requests)
        finally:
            server.stop()
        tuning.append({**spec.settings, "images_per_s": row["images_per_s"], "p50_ms": row["latency_ms"]["p50"]})
        log.info("  LitServe %s: %.0f img/s at c=%d", spec.name, row["images_per_s"], top)
    if tuning:
        best = max(tuning, key=lambda r: r["images_per_s"])
        spec = litserve_spec(ctx, best["max_batch_size"], best["batch_timeout_ms"], best["workers_per_device"])
    else:
        spec = litserve_spec(ctx, *plan.litserve_grid[0])
    server = start(spec, ctx.log_dir)
    log.info("LitServe (%s) ready in %.1f s", spec.name, server.startup_s)
    try:
        run = sweep_and_open_loop(ctx, server, single, "litserve")
    finally:
        server.stop()
    return {"startup_s": server.startup_s, "tuning": tuning, "settings": spec.settings, **run}


def add_limits(ctx: Context, ours: dict) -> dict:
    """In-process per-stage timings at the batch sizes each run saw; limit and served/limit."""
    from model.checkpoint import load_checkpoint
    from model.train import normalise

    loaded = load_checkpoint(ctx.checkpoint, device=ctx.device)
    loaded.model.set_attention_backend("auto")
    sizes = [r["server"]["stages"][s]["mean_batch"] for r in ours["single"] + ours["batch"] for s in (0, 1)]
    n = max(1, math.ceil(max(sizes)))
    raw = torch.stack([torch_image(p) for p in ctx.pngs[:n]] * math.ceil(n / len(ctx.pngs[:n])))[:n]
    timer = StageTimer(loaded.model, normalise(raw, loaded.preprocess), torch.device(ctx.device), ctx.plan.timing_s)
    for row in ours["single"] + ours["batch"]:
        s0, s1 = row["server"]["stages"]
        t1 = timer.per_image_s(0, s0["mean_batch"] or 1)
        t2 = timer.per_image_s(1, s1["mean_batch"] or 1)
        limit = analytic_limit(t1, t2, row["server"]["r"])
        row["limit"] = {"t1_ms": 1000 * t1, "t2_ms": 1000 * t2, "r": row["server"]["r"],
                        "images_per_s": limit, "served_over_limit": report.ratio(row["images_per_s"], limit)}  # fmt: skip
    return {"stage_timings": timer.table()}


def torch_image(png_bytes: bytes) -> torch.Tensor:
    import io

    import numpy as np
    from PIL import Image

    array = np.asarray(Image.open(io.BytesIO(png_bytes)))
    array = array[..., None] if array.ndim == 2 else array
    return torch.from_numpy(array.copy()).permute(2, 0, 1)  # (C, H, W) uint8


# ------------------------------------------------------------------------------------ report


def metadata(ctx: Context, started: float) -> dict:
    from model.checkpoint import read_metadata

    meta = read_metadata(ctx.checkpoint)
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": ctx.args.machine or machine_name(ctx.device),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "device": torch.cuda.get_device_name(0) if ctx.device.startswith("cuda") else "cpu",
        "torch_threads": ctx.threads,
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in ("torch", "fastapi", "starlette", "uvicorn", "httpx", "litserve",
                                              "uvloop", "httptools", "pydantic")},
        "uvicorn_loop_http": f"{'uvloop' if _has('uvloop') else 'asyncio'} + "
                             f"{'httptools' if _has('httptools') else 'h11'} (uvicorn 'auto', every server)",
        "checkpoint": _shown_path(ctx.checkpoint),
        "preset": meta.get("preset"),
        "config": meta.get("config"),
        "images": "synthetic (random labels)" if ctx.synthetic else "Fashion-MNIST test split",
        "image_count": len(ctx.pngs),
        "smoke": bool(ctx.args.smoke),
        "plan": asdict(ctx.plan),
        "load_generator": "bench/loadgen.py: one asyncio process, a minimal HTTP/1.1 keep-alive client, "
                          "requests pre-built, every response parsed and checked against its label",
        "wall_s": round(time.perf_counter() - started, 1),
    }  # fmt: skip


def _shown_path(path: Path) -> str:
    """Repository paths relative to the repository; others as given."""
    try:
        return str(path.resolve().relative_to(Path(__file__).resolve().parents[1]))
    except ValueError:
        return str(path)


def machine_name(device: str) -> str:
    import re

    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(0)
    else:
        name = f"cpu-{os.cpu_count()}core"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _brief(row: dict) -> str:
    lat = row["latency_ms"]
    return (f"{row['images_per_s']:.0f} img/s, acc {row['accuracy']:.2f} %, p50 {lat['p50']:.1f} ms, "
            f"p99 {lat['p99']:.1f} ms, r {row['server']['r']:.2f}, client {row['client_cpu_cores']:.2f} cores")


# ------------------------------------------------------------------------------------ main


def elastic_threshold(checkpoint: Path) -> tuple[float, str]:
    """The cheapest calibrated threshold within 0.3 pp of the full model's accuracy."""
    from model.checkpoint import read_metadata
    from model.evaluate import ACCURACY_TOLERANCE_PP, threshold_within

    calibration = read_metadata(checkpoint).get("calibration")
    if calibration:
        target = calibration["stage_accuracy"][-1] - ACCURACY_TOLERANCE_PP
        t = threshold_within(calibration["rows"], target)
        if t is not None:
            return float(t), f"within {ACCURACY_TOLERANCE_PP} pp of the full model on {calibration['split']}"
    return FALLBACK_ELASTIC_THRESHOLD, "no calibration profile: fixed fallback"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    return run(parse_args(argv))


def run(args: argparse.Namespace) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    started = time.perf_counter()
    plan = SMOKE if args.smoke else FULL
    plan = replace(plan, **{k: v for k, v in (("concurrency", args.concurrency), ("measure_s", args.measure_s)) if v})
    tmp = Path(tempfile.mkdtemp(prefix="thinkingvit-bench-"))
    checkpoint = resolve_checkpoint(args, tmp)
    pngs, labels, synthetic = load_images(args, plan, checkpoint)
    ctx = Context(args, plan, checkpoint, args.device, torch.get_num_threads(), pngs, labels, synthetic, tmp)
    elastic, why = elastic_threshold(checkpoint)
    thresholds = sorted(set(STANDARD_THRESHOLDS) | {elastic})
    log.info("%d PNGs; thresholds %s (elastic %g: %s); server logs in %s", len(pngs), thresholds, elastic, why, tmp)
    single = Workload.build(pngs, labels)
    batch = Workload.build(pngs, labels, batch=plan.batch_images)

    ours = bench_ours(ctx, single, batch, thresholds, elastic)
    systems = dict(ours.pop("systems"))
    systems["fastapi"] = bench_plain(ctx, single, batch)
    if args.no_litserve or not _has("litserve"):
        log.info("LitServe skipped (%s)", "--no-litserve" if args.no_litserve else "not installed")
    else:
        systems["litserve"] = bench_litserve(ctx, single)
    offline = add_limits(ctx, ours)

    result = {
        "meta": metadata(ctx, started),
        "elastic_threshold": {"threshold": elastic, "why": why},
        "systems_settings": {
            "ours": ours_spec(ctx).settings, "fastapi": plain_spec(ctx).settings,
            **({"litserve": systems["litserve"]["settings"]} if "litserve" in systems else {}),
        },
        "thresholds": ours["single"],
        "batch_endpoint": ours["batch"],
        "offline": offline,
        "systems": systems,
    }
    result["goals"] = report.goals(result)
    paths = report.write(result, args.out or (tmp if args.smoke else Path(__file__).parent / "results"))
    log.info("wrote %s", ", ".join(map(str, paths)))
    print(report.headline(result))
    return result


if __name__ == "__main__":
    main()
