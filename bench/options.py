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
