"""The ``histopipe`` command line: one subcommand per stage.

Each stage lives in its own module exposing ``register(subparsers)``; the module adds its
parser and sets ``func`` (called with the parsed args, returns an exit code). Expected
failures (HistopipeError) print one line naming the file and the problem, no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings

from histopipe import __version__
from histopipe.errors import HistopipeError

# Stage modules, in pipeline order.
COMMANDS = (
    "histopipe.cli.demo",
    "histopipe.cli.slides",
    "histopipe.cli.embed",
    "histopipe.cli.cluster",
    "histopipe.cli.dataset",
    "histopipe.cli.evaluate",
    "histopipe.cli.report",
    "histopipe.cli.train",
    "histopipe.cli.synthesize",
    "histopipe.cli.nuclei",
    "histopipe.cli.run",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="histopipe",
        description=(
            "Whole-slide images to annotated synthetic histopathology. Units: µm/px is "
            "micrometres per pixel; px are pixels at the stated resolution; coordinates are "
            "level-0 (full-resolution) pixels (x, y)."
        ),
    )
    parser.add_argument("--version", action="version", version=f"histopipe {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and debug details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # The arguments as given: commands that start several processes rerun themselves with them.
    args.argv = list(sys.argv[1:] if argv is None else argv)
    # Under torchrun the other processes only log warnings: the main one tells the story.
    quiet = os.environ.get("RANK", "0") != "0"
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    logging.captureWarnings(True)
    warnings.simplefilter("default")
    try:
        return int(args.func(args) or 0)
    except HistopipeError as err:
        print(f"histopipe {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"histopipe {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
