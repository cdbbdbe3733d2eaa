"""The README.md model card written next to every export, so a Hub repo explains itself.

Everything comes from ``config.json`` (its ``mocohub`` section holds the provenance), so the card
never disagrees with the weights it describes.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

__all__ = ["CARD_NAME", "model_card"]

CARD_NAME = "README.md"
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


def _front_matter(meta: Mapping[str, Any], version: str | None) -> str:
    tags = ["image-feature-extraction", "timm", "mocohub", "moco", "self-supervised", "contrastive-learning"]
    if version:
        tags.append(f"moco-{version}")
    lines = ["---", "library_name: timm", f"license: {meta.get('license', 'other')}",
             "pipeline_tag: image-feature-extraction", "tags:", *[f"- {t}" for t in tags]]
    if meta.get("zoo_name"):  # a run's dataset is a local folder's name, not a Hub dataset id
        lines += ["datasets:", "- imagenet-1k"]
    if meta.get("imagenet_linear_top1") is not None:
        lines += ["metrics:", "- accuracy"]
    return "\n".join(lines + ["---", ""])


def _facts(config: Mapping[str, Any], meta: Mapping[str, Any]) -> str:
    rows = {"architecture": config["architecture"], "stem": meta.get("stem", "imagenet"),
            "pooled feature size": config.get("num_features"), "classes": config.get("num_classes", 0),
            **{k.replace("_", " "): v for k, v in meta.items() if k != "stem" and v is not None}}
    return "\n".join(["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows.items()]])


def model_card(config: Mapping[str, Any], *, repo_id: str | None = None) -> str:
    """A Hugging Face model card (YAML front matter + usage) for an export with this config."""
    meta = dict(config.get("mocohub", {}))
    version = meta.get("moco_version")
    title = meta.get("zoo_name") or f"MoCo {version or ''} {config['architecture']}".replace("  ", " ")
    repo = repo_id or "ORG/REPO"
    pcfg = config.get("pretrained_cfg", {})
    timm_note = ("" if meta.get("stem", "imagenet") == "imagenet" else
                 "\nThis backbone uses mocohub's small-image (CIFAR) stem, which plain timm cannot build: "
                 "load it with mocohub.\n")
    sections = [
        _front_matter(meta, version),
        f"# {title}\n",
        "A Momentum Contrast (MoCo) self-supervised backbone, exported by "
        "mocohub as `model.safetensors` + `config.json` "
        "(timm's Hub schema). By default it returns pooled features, with no classifier.\n",
        "## Facts\n", _facts(config, meta) + "\n",
        "## How to load\n",
        "```python\nimport mocohub\n"
        f'model = mocohub.from_pretrained("hf-hub:{repo}")  # or features_only=True, num_classes=N\n'
        "transform = mocohub.transform_for(model)  # the evaluation preprocessing\n\n"
        "import timm\n"
        f'model = timm.create_model("hf-hub:{repo}", pretrained=True)\n\n'
        "import torch\n"
        f'model = torch.hub.load("PATH/TO/mocohub", "mocohub", "hf-hub:{repo}", source="local")\n'
        "```\n" + timm_note,
        "## Evaluation preprocessing\n",
        "```json\n" + json.dumps({k: pcfg.get(k) for k in ("input_size", "crop_pct", "interpolation",
                                                            "mean", "std")}) + "\n```\n",
    ]
    if version in _CITATIONS:
        sections += ["## Citation\n", f"```bibtex\n{_CITATIONS[version]}\n```\n"]
    return "\n".join(sections)
