"""`ltr` command line. Each area registers its own subcommands; this module only composes them."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

# Modules exposing `register(subparsers)`; each subcommand sets `func(args) -> int`.
_COMMAND_MODULES = (
    "ltr.predictor.commands",
    "ltr.sim.commands",
    "deployments.resolve",
)


def _prepare_model(args: argparse.Namespace) -> int:
    from ltr.models import prepare_model

    print(prepare_model(args.output, force=args.force))
    return 0


def _export_trace(args: argparse.Namespace) -> int:
    from ltr.data import load_pairs, split_pairs, write_trace

    splits = split_pairs(load_pairs())
    pairs = getattr(splits, args.split)
    if args.limit:
        pairs = pairs[: args.limit]
    print(write_trace(pairs, args.output))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ltr", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prepare-model", help="convert SmolLM2-135M-Instruct (offline GGUF) to a HF folder")
    p.add_argument("--output", type=Path, default=None, help="target folder (default: user cache)")
    p.add_argument("--force", action="store_true", help="convert again even if present")
    p.set_defaults(func=_prepare_model)

    p = sub.add_parser("export-trace", help="write a ShareGPT split as a JSONL serving trace")
    p.add_argument("--split", choices=("train", "val", "test"), default="test")
    p.add_argument("--limit", type=int, default=0, help="first N pairs only (0 = all)")
    p.add_argument("--output", type=Path, required=True)
    p.set_defaults(func=_export_trace)

    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError) as exc:
        print(f"ltr {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
