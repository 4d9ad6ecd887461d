"""The machine a result was measured on, described once for every benchmark (``bench.serving``,
``bench.kernel``, ``bench.engine_core``): their result files are named by :func:`machine_name` and
open their metadata with :func:`describe`, so that figures from one machine line up across files."""
from __future__ import annotations

import json
import os
import platform
import re
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch


def package_version(package: str) -> str:
    """The installed version of a distribution, or "not installed" (a peer left out, say)."""
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo; elsewhere what ``platform`` knows)."""
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def usable_cores() -> int:
    """The cores this process may run on: a run confined to a share of the machine counts that share."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def device_name(device: str | torch.device) -> str:
    """The GPU's name for a CUDA device (e.g. "NVIDIA H100 80GB HBM3"), "cpu" otherwise."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def machine_name(device: str | torch.device) -> str:
    """The result files' name for the machine: the GPU's name as a slug, or ``cpu-<N>core``."""
    name = f"cpu-{usable_cores()}core" if torch.device(device).type != "cuda" else device_name(device)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def write_result(results: dict, out: str | Path, kind: str, device: str = "cpu") -> Path:
    """``results`` as ``<out>/<date>-<machine>-<kind>.json``; returns the path (printed by the caller)."""
    path = Path(out) / f"{datetime.now(UTC):%Y-%m-%d}-{machine_name(device)}-{kind}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


def describe(device: str | torch.device, machine: str | None = None) -> dict:
    """The fields every result file's metadata starts with; ``machine`` overrides the derived name."""
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine or machine_name(device),
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "device": device_name(device),
        "python": platform.python_version(),
    }
