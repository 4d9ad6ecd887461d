"""The ``thinkingvit`` command: info, train, eval, serve, bench. Heavy imports stay inside commands."""
from __future__ import annotations

import argparse
import json
import sys


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="thinkingvit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="print a checkpoint's metadata, parameter count and GMACs as JSON")
    p.add_argument("checkpoint")
    p.add_argument("--preset", help="config for checkpoints without metadata (else inferred)")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
