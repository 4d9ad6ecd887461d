"""The ``thinkingvit`` command: info, train, eval, serve, classify, bench.

Building the parser imports no torch (``thinkingvit --help`` is instant): heavy imports stay inside
the commands. A user's mistake is one line on stderr and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys

DESCRIPTION = (
    "ThinkingViT, a nested Vision Transformer with early exit: inspect, train and evaluate "
    "checkpoints, serve one over HTTP, and classify images with a running server."
)


class UsageError(Exception):
    """A command-line mistake found after parsing (e.g. checkpoints that do not fit together)."""


class HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, unless it has none (None, or an on/off switch)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or (action.default is False and action.nargs == 0):
            return action.help
        return super()._get_help_string(action)


def cmd_info(args) -> int:
    from model.checkpoint import load_checkpoint
    from model.compute import cumulative_gmacs, stage_gmacs

    loaded = load_checkpoint(args.checkpoint, preset=args.preset)
    cfg = loaded.model.config
    info = {
        "path": str(args.checkpoint),
        "source_layout": loaded.source_layout,
        "parameters": sum(p.numel() for p in loaded.model.parameters()),
        "stage_heads": list(cfg.stages),
        "stage_gmacs": [round(g, 4) for g in stage_gmacs(cfg)],
        "cumulative_gmacs": [round(g, 4) for g in cumulative_gmacs(cfg)],
        "metadata": loaded.metadata,
    }
    json.dump(info, sys.stdout, indent=2)
    print()
    return 0


def load_dataset(args, split: str, size: int, channels: int):
    from model.data import FASHION_MNIST_DIR, load_fashion_mnist, load_image_folder

    if args.image_folder:
        return load_image_folder(f"{args.image_folder}/{split}", size, channels)
    return load_fashion_mnist(split, args.data_dir or FASHION_MNIST_DIR)


def cmd_train(args) -> int:
    from dataclasses import fields
    from pathlib import Path

    from model.preprocess import FASHION_MNIST, Preprocess
    from model.thinkingvit import get_config
    from model.train import TrainSettings, train

    settings = TrainSettings(**{f.name: getattr(args, f.name) for f in fields(TrainSettings)})
    cfg = get_config(settings.preset)
    if args.image_folder:
        pre = Preprocess(size=cfg.img_size, resize=cfg.img_size, crop_pct=1.0, interpolation="bilinear",
                         mean=(0.5,) * cfg.in_chans, std=(0.5,) * cfg.in_chans, channels=cfg.in_chans)
    else:
        pre = FASHION_MNIST
    train_data = load_dataset(args, "train", cfg.img_size, cfg.in_chans)
    test_data = load_dataset(args, "test", cfg.img_size, cfg.in_chans)
    summary = train(settings, train_data, test_data, pre, Path(args.output), max_steps=args.max_steps)
    print(json.dumps({"output": args.output, "final_test_acc": summary["final_test_acc"],
                      "train_seconds": summary["train_seconds"]}))
    return 0


def cmd_eval(args) -> int:
    from pathlib import Path

    from model.checkpoint import load_checkpoint, save_checkpoint
    from model.evaluate import SWEEP_LABEL, calibration_profile, default_thresholds, sweep, write_outputs

    loaded = load_checkpoint(args.checkpoint, preset=args.preset)
    cfg = loaded.model.config
    data = load_dataset(args, "test", cfg.img_size, cfg.in_chans)
    if args.subset:
        data = data.subset(args.subset)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    thresholds = sorted(set(default_thresholds()) | set(args.threshold or []))
    result = sweep(loaded.model, data, loaded.preprocess, thresholds, speed_images=args.speed_images)
    title = args.title or f"{Path(args.checkpoint).name}: accuracy vs compute"
    compared = {}
    for other_path in args.compare or []:  # e.g. an ablation, swept on the same images and thresholds
        other = load_checkpoint(other_path, preset=args.preset)
        if other.model.config.img_size != cfg.img_size or other.model.config.in_chans != cfg.in_chans:
            raise UsageError(f"{other_path} takes other images than {args.checkpoint}")
        other_result = sweep(other.model, data, other.preprocess, thresholds, speed_images=args.speed_images)
        write_outputs(other_result, Path(args.out_dir) / Path(other_path).stem, title=f"{Path(other_path).name}: accuracy vs compute")
        compared[curve_label(other_path, other.model)] = other_result
    label = curve_label(args.checkpoint, loaded.model) if compared else SWEEP_LABEL
    paths = write_outputs(result, Path(args.out_dir), title, compared, label)
    if args.write_calibration:
        metadata = {**loaded.metadata, "calibration": calibration_profile(result, f"test[:{len(data)}]")}
        save_checkpoint(args.checkpoint, loaded.model, metadata)
    print(json.dumps({"stage_accuracy": result["stage_accuracy"],
                      "within_tolerance_threshold": result["within_tolerance_threshold"],
                      "compared": {k: {"stage_accuracy": r["stage_accuracy"]} for k, r in compared.items()},
                      "outputs": [str(p) for p in paths]}))
    return 0


def curve_label(path: str, model) -> str:
    """A plot legend entry that shows the recycling scale, which is what an alpha ablation changes."""
    from pathlib import Path

    alphas = ", ".join(f"{a.item():+.3f}" for a in model.alpha)
    return f"{Path(path).stem} (alpha {alphas})"


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="folder of the Fashion-MNIST IDX files (default: Debian's dataset-fashion-mnist)")
    p.add_argument("--image-folder", help="own data instead: FOLDER/train/<class>/*.png and FOLDER/test/<class>/*")


def cmd_serve(args) -> int:
    from pydantic import ValidationError

    from service.launcher import run_server

    try:
        settings = serve_settings(args)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        print(f"thinkingvit serve: invalid settings: {problems}", file=sys.stderr)
        return 2
    return run_server(settings)  # 0 drained, 3 startup failed, 4 the engine core died


def serve_settings(args):
    """Settings from the flags given; the rest from THINKINGVIT_* variables or the defaults."""
    from service.settings import Settings

    return Settings(**{k: v for k, v in vars(args).items() if k in Settings.model_fields})


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field; unset flags leave the THINKINGVIT_* variable or the default."""
    from service.settings import Settings

    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = f"THINKINGVIT_{name.upper()}"
        help_text = f"{field.description} (env {env}, default {field.default})"
        if isinstance(field.default, list):
            parser.add_argument(flag, nargs="+", help=help_text, default=argparse.SUPPRESS)
        elif isinstance(field.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text, default=argparse.SUPPRESS)
        else:
            parser.add_argument(flag, help=help_text, default=argparse.SUPPRESS)


def cmd_bench(args) -> int:
    """``python -m bench ARGS`` in this process's place: the benchmark harness lives in a source
    checkout (bench/, not installed), so the serving package never imports it; its own parser reads
    the arguments, ``--help`` included."""
    import os

    os.execv(sys.executable, bench_command(args.bench_args))


def bench_command(bench_args: list[str], folder: str | None = None) -> list[str]:
    """The command that runs the benchmark from ``folder`` (default: the current one), or a
    UsageError saying where it can run: ``python -m`` finds ``bench`` in that folder or on sys.path."""
    import os
    from importlib.machinery import PathFinder

    if PathFinder.find_spec("bench", [folder or os.getcwd(), *sys.path]) is None:
        raise UsageError("the benchmark runs from a source checkout (bench/ is not installed): "
                         "run it in the repository's folder")
    return [sys.executable, "-m", "bench", *bench_args]


def cmd_classify(args) -> int:
    from service.client import run

    return run(args)


def probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1]")
    return value


def build_parser() -> argparse.ArgumentParser:
    from model.train_settings import TrainSettings

    parser = argparse.ArgumentParser(prog="thinkingvit", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, description=summary, formatter_class=HelpWithDefaults)

    p = command("info", "print a checkpoint's metadata, parameter count and GMACs as JSON")
    p.add_argument("checkpoint", help="our safetensors file, or an authors' v2 safetensors / v1 .pth.tar")
    p.add_argument("--preset", help="config for checkpoints without metadata (else inferred from the shapes)")
    p.set_defaults(func=cmd_info)

    defaults = TrainSettings()
    p = command("train", "train a ThinkingViT (Fashion-MNIST by default); resumable")
    p.add_argument("--preset", default=defaults.preset, help="model size and stages (model.PRESETS)")
    p.add_argument("--epochs", type=int, default=defaults.epochs, help="passes over the training set")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="images per optimiser step, split over the workers")
    p.add_argument("--lr", type=float, default=defaults.lr, help="peak AdamW learning rate (warm-up, then cosine decay)")
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="AdamW weight decay")
    p.add_argument("--warmup-epochs", type=float, default=defaults.warmup_epochs, help="linear learning-rate warm-up, in epochs")
    p.add_argument("--label-smoothing", type=float, default=defaults.label_smoothing,
                   help="label smoothing of the loss (0.1 caps confidence near 0.78 on 10 classes)")
    p.add_argument("--pad-crop", type=int, default=defaults.pad_crop, help="random crop after padding by this many pixels (0: off)")
    p.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=defaults.hflip, help="random horizontal flips")
    p.add_argument("--erase-prob", type=float, default=defaults.erase_prob, help="probability of random erasing per image")
    p.add_argument("--seed", type=int, default=defaults.seed, help="seed of the weights, batches and augmentation")
    p.add_argument("--threads", type=int, default=defaults.threads,
                   help="torch threads in all, split over the workers (0 = one per core)")
    p.add_argument("--workers", type=int, default=defaults.workers,
                   help="data-parallel CPU processes, each training on its share of every batch (1 = one process)")
    p.add_argument("--freeze-alpha", action="store_true", help="ablation: no token recycling")
    p.add_argument("--eval-every", type=int, default=defaults.eval_every,
                   help="test accuracy every N epochs and after the last (a full Fashion-MNIST test pass: ~22 s on 2 cores, ~8 %% of an epoch)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimiser steps (smoke runs)")
    p.add_argument("--output", default="runs/model.safetensors", help="checkpoint to write; OUTPUT.state.pt holds the state to resume from")
    add_data_arguments(p)
    p.set_defaults(func=cmd_train)

    p = command("eval", "threshold sweep on the test split: JSON, CSV and a plot")
    p.add_argument("checkpoint", help="checkpoint to sweep")
    p.add_argument("--preset", help="config for checkpoints without metadata (else inferred from the shapes)")
    p.add_argument("--out-dir", default="runs/eval", help="folder for sweep.json, sweep.csv and sweep.png")
    p.add_argument("--subset", type=int, help="only the first N test images")
    p.add_argument("--speed-images", type=int, default=2000, help="images timed per threshold")
    p.add_argument("--threshold", type=float, action="append", help="extra threshold to evaluate; repeatable")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--write-calibration", action="store_true", help="store the sweep in the checkpoint as its calibration profile")
    p.add_argument("--compare", action="append", metavar="CHECKPOINT",
                   help="also sweep this checkpoint (e.g. an ablation) and plot it on the same axes; repeatable")
    p.add_argument("--title", help="plot title (default: the checkpoint's name)")
    add_data_arguments(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("serve", help="serve a checkpoint over HTTP (see docs/serving.md)")
    add_settings_arguments(p)
    p.set_defaults(func=cmd_serve)

    p = command("classify", "classify images with a running server (POST /classify) and print a table")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files, or folders searched for images")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server")
    p.add_argument("--threshold", type=probability, help="exit threshold in [0, 1] (default: the server's)")
    p.add_argument("--top-k", type=int, help="classes returned per image (default: the server's)")
    p.add_argument("--token", help="bearer token, when the server requires one")
    p.add_argument("--json", action="store_true", help="one JSON line per image (the server's answer) instead of the table")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each answer")
    p.set_defaults(func=cmd_classify)

    # Its arguments pass through untouched to python -m bench (parse_args below), which owns them.
    p = sub.add_parser("bench", add_help=False,
                       help="serving benchmark from a source checkout, = python -m bench (docs/benchmarks.md)")
    p.set_defaults(func=cmd_bench)
    return parser


def is_user_error(error: BaseException) -> bool:
    """A missing or unreadable file, a file that is not a checkpoint, an unreachable server: the
    user's to fix. The error classes are looked up only in modules already loaded (an error can only
    come from one of those), so the check itself imports nothing heavy."""
    kinds: list[type] = [UsageError, OSError]
    for module, name in (("model.checkpoint", "CheckpointError"), ("service.client", "ClientError")):
        if module in sys.modules:
            kinds.append(getattr(sys.modules[module], name))
    return isinstance(error, tuple(kinds))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command's arguments; ``bench`` keeps everything after it (``args.bench_args``), since
    its options belong to the harness, which this package does not import."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        args.bench_args = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if not is_user_error(e):
            raise  # a bug: the traceback is what a report needs
        print(f"thinkingvit {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
