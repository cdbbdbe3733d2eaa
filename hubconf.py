"""torch.hub entrypoints for the MoCo model zoo, generated from mocohub's registry.

    model = torch.hub.load("path/to/mocohub", "moco_v2_800ep", source="local")
    model = torch.hub.load("path/to/mocohub", "mocohub", "hf-hub:org/repo", source="local")
"""
from mocohub.zoo.loading import from_pretrained as _from_pretrained
from mocohub.zoo.loading import zoo_model as _zoo_model
from mocohub.zoo.registry import REGISTRY as _REGISTRY

dependencies = ["torch", "torchvision", "timm", "huggingface_hub", "safetensors", "PIL"]


def mocohub(name_or_path, **kwargs):
    """Any source mocohub.from_pretrained accepts: a zoo name, "hf-hub:org/repo[@revision]", an
    http(s)/file URL, a checkpoint file or a folder. kwargs: features_only, out_indices, num_classes,
    check_hash, and timm model arguments."""
    return _from_pretrained(name_or_path, **kwargs)


def _entrypoint(entry):
    def load(pretrained=True, **kwargs):
        return _zoo_model(entry.name, pretrained=pretrained, **kwargs)

    load.__name__ = load.__qualname__ = entry.hub_name
    load.__doc__ = entry.describe()
    return load


for _entry in _REGISTRY.values():
    globals()[_entry.hub_name] = _entrypoint(_entry)
