"""Issue #14's GPU run: the ImageNet-size preset served over HTTP by several API servers in front of
the engine core on the GPU, per threshold, against its analytic limit on the same device.

    python -m bench.gpu [--preset deit-s-3-6] [--seconds 6] [--connections 256] [--serve-args '...']

- the model: random weights of the preset, seeded, with a calibration profile swept on synthetic
  images (``bench.serving.random_checkpoint``), so the within-0.3-pp threshold exists (its
  accuracies mean nothing: the figures here are throughput, not accuracy);
- the requests: ``--images`` smooth random photos of ``--image-size`` px encoded as JPEG (quality
  90), single-image multipart uploads, which every API server decodes, resizes to 248 and crops to
  224 as for ImageNet;
- per threshold (0, the within-0.3-pp threshold, 1): a wrk point (``--wrk-threads`` threads), the
  engine's mean batch per stage and the share sent on from /metrics, and the analytic limit from
  offline stage timings on the GPU at those batches (``bench.limit``): served / limit says how much
  of what the model allows the server delivers.

Every server setting is at its default (API servers ``auto``: all cores but the engine's) unless
``--serve-args`` says otherwise. Writes ``<out>/<date>-<machine>-gpu-serving.json``; reported,
never asserted. ``--smoke`` runs the same steps on the CPU with a tiny model in seconds (CI).
"""

from __future__ import annotations

import argparse
import io
import json
import shlex
import shutil
import sys
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench import wrk
from bench.engine_core import add_offline_limits, measure, ours_point
from bench.limit import StageTimer
from bench.loadgen import CONTENT_TYPE, multipart
from bench.machine import describe, write_result
from bench.servers import SystemSpec, process_names, python_command, start
from bench.serving import elastic_threshold, random_checkpoint, synthetic_images
from model.checkpoint import load_checkpoint
from service.images import decode_image


def jpegs(n: int, size: int, channels: int, quality: int = 90) -> list[bytes]:
    """n smooth random images of size x size, JPEG-encoded: what a camera upload costs to decode."""
    images, _ = synthetic_images(n, size, channels, 2)
    out = []
    for image in images:
        array = image.permute(1, 2, 0).numpy()  # (H, W, C) uint8
        buffer = io.BytesIO()
        Image.fromarray(array[..., 0] if channels == 1 else array).save(buffer, format="JPEG", quality=quality)
        out.append(buffer.getvalue())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="deit-s-3-6")
    p.add_argument("--device", default="cuda")
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--connections", type=int, default=256)
    p.add_argument("--wrk-threads", type=int, default=4)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--image-size", type=int, default=256, help="side of the uploaded JPEGs before resize and crop")
    p.add_argument("--serve-args", default="", help="extra flags for our server, e.g. '--api-servers 8' (recorded)")
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU, one-second points: checks the steps run")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)
    if args.smoke:
        args.preset, args.device, args.seconds, args.connections, args.wrk_threads, args.images = (
            "tiny-test", "cpu", 1.0, 8, 1, 16)  # fmt: skip
        args.image_size = 20

    work = Path(tempfile.mkdtemp(prefix="thinkingvit-gpu-bench-"))
    checkpoint = random_checkpoint(args.preset, work / "random.safetensors")
    loaded = load_checkpoint(checkpoint, device=torch.device(args.device))
    cfg = loaded.model.config
    uploads = jpegs(args.images, args.image_size, cfg.in_chans)
    decoded = torch.from_numpy(np.stack([decode_image(b, loaded.preprocess, 10**8) for b in uploads]))  # (n, C, H, W)
    elastic, why = elastic_threshold(checkpoint)
    bodies = [multipart([data], "file") for data in uploads]
    script = wrk.write_script(bodies, CONTENT_TYPE, work)
    point = partial(measure, script=script, seconds=args.seconds, connections=args.connections,
                    threads=args.wrk_threads, body=bodies[0])  # fmt: skip
    serve = python_command("-m", "service.cli", "serve", "--checkpoint", str(checkpoint), "--device", args.device,
                           "--log-level", "warning", *shlex.split(args.serve_args))  # fmt: skip
    results: dict = {
        "meta": describe(args.device) | {"kind": "gpu-serving"},
        "preset": args.preset, "jpeg": {"images": args.images, "side_px": args.image_size,
                                        "mean_kb": sum(map(len, uploads)) / len(uploads) / 1024},
        "elastic_threshold": {"threshold": elastic, "why": why}, "serve_args": args.serve_args,
        "wrk": {"version": wrk.version(), "threads": args.wrk_threads, "connections": args.connections,
                "seconds": wrk.whole_seconds(args.seconds)},
    }  # fmt: skip
    ours = start(SystemSpec("ours", serve, "/readyz"), work)
    try:
        info = ours_info(ours)
        results["server"] = {"startup_s": ours.startup_s, **info}
        rows = {}
        for threshold in sorted({0.0, elastic, 1.0}):
            rows[f"ours@{threshold:g}"] = row = ours_point(ours, threshold, point)
            print(f"threshold {threshold:g}: {row['images_per_s']:.0f} images/s, p50 {row['p50_ms']:.1f} ms, "
                  f"p99 {row['p99_ms']:.1f} ms, batches {row['mean_batch']}, sent on {row['sent_on']:.2f}", flush=True)  # fmt: skip
    finally:
        ours.stop()
    add_offline_limits(list(rows.values()), StageTimer(loaded.model, decoded, torch.device(args.device)))
    for row in rows.values():
        row["served_over_limit"] = row["images_per_s"] / row["limit_images_per_s"]
    results["thresholds"] = rows
    print(json.dumps({k: {m: round(v[m], 3) for m in ("images_per_s", "limit_images_per_s", "served_over_limit")}
                      for k, v in rows.items()}, indent=2))  # fmt: skip
    print("wrote", write_result(results, args.out, "gpu-serving", args.device))
    shutil.rmtree(work, ignore_errors=True)
    return 0


def ours_info(server) -> dict:
    """What the running server is: its device (``/v1/model``) and its processes by role, from
    their names (``processes.become_child``)."""
    import httpx

    roles: dict[str, int] = {}
    for name in process_names(server.process.pid).values():
        role = name.rstrip("0123456789").rstrip("-")
        roles[role] = roles.get(role, 0) + 1
    device = httpx.get(f"{server.url}/v1/model", timeout=10).json()["device"]
    return {"device": device, "processes": roles, "api_servers": roles.get("api-server", 0)}


if __name__ == "__main__":
    sys.exit(main())
