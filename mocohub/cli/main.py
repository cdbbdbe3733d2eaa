"""Entry point of the ``mocohub`` command: each sub-command lives in its own module."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ..errors import MocohubError
from . import demo, evaluate, info, plot, train, zoo
from .output import EXIT_CODES

__all__ = ["main", "build_parser"]

COMMANDS = (demo, train, zoo, info, evaluate, plot)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mocohub", description="Momentum Contrast: train, load, evaluate.",
                                     epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MocohubError as e:
        print(f"mocohub {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"mocohub {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
