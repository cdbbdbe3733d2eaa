"""Entry point of the ``mocohub`` command: each sub-command lives in its own module.

What a person sees besides a command's own lines is decided here: a user error is one line (exit
2), a mistyped flag gets the sub-command's usage, a warning is one line without a source path,
Ctrl-C says how to continue (exit 130).
"""
from __future__ import annotations

import argparse
import difflib
import importlib.metadata
import shlex
import sys
import warnings
from typing import Sequence

from ..errors import MocohubError
from . import demo, evaluate, info, plot, shards, train, zoo
from .output import EXIT_CODES

__all__ = ["main", "build_parser"]

COMMANDS = (demo, train, shards, zoo, info, evaluate, plot)


def _version() -> str:
    """mocohub's version and those of the libraries a bug report needs (read without importing them)."""
    from .. import __version__

    def installed(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return f"mocohub {__version__} (torch {installed('torch')}, timm {installed('timm')}, python {sys.version.split()[0]})"


def _build() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(prog="mocohub", description="Momentum Contrast: train, load, evaluate.",
                                     epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.add_parser(sub)
    return parser, sub.choices


def build_parser() -> argparse.ArgumentParser:
    return _build()[0]


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv``; an unknown flag is reported with its sub-command's usage (and the closest flag)."""
    parser, commands = _build()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        command = commands[args.command]
        flags = [s for action in command._actions for s in action.option_strings]
        close = difflib.get_close_matches(unknown[0].split("=")[0], flags, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        command.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    return args


def _resume_hint(args: argparse.Namespace, argv: Sequence[str], run_dir: str | None) -> str:
    """How to continue an interrupted command: for ``train`` and ``extract``, the command to rerun."""
    words = ["mocohub", *argv]
    if args.command == "train":
        if run_dir is None:
            return "rerun the same command with --out RUN_DIR (the folder the start line named) to resume"
        if not getattr(args, "out", None):
            words += ["--out", run_dir]
        return f"the checkpoint is in {run_dir}; resume with: {shlex.join(words)}"
    if args.command == "extract" and args.out:
        return f"continue with: {shlex.join(words if args.resume else [*words, '--resume'])}"
    return ""


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as a person reads it: what happened, without the source file and line."""
    print(f"mocohub: warning: {message}", file=file or sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    with warnings.catch_warnings():  # restores the caller's warning display on return
        warnings.showwarning = _one_line_warning
        try:
            return int(args.func(args) or 0)
        except MocohubError as e:
            print(f"mocohub {args.command}: error: {e}", file=sys.stderr)
            return e.exit_code
        except KeyboardInterrupt as e:
            run_dir = getattr(args, "out", None) or (str(e.args[0]) if e.args else None)
            hint = _resume_hint(args, argv, run_dir)
            print(f"mocohub {args.command}: interrupted" + (f"; {hint}" if hint else ""), file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
