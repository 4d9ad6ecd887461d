"""Train candidate Fashion-MNIST presets side by side (one process each) to choose the shipped one.

    python -m tools.sweep_presets --device cuda --out runs/presets      # all candidates at once
    python -m tools.sweep_presets --only p4-hd16-d6 --device cpu        # one of them

Each candidate is (config, training overrides); results land in OUT/<name>.log and the final
per-stage test accuracies are printed. docs/training-notes.md records what was tried.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from model import config as model_config
from model.config import ThinkingViTConfig

FMNIST = ThinkingViTConfig(img_size=28, patch_size=4, in_chans=1, num_classes=10, depth=6, head_dim=16, stages=(3, 6))
CANDIDATES: dict[str, tuple[ThinkingViTConfig, dict]] = {
    "p4-hd16-d6": (FMNIST, {"epochs": 24}),
    "p4-hd16-d6-ls0": (FMNIST, {"epochs": 24, "label_smoothing": 0.0}),
    "p4-hd16-d8": (replace(FMNIST, depth=8), {"epochs": 15}),
    "p4-hd24-d6": (replace(FMNIST, head_dim=24), {"epochs": 18}),
    "p4-hd32-d4": (replace(FMNIST, head_dim=32, depth=4), {"epochs": 12}),
    "p7-hd32-d6": (replace(FMNIST, head_dim=32, patch_size=7), {"epochs": 20}),
    "p7-hd32-d8": (replace(FMNIST, head_dim=32, patch_size=7, depth=8), {"epochs": 16}),
}


def run_one(name: str, out: Path, device: str, threads: int, data_dir: str | None) -> None:
    from model.data import FASHION_MNIST_DIR, load_fashion_mnist
    from model.preprocess import FASHION_MNIST
    from model.train import TrainSettings, train

    config, overrides = CANDIDATES[name]
    model_config.PRESETS[name] = config
    root = data_dir or FASHION_MNIST_DIR
    settings = TrainSettings(preset=name, threads=threads, **overrides)
    summary = train(settings, load_fashion_mnist("train", root), load_fashion_mnist("test", root), FASHION_MNIST,
                    out / f"{name}.safetensors", progress=False, device=device)
    print(name, "FINAL", summary["final_test_acc"], f"{summary['train_seconds']:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", choices=sorted(CANDIDATES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir")
    parser.add_argument("--out", type=Path, default=Path("runs/presets"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.only:
        run_one(args.only, args.out, args.device, args.threads, args.data_dir)
        return 0
    common = ["--device", args.device, "--threads", str(args.threads), "--out", str(args.out)]
    common += ["--data-dir", args.data_dir] if args.data_dir else []
    procs = [
        subprocess.Popen([sys.executable, "-m", "tools.sweep_presets", "--only", name, *common],
                         stdout=(args.out / f"{name}.log").open("w"), stderr=subprocess.STDOUT)
        for name in CANDIDATES
    ]
    return max(p.wait() for p in procs)


if __name__ == "__main__":
    raise SystemExit(main())
