"""Sliced-head attention: our Triton kernel vs SDPA on strided views vs slice-and-copy, then
end-to-end stage throughput of the model with each attention backend.

    python -m bench.kernel              # deit-s-3-6 stages, batch 1/32/256, bf16 on CUDA
    python -m bench.kernel --sweep      # also time each kernel config per shape (tuning)
    python -m bench.kernel --smoke      # tiny preset and batches, seconds on a CPU

Figures are reported, never asserted. On CPU the Triton kernel is left out (the interpreter times
numpy, not a kernel); everything else runs so the script cannot rot. Results go to
``<out>/kernel-<machine>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.machine import describe, package_version
from kernels.attention import qkv_views, sdpa_attention, sliced_attention
from model.thinkingvit import ThinkingViTConfig, create_model, get_config

FORCED_SDPA = {
    "sdpa-flash": SDPBackend.FLASH_ATTENTION,
    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa-math": SDPBackend.MATH,
}
SMOKE = ThinkingViTConfig(  # tiny, with a head_dim the kernel takes (tiny-test's 8 is below tl.dot's 16)
    img_size=16, patch_size=4, in_chans=1, num_classes=10, depth=2, head_dim=16, stages=(2, 4)
)
SWEEP = [  # (block_m, block_n, num_warps, num_stages)
    (64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 4, 4), (64, 32, 4, 3), (64, 32, 4, 4),
    (64, 128, 4, 3), (32, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3), (128, 64, 4, 3),
]


def slice_copy_attention(qkv: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """The baseline we replace: authors' (3, k, hd) rows, contiguous copies of q/k/v, SDPA, transpose."""
    B, N, _ = qkv.shape
    qkv = qkv.reshape(B, N, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)  # (3, B, k, N, hd)
    q, k, v = qkv.contiguous().unbind(0)  # each (B, k, N, hd), copied
    out = F.scaled_dot_product_attention(q, k, v)  # (B, k, N, hd)
    return out.transpose(1, 2).reshape(B, N, num_heads * head_dim)  # (B, N, k*hd)


def time_us(fn, device: torch.device, iters: int) -> float | None:
    """Median microseconds per call (CUDA: events, L2 flushed between calls); None if unsupported."""
    try:
        if device.type == "cuda":
            from triton.testing import do_bench

            return 1e3 * do_bench(fn, warmup=10 * iters, rep=50 * iters, return_mode="median")
        fn()
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return 1e6 * statistics.median(times)
    except RuntimeError as err:  # e.g. a forced SDPA backend that does not take these inputs
        if "out of memory" in str(err):
            raise
        return None


def forced(name: str):
    return sdpa_kernel(FORCED_SDPA[name]) if name in FORCED_SDPA else contextlib.nullcontext()


def kernel_variants(device: torch.device) -> list[str]:
    triton = ["triton"] if device.type == "cuda" else []
    return triton + ["sdpa", *FORCED_SDPA, "slice-copy"]


def bench_kernels(args, cfg, device, dtype) -> list[dict]:
    """Attention alone on a stage's qkv output (B, N, 3*k*hd): microseconds and GB/s per variant."""
    N, hd = cfg.num_tokens, cfg.head_dim
    rows = []
    for heads in cfg.stages:
        for B in args.batches:
            qkv = torch.randn(B, N, 3 * heads * hd, device=device, dtype=dtype)
            q, k, v = qkv_views(qkv, heads, hd)  # each (B, N, k, hd)
            nbytes = 4 * B * N * heads * hd * qkv.element_size()  # read q, k, v; write out
            fns = {"sdpa": lambda: sdpa_attention(q, k, v)}
            fns |= {name: fns["sdpa"] for name in FORCED_SDPA}
            fns["slice-copy"] = lambda: slice_copy_attention(qkv, heads, hd)
            if device.type == "cuda":
                from kernels.triton_attention import triton_attention

                fns["triton"] = lambda: triton_attention(q, k, v)
            row = {"heads": heads, "batch": B, "tokens": N, "head_dim": hd, "us": {}, "gbps": {}}
            for name in kernel_variants(device):
                with forced(name):
                    us = time_us(fns[name], device, args.iters)
                row["us"][name] = us
                row["gbps"][name] = None if us is None else nbytes / us / 1e3
            if args.sweep and device.type == "cuda":
                row["sweep_us"] = sweep(q, k, v, args.iters, device)
            rows.append(row)
            print(_kernel_line(row), flush=True)
    return rows


def sweep(q, k, v, iters, device) -> dict[str, float]:
    from kernels.triton_attention import KernelConfig, triton_attention

    out = {}
    for c in SWEEP:
        cfg = KernelConfig(*c)
        out["-".join(map(str, c))] = time_us(lambda: triton_attention(q, k, v, config=cfg), device, iters)
    return out


def bench_host(args, cfg, device, dtype) -> dict[str, float]:
    """Host microseconds per attention call at batch 1, the first stage: what a launch-bound
    (eager, small batch) forward pays. On CUDA the kernels are shorter than the launches."""
    heads, hd, n = cfg.stages[0], cfg.head_dim, 50 * args.iters
    qkv = torch.randn(1, cfg.num_tokens, 3 * heads * hd, device=device, dtype=dtype)
    fns = {"sdpa": lambda: sliced_attention(qkv, heads, hd, "sdpa")}
    if device.type == "cuda":
        from kernels import triton_attention as ta

        fns["triton"] = lambda: sliced_attention(qkv, heads, hd, "triton")
        fns["triton-binder"] = lambda: (ta._COMPILED.clear(), sliced_attention(qkv, heads, hd, "triton"))
    out = {}
    for name, fn in fns.items():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(n):
            fn()
        out[name] = 1e6 * (time.perf_counter() - start) / n
        if device.type == "cuda":
            torch.cuda.synchronize()
    print("host us/call:", ", ".join(f"{k} {v:.1f}" for k, v in out.items()), flush=True)
    return out


def bench_model(args, cfg, device, dtype) -> list[dict]:
    """Images per second of ``forward_stage`` for each stage, batch and attention backend."""
    model = create_model(cfg).to(device=device, dtype=dtype).eval()
    rows = []
    backends = (["triton"] if device.type == "cuda" else []) + ["sdpa", *FORCED_SDPA]
    with torch.inference_mode():
        for B in args.batches:
            images = torch.randn(B, cfg.in_chans, cfg.img_size, cfg.img_size, device=device, dtype=dtype)
            embedded = model.embed(images)  # (B, N, D)
            recycled = [None]
            for stage in range(model.num_stages - 1):
                recycled.append(model.forward_stage(stage, embedded, recycled[-1]).tokens)
            for stage in range(model.num_stages):
                row = {"stage": stage, "heads": cfg.stages[stage], "batch": B, "img_per_s": {}}
                for _ in range(2):  # two rounds, best of each: launch-bound timings drift with order
                    for name in backends:
                        model.set_attention_backend("triton" if name == "triton" else "sdpa")
                        with forced(name):
                            us = time_us(
                                lambda: model.forward_stage(stage, embedded, recycled[stage]), device, args.iters
                            )
                        best = row["img_per_s"].get(name)
                        row["img_per_s"][name] = None if us is None else max(B / us * 1e6, best or 0.0)
                rows.append(row)
                print(_model_line(row), flush=True)
    model.set_attention_backend(None)
    return rows


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def _kernel_line(row: dict) -> str:
    cells = ", ".join(f"{k} {_fmt(v, '.1f')}" for k, v in row["us"].items())
    return f"k={row['heads']} B={row['batch']}: {cells} us"


def _model_line(row: dict) -> str:
    cells = ", ".join(f"{k} {_fmt(v, '.0f')}" for k, v in row["img_per_s"].items())
    return f"stage {row['stage']} (k={row['heads']}) B={row['batch']}: {cells} img/s"


def to_markdown(result: dict) -> str:
    meta = result["meta"]
    variants = list(result["kernels"][0]["us"]) if result["kernels"] else []
    lines = [
        f"# Sliced-head attention benchmark: {meta['machine']}",
        "",
        f"{meta['device']} ({meta['cpu']}, {meta['cores']} cores); torch {meta['torch']}, triton {meta['triton']}; {meta['dtype']}; "
        f"preset {meta['preset']}; {meta['date']}. Median per call; CUDA times use "
        "`triton.testing.do_bench` (L2 flushed between calls).",
        "",
        "## Attention alone: microseconds (effective GB/s: q, k, v read once, output written once)",
        "",
        "| k | batch | " + " | ".join(variants) + " |",
        "|---|---|" + "---|" * len(variants),
    ]
    for r in result["kernels"]:
        cells = [
            "n/a" if r["us"][v] is None else f"{r['us'][v]:.1f} ({r['gbps'][v]:.0f})" for v in variants
        ]
        lines.append(f"| {r['heads']} | {r['batch']} | " + " | ".join(cells) + " |")
    sweeps = [r for r in result["kernels"] if "sweep_us" in r]
    if sweeps:
        configs = list(sweeps[0]["sweep_us"])
        lines += ["", "## Kernel configs (BLOCK_M-BLOCK_N-warps-stages): microseconds", ""]
        lines += ["| k | batch | " + " | ".join(configs) + " |", "|---|---|" + "---|" * len(configs)]
        for r in sweeps:
            cells = [_fmt(r["sweep_us"][c], ".1f") for c in configs]
            lines.append(f"| {r['heads']} | {r['batch']} | " + " | ".join(cells) + " |")
    host = ", ".join(f"{k} {v:.1f}" for k, v in result["host_us_per_call"].items())
    lines += ["", f"Host time per attention call (batch 1, stage 0, launch-bound): {host} us."]
    lines += ["`triton-binder` goes through Triton's argument binder on every call (no kept binary)."]
    backends = list(result["model"][0]["img_per_s"]) if result["model"] else []
    lines += ["", "## Model stage throughput: images per second", ""]
    lines += ["| stage (k) | batch | " + " | ".join(backends) + " |", "|---|---|" + "---|" * len(backends)]
    for r in result["model"]:
        cells = [_fmt(r["img_per_s"][b], ".0f") for b in backends]
        lines.append(f"| {r['stage']} ({r['heads']}) | {r['batch']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="deit-s-3-6")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    p.add_argument("--iters", type=int, default=None, help="timing effort (CUDA: x10 ms of repeats)")
    p.add_argument("--sweep", action="store_true", help="also time every kernel config in SWEEP")
    p.add_argument("--smoke", action="store_true", help="tiny preset and batches: checks the script runs")
    p.add_argument("--skip-model", action="store_true")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--machine", default=None, help="name in the result files (default: the device's)")
    args = p.parse_args(argv)
    if args.smoke:
        args.preset, args.batches = "smoke", [1, 2]
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # CPU bf16 GEMMs crawl
    args.iters = args.iters or (2 if args.smoke or device.type == "cpu" else 4)
    warnings.filterwarnings("ignore", message=".*(kernel|Flash|Memory efficient|cuDNN).*")
    meta = describe(device, args.machine) | {
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "dtype": str(dtype).removeprefix("torch."),
        "preset": args.preset,
    }
    torch.manual_seed(0)
    cfg = SMOKE if args.smoke else get_config(args.preset)
    result = {"meta": meta, "kernels": bench_kernels(args, cfg, device, dtype)}
    result["host_us_per_call"] = bench_host(args, cfg, device, dtype)
    result["model"] = [] if args.skip_model else bench_model(args, cfg, device, dtype)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"kernel-{meta['machine']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(to_markdown(result))
    print(f"wrote {stem}.json and {stem}.md")
    return result


if __name__ == "__main__":
    main()
