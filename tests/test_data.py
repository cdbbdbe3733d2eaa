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


def _touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_the_listing_follows_os_walk_order_links_and_hidden_files(tmp_path):
    """Folders before their files' siblings as os.walk yields them ("a" before "a-b", though
    "a-b/..." sorts first as a string), links followed, hidden entries skipped."""
    root = tmp_path / "d"
    for name in ["a-b/1.jpg", "a/2.JPG", "a/x/3.png", "a/x/ä.png", "a/z.txt", ".h/4.jpg", "b/.hid/5.jpg",
                 "b/6.jpg", "b/.7.jpg", "c/8.gif"]:
        _touch(root / name)
    (root / "c" / "link").symlink_to(root / "a" / "x")
    (root / "c" / "broken.jpg").symlink_to(tmp_path / "nowhere")
    with pytest.warns(UserWarning, match="1 non-image file"):
        ds = ImageFolder(root, on_error="skip")
    assert [p[len(str(root)) + 1:] for p, _ in ds.samples] == [
        "a/2.JPG", "a/x/3.png", "a/x/ä.png", "a-b/1.jpg", "b/6.jpg", "c/8.gif", "c/broken.jpg", "c/link/3.png",
        "c/link/ä.png"]
    assert ds.classes == ["a", "a-b", "b", "c"] and ds.targets == [0, 0, 0, 1, 2, 3, 3, 3, 3]
    assert ds.skipped == [str(root / "a" / "z.txt")]
    assert ds.samples[-1] == (str(root / "c" / "link" / "ä.png"), 3) and ds.samples[1:3] == list(ds.samples)[1:3]


def _reachable(obj, limit: int) -> int:
    """How many objects ``obj`` holds, through any depth of references (modules and types not entered)."""
    import gc
    import types
    seen, todo = set(), [obj]
    while todo and len(seen) < limit:
        o = todo.pop()
        if id(o) in seen or isinstance(o, (type, types.ModuleType, types.FunctionType)):
            continue
        seen.add(id(o))
        todo += gc.get_referents(o)
    return len(seen)


def test_samples_are_a_few_flat_arrays_whatever_the_number_of_files(tmp_path):
    """The samples hold a fixed handful of Python objects (a list of tuples held 3 per file)."""
    for i in range(3000):
        _touch(tmp_path / "d" / f"c{i % 3}" / f"{i:05d}.jpg")
    ds = ImageFolder(tmp_path / "d")
    assert _reachable(ds.samples, 3000) < 20
    assert ds.samples[1000] == (str(tmp_path / "d" / "c1" / "00001.jpg"), 1)  # c0 holds 1000
    ds.samples = [(str(tmp_path / "d" / "x.jpg"), 5)] * 3000  # as ShardImages sets them: stored flat too
    assert _reachable(ds.samples, 3000) < 20 and ds.targets == [5] * 3000


def _uss() -> int:
    with open("/proc/self/smaps_rollup") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith(("Private_Clean", "Private_Dirty"))) * 1024


def _epoch(ds, warm: int, conn) -> None:
    import gc
    for i in range(warm):  # the decoder's and allocator's own first pages
        ds[i]
    gc.collect()
    before = _uss()
    for i in range(warm, len(ds)):
        ds[i]
    conn.send(_uss() - before)


def test_a_forked_worker_does_not_copy_the_samples_over_an_epoch(tmp_path):
    """The private memory of a forked worker reading 7,000 images does not grow with them (the list
    of (path, label) tuples grew by about 165 bytes per image read: 1.1 MB here)."""
    import io
    import multiprocessing
    jpeg = io.BytesIO()
    Image.new("RGB", (4, 4), (9, 9, 9)).save(jpeg, "JPEG")
    for i in range(8000):
        _touch(tmp_path / "d" / f"c{i % 10}" / f"image-{i:06d}.jpg", jpeg.getvalue())
    ds = ImageFolder(tmp_path / "d")
    fork = multiprocessing.get_context("fork")
    here, there = fork.Pipe()
    worker = fork.Process(target=_epoch, args=(ds, 1000, there))
    worker.start()
    growth = here.recv()
    worker.join()
    assert growth < 256 * 1024, f"{growth / 1024:.0f} KB"


def test_the_data_fingerprint_keeps_the_value_checkpoints_hold(tmp_path):
    """sha256 of the sorted relative names joined by newlines (hand-computed below, as written by
    every checkpoint so far): the same for a moved folder, another for a renamed file; names
    pathlib writes otherwise ("./", "//": shard keys) hash as pathlib writes them."""
    from mocohub.training.resume import data_fingerprint
    for name in ["dog/c.jpg", "cat/sub/b.png", "cat/a.jpg"]:
        _touch(tmp_path / "d" / name)
    ds = ImageFolder(tmp_path / "d")
    # hashlib.sha256(b"cat/a.jpg\ncat/sub/b.png\ndog/c.jpg").hexdigest()[:16]
    expected = {"images": 3, "names_sha256": "7e9cd86bca99975e"}
    assert data_fingerprint(ds.root, (p for p, _ in ds.samples)) == expected
    assert data_fingerprint("/elsewhere/", ["/elsewhere/dog/c.jpg", "/elsewhere/cat/a.jpg",
                                            "/elsewhere/cat/sub/b.png"]) == expected
    assert data_fingerprint("/r", ["/r/dog/c.jpg", "/r/cat/a.jpg", "/r/cat/sub/B.png"]) != expected
    # hashlib.sha256(b"a.jpg\nb/c.jpg").hexdigest()[:16]
    assert data_fingerprint("/r/", ["/r/./a.jpg", "/r/b//c.jpg"])["names_sha256"] == "049cb8ea8ebd1747"
    assert data_fingerprint("/r", ["/r/b/c.jpg/", "/r//a.jpg"])["names_sha256"] == "049cb8ea8ebd1747"
    with pytest.raises(ValueError):
        data_fingerprint("/r", ["/s/a.jpg"])
