"""extract: folder -> safetensors -> reload round trip, refusal of existing output, resume."""
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from eval_fixtures import make_image_folder, tiny_resnet
from mocohub.data.folder import ImageFolder
from mocohub.errors import MocohubError
from mocohub.evaluation.extract import extract_embeddings, load_embeddings
from mocohub.zoo.transforms import transform_for


@pytest.fixture()
def folder(tmp_path):
    root = make_image_folder(tmp_path / "imgs", per_class=3)
    (root / "class2" / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    return root


class Interrupting(torch.nn.Module):
    """The model, interrupted (as by Ctrl-C) after ``calls`` forward passes."""

    def __init__(self, model, calls):
        super().__init__()
        self.model, self.calls = model, calls
        self.pretrained_cfg = model.pretrained_cfg  # the same eval transform

    def forward(self, x):
        self.calls -= 1
        if self.calls < 0:
            raise KeyboardInterrupt
        return self.model(x)


def test_round_trip_matches_the_normalised_model_output(folder, tmp_path):
    model = tiny_resnet()
    out = extract_embeddings(model, folder, tmp_path / "emb.safetensors", batch_size=2, shard_size=4,
                             precision="fp32")
    got = load_embeddings(out)
    data = ImageFolder(folder, transform_for(model), on_error="skip")
    images = torch.stack([item[0] for item in map(data.__getitem__, range(len(data))) if item[0] is not None])
    with torch.no_grad():  # independently of the embedding code: the model's output, L2-normalised
        torch.testing.assert_close(got.features, F.normalize(model.eval()(images), dim=1), atol=1e-5, rtol=1e-4)
    assert got.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert got.paths[0] == "class0/c0_000.png" and len(got.paths) == 9 and "class2/bad.jpg" not in got.paths
    assert got.failed == ["class2/bad.jpg"] and got.classes == ["class0", "class1", "class2"]
    assert got.metadata["normalized"] is True
    assert not (tmp_path / "emb.safetensors.partial").exists()
    with safe_open(str(out), "pt") as f:  # a plain safetensors file for any reader
        assert set(f.keys()) == {"embeddings", "labels"}


def test_existing_output_refused_unless_overwrite(folder, tmp_path):
    model, out = tiny_resnet(), tmp_path / "emb.safetensors"
    out.write_bytes(b"precious")
    with pytest.raises(MocohubError, match="exists: pass --overwrite"):
        extract_embeddings(model, folder, out)
    assert out.read_bytes() == b"precious"
    extract_embeddings(model, folder, out, overwrite=True, normalize=False)
    assert load_embeddings(out).features.norm(dim=1).min() > 1.5  # raw features
    assert extract_embeddings(model, folder, out, resume=True) == out  # finished: nothing to do


def test_interrupted_run_resumes_where_it_stopped(folder, tmp_path):
    model = tiny_resnet()
    full = load_embeddings(extract_embeddings(model, folder, tmp_path / "full.st", batch_size=2, shard_size=4))
    out = tmp_path / "emb.st"
    with pytest.raises(KeyboardInterrupt):  # shards of 4 images, batches of 2: dies in shard 2
        extract_embeddings(Interrupting(model, 3), folder, out, batch_size=2, shard_size=4)
    assert not out.exists() and len(list((tmp_path / "emb.st.partial").glob("shard-*"))) == 1
    with pytest.raises(MocohubError, match="--resume"):
        extract_embeddings(model, folder, out, batch_size=2, shard_size=4)
    counting = Interrupting(model, 100)
    extract_embeddings(counting, folder, out, batch_size=2, shard_size=4, resume=True)
    assert counting.calls == 100 - 3  # shards 2 and 3 only (10 files: 4 + 4 + 2), in 2 + 1 batches
    got = load_embeddings(out)
    assert torch.equal(got.features, full.features) and got.paths == full.paths and got.failed == full.failed


def test_resume_refuses_a_changed_folder(folder, tmp_path):
    out = tmp_path / "emb.st"
    with pytest.raises(KeyboardInterrupt):
        extract_embeddings(Interrupting(tiny_resnet(), 2), folder, out, batch_size=2, shard_size=4)
    make_image_folder(folder, per_class=4)  # one more image per class
    with pytest.raises(MocohubError, match="num_images, files_sha256 changed"):
        extract_embeddings(tiny_resnet(), folder, out, batch_size=2, shard_size=4, resume=True)


def test_bad_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MocohubError, match="no images found"):
        extract_embeddings(tiny_resnet(), tmp_path / "empty", tmp_path / "o.st")
    (tmp_path / "x.st").write_text("not safetensors")
    with pytest.raises(MocohubError, match="cannot read embeddings"):
        load_embeddings(tmp_path / "x.st")
