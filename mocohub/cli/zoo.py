"""``mocohub list`` (the model zoo as a table) and ``mocohub convert`` (any checkpoint -> export)."""
from __future__ import annotations

import argparse

from ..zoo.registry import ALIASES, REGISTRY, list_models, model_info
from .output import add_json_flag, emit, params, say, table

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    listing = subparsers.add_parser("list", help="list the MoCo model zoo",
                                    description="The official MoCo checkpoints mocohub can load by name; top-1 is "
                                                "ImageNet linear evaluation. mocohub info NAME tells more.")
    listing.add_argument("pattern", nargs="?", help="shell-style filter, e.g. '*v3*'")
    listing.add_argument("-v", "--verbose", action="store_true", help="print each model's full description")
    add_json_flag(listing, "models: one object per model as mocohub.model_info gives it (name, arch, num_params, "
                           "moco_version, epochs, recipe, imagenet_linear_top1, license, paper, source, url, hash, "
                           "pretrained_cfg, ...) plus aliases")
    listing.set_defaults(func=run)
    convert = subparsers.add_parser(
        "convert", help="turn a checkpoint into model.safetensors + config.json + README.md",
        description="Convert any checkpoint mocohub reads (zoo name, URL, file, folder, hf-hub:) into a "
                    "folder that mocohub, timm and the Hugging Face Hub load.")
    convert.add_argument("source", metavar="SRC")
    convert.add_argument("out_dir", metavar="OUT_DIR")
    convert.add_argument("--push", metavar="REPO_ID", help="also upload the folder to this Hub repo")
    convert.add_argument("--check-hash", metavar="ALGO:HEX", help="verify a download: sha256:<hex> or md5:<hex>")
    convert.add_argument("--private", action="store_true", help="create the Hub repo as private")
    convert.add_argument("--to", choices=("mocohub", "detectron2"), default="mocohub",
                         help="detectron2: write OUT as a .pkl for detectron2's MODEL.WEIGHTS (ResNets)")
    add_json_flag(convert, "command, source, to, out, format (the checkpoint layout read; null for detectron2), "
                           "architecture, pushed (the commit URL, or null)")
    convert.set_defaults(func=run)


def _table(names: list[str]) -> str:
    aliases = {target: alias for alias, target in ALIASES.items()}
    rows = [("name", "arch", "moco", "epochs", "params", "top-1", "licence", "hash", "alias")]
    for e in (REGISTRY[n] for n in names):
        rows.append((e.name, e.arch, e.moco_version, str(e.epochs), params(e.num_params), f"{e.top1:.1f} %",
                     e.license, e.hash or "none published", aliases.get(e.name, "")))
    return table(rows)


def _list(args: argparse.Namespace) -> int:
    names = list_models(args.pattern)
    if not names:
        human = f"no zoo model matches {args.pattern!r}; mocohub list shows them all"
    elif args.verbose:
        human = "\n\n".join(f"{n}\n{REGISTRY[n].describe()}" for n in names)
    else:
        human = _table(names)
    models = [dict(model_info(n), aliases=[a for a, t in ALIASES.items() if t == n]) for n in names]
    emit({"command": "list", "models": models}, human, args.json)
    return 0


def _convert(args: argparse.Namespace) -> int:
    from ..detection.detectron2 import convert_to_detectron2  # torch: imported when a conversion runs
    from ..zoo.hub import push_folder
    from ..zoo.loading import resolve_source
    from ..zoo.pretrained import write_pretrained

    result = {"command": "convert", "source": args.source, "to": args.to, "format": None, "architecture": None,
              "pushed": None}
    if args.to == "detectron2":
        result["out"] = str(convert_to_detectron2(args.source, args.out_dir))
        emit(result, f"{args.source} -> {result['out']} (detectron2)", args.json)
        return 0
    backbone = resolve_source(args.source, check_hash=args.check_hash)
    out = write_pretrained(args.out_dir, backbone.state_dict, backbone.config, repo_id=args.push)
    result.update(out=str(out), format=backbone.format, architecture=backbone.config["architecture"])
    human = f"{args.source} ({backbone.format}, {backbone.config['architecture']}) -> {out}"
    if args.push:
        say(human, args.json)  # the folder is written even if the push then fails
        result["pushed"] = push_folder(out, args.push, private=args.private or None)
        human = f"pushed: {result['pushed']}"
    emit(result, human, args.json)
    return 0


def run(args: argparse.Namespace) -> int:
    return _list(args) if args.command == "list" else _convert(args)
