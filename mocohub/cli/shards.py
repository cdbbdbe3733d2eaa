"""``mocohub shards DATA_DIR OUT_DIR``: a folder of images as WebDataset tar shards to train on."""
from __future__ import annotations

import argparse
import re
import time

from ..data.defaults import DEFAULT_SHARD_BYTES
from .output import add_json_flag, count, duration, emit

__all__ = ["add_parser", "build_parser", "parse_size", "run"]

KEYS = "command, source, out, pattern, images, shards, bytes, classes, skipped, resumed_from, seconds"
UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
         "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_size(text: str) -> int:
    """``1GB`` (10^9), ``512MiB`` (2^29), ``1.5gb``, ``4096``: a byte count."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in UNITS or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: write e.g. 1GB, 500MB or 512MiB")
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("shards", help="write a folder of images as WebDataset tar shards",
                       description="Write every image of DATA_DIR (any layout mocohub train reads; the class from "
                                   "the first sub-folder) into WebDataset tar shards OUT_DIR/<name>-NNNNNN.tar: the "
                                   "original bytes, the relative path as the key, the class index as <key>.cls. "
                                   "Resumable: re-running an interrupted write continues it. Prints the pattern "
                                   "to pass to mocohub train. Needs webdataset: pip install 'mocohub[shards]'.")
    p.add_argument("data", metavar="DATA_DIR", help="the image folder")
    p.add_argument("out", metavar="OUT_DIR", help="where the shards and their manifest <name>.shards.json go")
    p.add_argument("--shard-size", type=parse_size, default=DEFAULT_SHARD_BYTES, metavar="SIZE",
                   help="image bytes per shard (a shard ends after the image that reaches it; tar headers add about "
                        "1.5 KB per image, so 32-px JPEGs make files 2.5x this); default 1GB")
    add_json_flag(p, KEYS)
    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    """This command's parser alone (``mocohub.cli.main`` registers ``add_parser``)."""
    parser = argparse.ArgumentParser(prog="mocohub")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def run(args: argparse.Namespace) -> int:
    from ..data.shards import write_shards  # numpy, PIL: imported when the shards are written

    start = time.perf_counter()
    result = write_shards(args.data, args.out, shard_bytes=args.shard_size, progress=not args.json)
    seconds = time.perf_counter() - start
    shards, images = len(result["shards"]), result["images"]
    done = result["resumed_from"]
    continued = ("already written: nothing to do" if done == images else
                 f"continued after {count(done)} images written before" if done else "")
    human = (f"wrote {count(images)} images into {shards} shard{'s' * (shards != 1)} "
             f"({_size(result['bytes'])}) in {args.out}, {duration(seconds)}"
             + (f"; {continued}" if continued else "")
             + (f"; {result['skipped']} non-image file(s) left out" if result["skipped"] else "")
             + f"\ntrain on them with: mocohub train '{result['pattern']}'")
    emit({"command": "shards", "source": result["source"], "out": args.out, "pattern": result["pattern"],
          "images": images, "shards": shards, "bytes": result["bytes"], "classes": result["classes"],
          "skipped": result["skipped"], "resumed_from": done, "seconds": seconds}, human, args.json)
    return 0
