"""Batched views: torchvision's distributions, drawn by key, each op equal to torchvision's on the drawn parameters."""
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Subset, default_collate
from torchvision.transforms import v2 as T2
from torchvision.transforms.v2 import functional as TF

from mocohub.data import batched as B
from mocohub.data import photometric as P
from mocohub.data import transfer
from mocohub.data import views as V
from mocohub.data.augment import augmentation, recipe, view_specs
from mocohub.data.batched import BatchedTwoViews
from mocohub.data.folder import ImageFolder, collate_images, sample_seed
from mocohub.data.keyed import uniforms


def _noise(w=40, h=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)


def test_keyed_uniforms_are_splitmix64():
    """Key 0 mixes to state 0, whose SplitMix64 sequence starts 0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4;
    a column does not depend on how many are drawn, or on the other keys of the batch."""
    u = uniforms(np.array([0, 5, 2 ** 62]), 8)
    assert u[0, :2].tolist() == [(0xE220A8397B1DCDAF >> 11) * 2.0 ** -53, (0x6E789E6AA1B965F4 >> 11) * 2.0 ** -53]
    assert np.array_equal(uniforms(np.array([5]), 3), u[1:2, :3])
    assert u.min() >= 0 and u.max() < 1 and len(np.unique(u)) == u.size


def test_recipes_views():
    first, second = view_specs("moco-v3", crop_min=0.2)
    assert first.scale == second.scale == (0.2, 1.0) and first.size == 224
    assert view_specs("moco-v3")[0].scale == (0.08, 1.0)  # the official default crop_min
    blur1, blur2 = (next(s for s in v.stages if isinstance(s, V.Blur)) for v in (first, second))
    assert (blur1.p, blur2.p) == (1.0, 0.1)
    assert [type(s).__name__ for s in second.stages] == ["ColorJitter", "Grayscale", "Blur", "Solarize", "Flip"]
    assert first.stages[0] == V.ColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8)
    with pytest.raises(ValueError, match="two different views"):
        augmentation("moco-v3")
    assert P.blur_radius(2.0, 224) == 6 and P.blur_radius(2.0, 32) == 6 and P.blur_radius(2.0, 4) == 3


def _draws(view, n, size=(64, 64), first=0):
    keys = np.array([sample_seed(0, 0, first + i) for i in range(n)])
    return view.draw(uniforms(keys, view.draws), np.tile(size, (n, 1)))


def _within(count, n, p, sigmas=4.5):
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1


def _ks_uniform(values, low, high):
    """Kolmogorov-Smirnov against U[low, high]: critical value at alpha = 0.001 is 1.95 / sqrt(n)."""
    values = np.sort(values)
    emp = np.arange(1, len(values) + 1) / len(values)
    return np.abs(emp - (values - low) / (high - low)).max() < 1.95 / math.sqrt(len(values))


def _ks_two(ours, theirs):
    """Two-sample Kolmogorov-Smirnov, critical value at alpha = 0.001: 1.95 * sqrt(2 / n)."""
    ours, theirs = np.sort(ours), np.sort(theirs)
    at = np.concatenate([ours, theirs])
    cdf = lambda sample: np.searchsorted(sample, at, side="right") / len(sample)  # noqa: E731
    return np.abs(cdf(ours) - cdf(theirs)).max() < 1.95 * math.sqrt(2 / len(ours))


def test_parameter_distributions_match_torchvision():
    n = 3000
    v2 = _draws(view_specs("moco-v2", 32)[0], n)
    jitter, blur = v2["jitter"], v2["blur"]
    assert _within(jitter["on"].sum(), n, 0.8) and _within(v2["gray"]["on"].sum(), n, 0.2)
    assert _within(blur["on"].sum(), n, 0.5) and _within(v2["flip"]["on"].sum(), n, 0.5)
    on = jitter["on"]
    f = jitter["factor"][on]
    assert f[:, :3].min() >= 0.6 and f[:, :3].max() <= 1.4 and np.abs(f[:, 3]).max() <= 0.1
    assert np.array_equal(jitter["factor"][~on], np.tile([1.0, 1, 1, 0], ((~on).sum(), 1)))
    assert _ks_uniform(f[:, 0], 0.6, 1.4) and _ks_uniform(f[:, 3], -0.1, 0.1)
    # chi-square: the 24 jitter orders are equally likely (23 dof, critical value at 0.001: 49.73)
    codes = jitter["order"][on] @ np.array([64, 16, 4, 1])
    counts = np.unique(codes, return_counts=True)[1]
    expected = on.sum() / 24
    assert len(counts) == 24 and ((counts - expected) ** 2 / expected).sum() < 49.73
    sigma = blur["sigma"][blur["on"]]
    assert sigma.min() >= 0.1 and sigma.max() <= 2.0 and _ks_uniform(sigma, 0.1, 2.0)
    assert (blur["sigma"][~blur["on"]] == 0).all()
    # RandomResizedCrop: areas, aspect ratios and offsets distributed as torchvision v2's own draws
    rrc = T2.RandomResizedCrop(32, scale=(0.2, 1.0))
    torch.manual_seed(7)
    theirs = np.array([[p["top"], p["left"], p["height"], p["width"]]
                       for p in (rrc.make_params([torch.zeros(3, 64, 64)]) for _ in range(n))])
    ours = v2["crop"]["box"]
    for stat in (lambda b: b[:, 2] * b[:, 3], lambda b: b[:, 3] / b[:, 2], lambda b: b[:, 0], lambda b: b[:, 1]):
        assert _ks_two(stat(ours), stat(theirs))
    assert (ours[:, 2] * ours[:, 3]).min() >= 0.19 * 64 ** 2 and (ours[:, :2] + ours[:, 2:] <= 64).all()
    v3 = _draws(view_specs("moco-v3", 32)[1], n)
    assert _within(v3["solarize"]["on"].sum(), n, 0.2) and _within(v3["blur"]["on"].sum(), n, 0.1)
    assert v3["jitter"]["factor"][v3["jitter"]["on"]][:, 2].max() <= 1.2
    assert _draws(view_specs("moco-v3", 32)[0], 200)["blur"]["on"].all()


def test_crop_fallback_on_extreme_aspect_ratios():
    """A 200x10 image makes every ratio draw fail: get_params falls back to a central crop."""
    boxes = _draws(view_specs("cifar", 8)[0], 50, (10, 200))["crop"]["box"]
    assert (boxes == [0, (200 - 13) // 2, 10, 13]).all()


def test_a_sample_draws_the_same_alone_in_part_or_in_any_batch():
    """The loader's crop and flip (``geometric_only``) are the batch's; a sample's parameters do not
    depend on the other samples drawn with it."""
    views = BatchedTwoViews("moco-v3", 24)
    keys, sizes = np.arange(10) * 7919, np.tile([50, 60], (10, 1))
    whole = views.draw(keys, sizes)
    for i in (0, 6):
        alone = views.draw(keys[i:i + 1], sizes[i:i + 1])
        part = views.draw(keys[i:i + 1], sizes[i:i + 1], geometric_only=True)
        for v in range(2):
            assert set(part[v]) == {"crop", "flip"}
            for name, stage in alone[v].items():
                for key, value in stage.items():
                    assert np.array_equal(value[0], whole[v][name][key][i])
                    if name in part[v]:
                        assert np.array_equal(value, part[v][name][key])


def _save_images(root, n=12):
    root.mkdir()
    for i in range(n):
        Image.effect_noise((36 + i, 30), 40 + i).convert("RGB").save(root / f"{i:02d}.png")
    return root


def test_views_depend_only_on_seed_epoch_and_index(tmp_path):
    """Any worker count, and a run resumed mid-epoch (its loader starting at the second batch),
    crop and augment each sample alike."""
    ds = ImageFolder(_save_images(tmp_path / "d"), BatchedTwoViews("moco-v2", 16), seed=5)
    runs = [list(DataLoader(ds, batch_size=4, num_workers=workers, collate_fn=collate_images)) for workers in (0, 2)]
    for a, b in zip(*runs):
        assert torch.equal(a.images.crops, b.images.crops) and torch.equal(a.images.keys, b.images.keys)
    resumed = next(iter(DataLoader(Subset(ds, range(4, 12)), batch_size=8, collate_fn=collate_images)))
    first = runs[0][1].images
    assert torch.equal(resumed.images.crops[:4], first.crops)
    q, k = ds.transform.augment(first)
    q8, k8 = ds.transform.augment(resumed.images)
    # in another batch only the CPU chunking differs (a chunk of one image may take other float kernels)
    assert (q8[:4] - q).abs().max() <= 1e-4 and (k8[:4] - k).abs().max() <= 1e-4
    assert q.shape == (4, 3, 16, 16) and not torch.equal(q, k)
    ds.set_epoch(1)
    assert not torch.equal(ds[0][0].crops, runs[0][0].images.crops[0])


def _edge_blur(x, taps):
    """Each channel convolved with the separable kernel ``taps``, edge pixels repeated (PIL's border)."""
    r = len(taps) // 2
    k = torch.as_tensor(taps, dtype=torch.float32)
    y = F.pad(x.unsqueeze(1), (r,) * 4, mode="replicate")
    return F.conv2d(F.conv2d(y, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1)).squeeze(1)


def _reference_view(view, crop, params):
    """One view by torchvision.transforms.v2.functional, one op at a time, from one sample's
    drawn parameters (the blur by a direct convolution with the drawn kernel)."""
    x = crop.float() / 255
    jitter_ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for stage in view.stages:
        p = params[stage.name]
        if isinstance(stage, V.ColorJitter) and p["on"]:
            for op in p["order"].tolist():
                x = jitter_ops[op](x, float(p["factor"][op]))
        elif isinstance(stage, V.Grayscale) and p["on"]:
            x = TF.rgb_to_grayscale(x, 3)
        elif isinstance(stage, V.Blur) and p["on"]:
            x = _edge_blur(x, p["taps"])
        elif isinstance(stage, V.Solarize) and p["on"]:
            x = TF.solarize(x, 128 / 255)
    return x


def _sample(params, j):
    return {name: {key: value[j] for key, value in stage.items()} for name, stage in params.items()}


def _whole_batch(view, params, whole, image_bytes):
    return None, [(0, len(params["crop"]["box"]))]


@pytest.mark.parametrize("name, chunk_bytes", [("moco-v2", None), ("moco-v3", None), ("moco-v3", 1), ("cifar", 40000)])
def test_augment_equals_torchvision_op_by_op_in_every_chunking(name, chunk_bytes, monkeypatch):
    """The CPU path (samples sorted by hue position, cache-sized chunks, runs of one stage; one
    image per chunk with ``chunk_bytes`` 1), the whole-batch path a GPU takes, and channels_last
    output all equal the drawn parameters applied by torchvision, sample by sample."""
    if chunk_bytes is not None:
        monkeypatch.setattr(B, "CPU_CHUNK_BYTES", chunk_bytes)
    views = BatchedTwoViews(name, 40, crop_min=0.2)
    batch = default_collate([views(_noise(70, 60, seed=i), key=i) for i in range(48)])
    q, k = views.augment(batch)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in recipe(name).normalize)
    for i, (out, params) in enumerate(zip((q, k), views.draw(batch.keys.numpy(), batch.sizes.numpy()))):
        ref = torch.stack([_reference_view(views.views[i], batch.crops[j, i], _sample(params, j))
                           for j in range(len(out))])
        assert (out * std + mean - ref).abs().max() <= 2 / 255
    monkeypatch.setattr(BatchedTwoViews, "_plan", staticmethod(_whole_batch))  # the GPU's one chunk
    q2, k2 = views.augment(batch, channels_last=True)
    assert q2.is_contiguous(memory_format=torch.channels_last)
    # chunkings differ in float rounding only (a single image: matrix-product blur, merged blends)
    assert (q2 - q).abs().max() <= 1e-4 and (k2 - k).abs().max() <= 1e-4


def test_batched_resized_crop_equals_torchvision():
    """Float resize weights built for all boxes at once: torchvision's float resized_crop, and its
    uint8 one (which rounds) within 1/255; flips folded into the weights."""
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[0, 0, 32, 32], [3, 5, 20, 25], [10, 2, 9, 30], [0, 0, 5, 5], [1, 1, 31, 28]])
    flips = [False, True, False, True, False]
    for size in (24, 32):  # boxes larger than the output (matrix products) or not (grid_sample)
        out = B.batched_resized_crop(images, boxes, flips, size)
        for dtype, tol in ((torch.float32, 2e-3), (torch.uint8, 1.0)):
            ref = torch.stack([TF.resized_crop(im.to(dtype), *b.tolist(), [size, size], antialias=True).float()
                               for im, b in zip(images, boxes)])
            ref = torch.stack([r.flip(-1) if f else r for r, f in zip(ref, flips)])
            assert (out - ref).abs().max() <= tol


def test_images_of_the_output_size_are_cropped_in_the_batch():
    """A 32 px image for a 32 px view ships as it is (cropped in the batch); a batch mixing such
    images with larger ones augments each exactly as the per-image loader crop would."""
    views = BatchedTwoViews("cifar", 32)
    small, large = _noise(32, 32, seed=1), _noise(40, 36, seed=2)
    shipped = views(small, key=3)
    assert shipped.sizes.tolist() == [32, 32] and torch.equal(shipped.crops[0], small)
    batch = default_collate([views(image, key=seed) for seed, image in enumerate([small, large, small, small, large])])
    q, k = views.augment(batch)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in recipe("cifar").normalize)
    for i, (outs, params) in enumerate(zip((q, k), views.draw(batch.keys.numpy(), batch.sizes.numpy()))):
        for j, out in enumerate(outs):
            crop, p = batch.crops[j, i], _sample(params, j)
            if batch.sizes[j].tolist() == [32, 32]:  # the float crop (torchvision's float resized_crop: not rounded)
                crop = B.batched_resized_crop(crop.unsqueeze(0), p["crop"]["box"][None], [p["flip"]["on"]], 32)[0]
            ref = _reference_view(views.views[i], crop, p)
            assert (out * std + mean - ref).abs().max() <= 2 / 255


def test_views_of_output_size_images_through_loader_workers(tmp_path):
    root = tmp_path / "s"
    root.mkdir()
    for i in range(8):
        Image.effect_noise((16, 16), 40 + i).convert("RGB").save(root / f"{i}.png")
    ds = ImageFolder(root, BatchedTwoViews("cifar", 16), seed=1, cache_images="on")
    runs = [list(DataLoader(ds, batch_size=4, num_workers=w, collate_fn=collate_images)) for w in (0, 2)]
    for a, b in zip(*runs):
        assert (a.images.sizes == 16).all()
        assert torch.equal(a.images.crops, b.images.crops) and torch.equal(a.images.keys, b.images.keys)
        assert all(torch.equal(x, y) for x, y in zip(ds.transform.augment(a.images), ds.transform.augment(b.images)))


def test_send_puts_a_views_factors_in_one_copy():
    tree = {"jitter": {"on": np.ones(3, bool), "alpha": np.full((3, 4), 2.0)}, "norm": {"scale": np.ones((1, 3))}}
    cpu = transfer.send(tree, torch.device("cpu"))
    assert set(cpu["jitter"]) == {"alpha"} and cpu["jitter"]["alpha"].dtype == torch.float32
    on_meta = transfer.send(tree, torch.device("meta"))
    assert on_meta["jitter"]["alpha"].shape == (3, 4) and on_meta["norm"]["scale"].device.type == "meta"


def _device_of(args, kwargs):
    found = kwargs.get("device")
    for a in args:
        if isinstance(a, (str, torch.device)):
            found = a
    return None if found is None else torch.device(found)


def test_augment_on_a_device_never_reads_back_nor_copies_blocking(monkeypatch):
    """On the meta device (tensors without data: any read back, ``.item()``, ``.tolist()``, ``bool``,
    raises) the GPU path runs through; every host-to-device copy is non-blocking, and the view's
    parameters travel in one ``send``. What only a GPU can tell: that the copies overlap the
    previous step (``transfer.py``)."""
    copies, sends = [], []
    to, copy_ = torch.Tensor.to, torch.Tensor.copy_

    def spy_to(self, *args, **kwargs):
        target = _device_of(args, kwargs)
        if self.device.type == "cpu" and target is not None and target.type == "meta":
            copies.append(kwargs.get("non_blocking", False))
        return to(self, *args, **kwargs)

    def spy_copy(self, src, non_blocking=False):
        if self.device.type == "meta" and src.device.type == "cpu":
            copies.append(non_blocking)
        return copy_(self, src, non_blocking)

    send = B.send
    monkeypatch.setattr(torch.Tensor, "to", spy_to)
    monkeypatch.setattr(torch.Tensor, "copy_", spy_copy)
    monkeypatch.setattr(B, "send", lambda tree, device: sends.append(device) or send(tree, device))
    for name, images in [("moco-v3", [_noise(50, 40, seed=i) for i in range(40)]),
                         ("cifar", [_noise(32, 32, seed=i) if i % 3 else _noise(40, 36, seed=i) for i in range(40)])]:
        views = BatchedTwoViews(name, 32)
        batch = default_collate([views(image, key=i) for i, image in enumerate(images)])
        copies.clear(), sends.clear()
        q, k = views.augment(batch, "meta", channels_last=True)
        assert q.device.type == k.device.type == "meta" and q.shape == (40, 3, 32, 32)
        assert len(sends) == 2 and copies and not any(c is False for c in copies)
        # the crops, each view's send, and an index where a stage's samples are scattered
        assert len(copies) <= 1 + 2 * (1 + 4 + 3 + 1)


def test_bench_augment_times_any_cuda_device_by_the_wall_clock():
    """``--device cuda:0`` is a GPU too: timed by the wall clock after a synchronize, not by CPU time."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_augment.py"
    spec = importlib.util.spec_from_file_location("bench_augment", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench._on_gpu("cuda") and bench._on_gpu("cuda:0") and not bench._on_gpu("cpu")
