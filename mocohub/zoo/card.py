"""The README.md model card written next to every export, so a Hub repo explains itself.

Everything comes from ``config.json`` (its ``mocohub`` section holds the provenance), so the card
never disagrees with the weights it describes.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

__all__ = ["CARD_NAME", "METRIC_NAMES", "TIMM_LOCAL_LINE", "model_card"]

CARD_NAME = "README.md"
# Scores, named for what they measure: the training monitor scores the query encoder's output (the
# projection, as the official CIFAR demo does); `mocohub demo` also scores the exported backbone.
METRIC_NAMES = {
    "imagenet_linear_top1": "ImageNet linear top-1 (%)",
    "knn_top1": "kNN top-1 (%) of the query encoder's output (training monitor)",
    "knn_top5": "kNN top-5 (%) of the query encoder's output (training monitor)",
    "knn_top1_backbone": "kNN top-1 (%) of these backbone features",
}
# timm from a local export folder: its pretrained_cfg (num_classes, mean, std, input size) makes timm build the
# model without a classifier and load the weights strictly; model_args rebuild a ViT's grid and heads.
TIMM_LOCAL_LINE = ("import json, timm\n"
                   'cfg = json.load(open("FOLDER/config.json"))\n'
                   'model = timm.create_model(cfg["architecture"], pretrained=True, **cfg["model_args"],\n'
                   '                          pretrained_cfg_overlay=dict(cfg["pretrained_cfg"], file="FOLDER/model.safetensors"))')
_CITATIONS = {
    "v1": "@inproceedings{he2020momentum,\n  title={Momentum Contrast for Unsupervised Visual Representation "
          "Learning},\n  author={He, Kaiming and Fan, Haoqi and Wu, Yuxin and Xie, Saining and Girshick, Ross},"
          "\n  booktitle={CVPR},\n  year={2020}\n}",
    "v2": "@article{chen2020mocov2,\n  title={Improved Baselines with Momentum Contrastive Learning},\n"
          "  author={Chen, Xinlei and Fan, Haoqi and Girshick, Ross and He, Kaiming},\n"
          "  journal={arXiv preprint arXiv:2003.04297},\n  year={2020}\n}",
    "v3": "@inproceedings{chen2021mocov3,\n  title={An Empirical Study of Training Self-Supervised Vision "
          "Transformers},\n  author={Chen, Xinlei and Xie, Saining and He, Kaiming},\n  booktitle={ICCV},\n"
          "  year={2021}\n}",
}


def _front_matter(meta: Mapping[str, Any], version: str | None, timm_loads: bool) -> str:
    """The Hub's metadata; a library_name of timm makes the Hub offer timm's loading line, so only where it works."""
    library = "timm" if timm_loads else "mocohub"
    tags = ["image-feature-extraction", *(["timm"] if timm_loads else []), "mocohub", "moco", "self-supervised",
            "contrastive-learning"]
    if version:
        tags.append(f"moco-{version}")
    lines = ["---", f"library_name: {library}", f"license: {meta.get('license', 'other')}",
             "pipeline_tag: image-feature-extraction", "tags:", *[f"- {t}" for t in tags]]
    if meta.get("zoo_name"):  # a run's dataset is a local folder's name, not a Hub dataset id
        lines += ["datasets:", "- imagenet-1k"]
    if meta.get("imagenet_linear_top1") is not None:
        lines += ["metrics:", "- accuracy"]
    return "\n".join(lines + ["---", ""])


def _facts(config: Mapping[str, Any], meta: Mapping[str, Any]) -> str:
    rows = {"architecture": config["architecture"], "stem": meta.get("stem", "imagenet"),
            "pooled feature size": config.get("num_features"), "classes": config.get("num_classes", 0),
            **{METRIC_NAMES.get(k, k.replace("_", " ")): v for k, v in meta.items() if k != "stem" and v is not None}}
    return "\n".join(["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows.items()]])


def _timm_section(timm_loads: bool, repo: str) -> str:
    """How timm loads the files, or, for the small-image stem that timm cannot build, that it cannot."""
    if not timm_loads:
        return ("### timm\n\nNot with timm: this backbone has mocohub's small-image (CIFAR) stem, a 3x3 stride-1 "
                "first convolution without max-pool, which no timm ResNet option builds. `timm.create_model` on these "
                "files fails, and with its checks relaxed (a differing `num_classes`) it loads with the first layer "
                "left random. Load it with `mocohub.from_pretrained` as above.\n")
    return ("### timm\n\n```python\nimport timm\n"
            f'model = timm.create_model("hf-hub:{repo}", pretrained=True)\n```\n\n'
            "From a local folder, `config.json` says how to build the model and what it expects:\n\n"
            f"```python\n{TIMM_LOCAL_LINE}\n```\n")


def model_card(config: Mapping[str, Any], *, repo_id: str | None = None) -> str:
    """A Hugging Face model card (YAML front matter + usage) for an export with this config."""
    meta = dict(config.get("mocohub", {}))
    version = meta.get("moco_version")
    title = meta.get("zoo_name") or f"MoCo {version or ''} {config['architecture']}".replace("  ", " ")
    repo = repo_id or "ORG/REPO"
    pcfg = config.get("pretrained_cfg", {})
    timm_loads = meta.get("stem", "imagenet") == "imagenet"
    sections = [
        _front_matter(meta, version, timm_loads),
        f"# {title}\n",
        "A Momentum Contrast (MoCo) self-supervised backbone, exported by "
        "mocohub as `model.safetensors` + `config.json` "
        "(timm's Hub schema). By default it returns pooled features, with no classifier.\n",
        "## Facts\n", _facts(config, meta) + "\n",
        "## How to load\n",
        "```python\nimport mocohub\n"
        f'model = mocohub.from_pretrained("hf-hub:{repo}")  # or a local folder; features_only=True, num_classes=N\n'
        "transform = mocohub.transform_for(model)  # the evaluation preprocessing\n\n"
        "import torch\n"
        f'model = torch.hub.load("PATH/TO/mocohub", "mocohub", "hf-hub:{repo}", source="local")\n'
        "```\n",
        _timm_section(timm_loads, repo),
        "## Evaluation preprocessing\n",
        "```json\n" + json.dumps({k: pcfg.get(k) for k in ("input_size", "crop_pct", "interpolation",
                                                            "mean", "std")}) + "\n```\n",
    ]
    if version in _CITATIONS:
        sections += ["## Citation\n", f"```bibtex\n{_CITATIONS[version]}\n```\n"]
    return "\n".join(sections)
