"""The benchmark's command-line options, shared by ``python -m bench`` and ``thinkingvit bench``
(a light module: building the CLI's parser must not import torch, httpx or LitServe)."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
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


def add_slo_arguments(p: argparse.ArgumentParser) -> None:
    """``python -m bench.slo`` and ``thinkingvit bench-slo``: open-loop load with and without a latency SLO."""
    p.add_argument("--seconds", type=float, default=10.0, help="measured seconds per open-loop run")
    p.add_argument("--slo-ms", type=float, default=200.0, help="latency_slo_ms of the SLO server")
    p.add_argument("--multipliers", type=float, nargs="+", default=[1, 1.5, 2, 3], help="of the full-model peak")
    p.add_argument("--step-s", type=float, default=10.0, help="length of each phase of the load step")
    p.add_argument("--threshold", default="1", help="what every request asks for: a number, or 'elastic' "
                   "(the cheapest within 0.3 pp of the full model); default 1, the full model, so that N x "
                   "the full-model peak is N times what the engine can serve as asked")
    p.add_argument("--images", type=int, default=512, help="Fashion-MNIST test images cycled through")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--smoke", action="store_true", help="seconds-long runs at 1x and 3x: checks the harness")
