"""Models are built straight onto their weights: no random initialisation, nothing left on meta."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import mocohub
from mocohub.zoo.instantiate import build_loaded
from mocohub.zoo.pretrained import build_config, build_model, load_pretrained_dir, write_pretrained

from zoo_layouts import features


class _WithUnsavedBuffer(nn.Module):
    """A layer plus a non-persistent buffer, which a state dict never carries."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.register_buffer("scale", torch.full((3,), 2.0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.scale


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "r18"
    torch.manual_seed(0)
    model = build_model(build_config("resnet18", num_features=512, stem="cifar")).eval()
    write_pretrained(folder, model.state_dict(), model.mocohub_config)
    return folder, model


def test_loading_a_saved_folder_draws_no_random_initialisation(saved):
    folder, reference = saved
    before = torch.get_rng_state()
    model = mocohub.from_pretrained(folder)
    assert torch.equal(torch.get_rng_state(), before)  # nothing was randomly initialised
    assert torch.equal(features(model, size=32), features(reference, size=32))
    again = load_pretrained_dir(folder)
    assert not any(t.is_meta for t in [*again.parameters(), *again.buffers()])
    assert torch.equal(features(again, size=32), features(reference, size=32))


def test_features_only_and_fresh_classifier_still_load_strictly(saved):
    folder, reference = saved
    feats = mocohub.from_pretrained(folder, features_only=True, out_indices=(4,))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(feats(x)[0], reference.forward_features(x))
    head = mocohub.from_pretrained(folder, num_classes=5)
    assert head.fc.weight.abs().sum() > 0 and not head.fc.weight.is_meta
    assert torch.equal(head.conv1.weight, reference.conv1.weight)


def test_unsaved_buffers_dtypes_and_mismatches():
    source = _WithUnsavedBuffer()
    half = {k: v.half() for k, v in source.state_dict().items()}
    model = build_loaded(_WithUnsavedBuffer, half)
    assert torch.equal(model.scale, torch.full((3,), 2.0))  # rebuilt, not left on the meta device
    assert model.linear.weight.dtype == torch.float32  # cast as load_state_dict's copy would
    assert torch.equal(model.linear.weight, half["linear.weight"].float())
    with pytest.raises(mocohub.MocohubError, match="missing.*linear.bias"):
        build_loaded(_WithUnsavedBuffer, {"linear.weight": half["linear.weight"]})
