"""Image folders (formats, modes, labels, broken files) and the papers' augmentation recipes."""
import pytest
import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T

from mocohub.data.augment import CIFAR_MEAN, IMAGENET_MEAN, IMAGENET_STD, GaussianBlur, TwoViews, augmentation
from mocohub.data.folder import ImageFolder, collate_images
from mocohub.errors import MocohubError


def _save(path, mode, fmt):
    path.parent.mkdir(parents=True, exist_ok=True)
    color = {"RGB": (200, 10, 10), "L": 128, "RGBA": (0, 200, 0, 100), "P": 3, "CMYK": (0, 255, 0, 0)}[mode]
    Image.new(mode, (20, 12), color).save(path, fmt)


@pytest.fixture
def mixed(tmp_path):
    root = tmp_path / "imgs"
    _save(root / "cats" / "a.jpg", "RGB", "JPEG")
    _save(root / "cats" / "deep" / "nested" / "b.png", "L", "PNG")
    _save(root / "cats" / "c.webp", "RGBA", "WEBP")
    _save(root / "dogs" / "d.png", "P", "PNG")
    _save(root / "dogs" / "e.jpeg", "CMYK", "JPEG")
    good = (root / "dogs" / "d.png").read_bytes()
    (root / "dogs" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "dogs" / "readme.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    _save(root / ".hidden" / "x.png", "RGB", "PNG")
    return root


def test_formats_modes_labels_and_broken_files(mixed):
    with pytest.warns(UserWarning, match="1 non-image file"):
        ds = ImageFolder(mixed, T.ToTensor())
    assert ds.classes == ["cats", "dogs"]
    names = [p.split("/")[-1] for p, _ in ds.samples]
    assert names == ["a.jpg", "c.webp", "b.png", "d.png", "e.jpeg", "truncated.png"]
    assert ds.targets == [0, 0, 0, 1, 1, 1]
    assert [p.split("/")[-1] for p in ds.skipped] == ["readme.txt"]
    for i in range(5):
        image, label, index, failed = ds[i]
        assert image.shape == (3, 12, 20) and index == i and failed == []
    image, label, index, failed = ds[5]  # truncated: replaced by the next good image (wraps to 0)
    assert index == 0 and label == 0 and failed[0].endswith("truncated.png")
    magenta = ds[4][0][:, 0, 0]  # CMYK (0, 255, 0, 0) converted to RGB
    assert magenta[0] > 0.9 and magenta[1] < 0.1 and magenta[2] > 0.9


def test_skip_mode_drops_broken_images_in_the_batch(mixed):
    with pytest.warns(UserWarning, match="readme.txt"):
        ds = ImageFolder(mixed, T.ToTensor(), on_error="skip")
    batch = collate_images([ds[i] for i in range(len(ds))])
    assert batch.images.shape == (5, 3, 12, 20)
    assert batch.indices.tolist() == [0, 1, 2, 3, 4]
    assert len(batch.failed) == 1 and batch.failed[0].endswith("truncated.png")


def test_unlabelled_folder_and_errors(tmp_path):
    _save(tmp_path / "flat" / "a.png", "RGB", "PNG")
    _save(tmp_path / "flat" / "sub" / "b.png", "RGB", "PNG")
    ds = ImageFolder(tmp_path / "flat")
    assert ds.classes == [] and ds.targets == [-1, -1]
    (tmp_path / "empty").mkdir()
    with pytest.raises(MocohubError, match="no images found"):
        ImageFolder(tmp_path / "empty")
    with pytest.raises(MocohubError, match="does not exist"):
        ImageFolder(tmp_path / "missing")


def test_seeded_views_depend_only_on_seed_epoch_and_index(tmp_path):
    _save(tmp_path / "d" / "a.png", "RGB", "PNG")
    _save(tmp_path / "d" / "b.png", "L", "PNG")
    ds = ImageFolder(tmp_path / "d", TwoViews(augmentation("cifar", 16)), seed=1)
    first = ds[0][0]
    assert not torch.equal(first[0], first[1])  # two independent views
    torch.rand(100)  # the global generator does not matter
    assert all(torch.equal(a, b) for a, b in zip(first, ds[0][0]))
    ds.set_epoch(1)
    assert not torch.equal(first[0], ds[0][0][0])


def _describe(t):
    return [(type(x).__name__, getattr(x, "p", None)) for x in t.transforms]


def test_moco_v1_recipe():
    t = augmentation("moco-v1")
    assert _describe(t) == [("RandomResizedCrop", None), ("RandomGrayscale", 0.2), ("ColorJitter", None),
                            ("RandomHorizontalFlip", 0.5), ("ToTensor", None), ("Normalize", None)]
    rrc, _, jitter = t.transforms[:3]
    assert rrc.size == (224, 224) and rrc.scale == (0.2, 1.0)
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == ((0.6, 1.4),) * 3 + ((-0.4, 0.4),)
    assert t.transforms[-1].mean == IMAGENET_MEAN and t.transforms[-1].std == IMAGENET_STD


def test_moco_v2_recipe():
    t = augmentation("moco-v2")
    assert _describe(t) == [("RandomResizedCrop", None), ("RandomApply", 0.8), ("RandomGrayscale", 0.2),
                            ("RandomApply", 0.5), ("RandomHorizontalFlip", 0.5), ("ToTensor", None),
                            ("Normalize", None)]
    jitter, blur = t.transforms[1].transforms[0], t.transforms[3].transforms[0]
    assert t.transforms[0].scale == (0.2, 1.0)
    assert (jitter.brightness, jitter.hue) == ((0.6, 1.4), (-0.1, 0.1))
    assert isinstance(blur, GaussianBlur) and blur.sigma == (0.1, 2.0)


def test_cifar_recipe():
    t = augmentation("cifar")
    assert _describe(t) == [("RandomResizedCrop", None), ("RandomHorizontalFlip", 0.5), ("RandomApply", 0.8),
                            ("RandomGrayscale", 0.2), ("ToTensor", None), ("Normalize", None)]
    assert t.transforms[0].size == (32, 32) and t.transforms[0].scale == (0.08, 1.0)
    assert t.transforms[-1].mean == CIFAR_MEAN
    with pytest.raises(ValueError, match="valid: moco-v1, moco-v2, moco-v3, cifar"):
        augmentation("simclr")


def test_gaussian_blur_is_pil_blur_with_uniform_sigma():
    img = Image.effect_noise((24, 24), 60).convert("RGB")
    torch.manual_seed(5)
    sigma = torch.empty(1).uniform_(0.1, 2.0).item()
    torch.manual_seed(5)
    out = GaussianBlur((0.1, 2.0))(img)
    assert out.tobytes() == img.filter(ImageFilter.GaussianBlur(radius=sigma)).tobytes()


def test_per_sample_seeding_leaves_the_cuda_generators_alone(tmp_path, monkeypatch):
    _save(tmp_path / "d" / "a.png", "RGB", "PNG")
    ds = ImageFolder(tmp_path / "d", TwoViews(augmentation("cifar", 16)), seed=1)
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", reseeded.append)
    monkeypatch.setattr(torch.cuda, "manual_seed", reseeded.append)
    ds[0]
    assert reseeded == []


class _SharedCheck:
    """A transform reporting whether the worker got the cached image from shared memory."""

    accepts_tensors = True

    def __call__(self, image):
        return torch.tensor([image.is_shared(), image.dtype == torch.uint8])


def test_image_cache_decodes_once_and_shares_with_workers(mixed, monkeypatch):
    with pytest.warns(UserWarning):
        streamed = ImageFolder(mixed, T.PILToTensor())
    with pytest.warns(UserWarning):
        cached = ImageFolder(mixed, T.PILToTensor(), cache_images="on")
    assert cached.cache is not None and cached.cache.data.is_shared()
    assert [p.split("/")[-1] for p in cached.cache.failed] == ["truncated.png"]
    expected = [streamed[i][0] for i in range(5)]
    monkeypatch.setattr("mocohub.data.folder.load_rgb", None)  # no more file reads
    for i in range(5):
        assert torch.equal(cached[i][0], expected[i])
    image, label, index, failed = cached[5]  # truncated: substituted and counted, as streamed
    assert index == 0 and failed[0].endswith("truncated.png")
    cached.transform = _SharedCheck()
    loader = torch.utils.data.DataLoader(cached, batch_size=2, num_workers=2, collate_fn=collate_images)
    assert bool(torch.cat([b.images for b in loader]).all())


def test_image_cache_budget(mixed):
    with pytest.warns(UserWarning):
        assert ImageFolder(mixed, cache_images="auto").cache is not None  # a few KB
    with pytest.warns(UserWarning):
        streamed = ImageFolder(mixed, cache_images="auto", cache_budget=1000)  # streams, and says why
    assert streamed.cache is None and "over the budget of" in streamed.cache_note
    with pytest.warns(UserWarning), pytest.raises(MocohubError, match="cache_images='off'"):
        ImageFolder(mixed, cache_images="on", cache_budget=1000)
    with pytest.raises(ValueError, match="auto, on, off"):
        ImageFolder(mixed, cache_images="yes")
