"""Batched views: the PIL pipeline's parameters, torchvision's distributions, seeded per sample."""
import math
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image, ImageFilter, ImageOps
from torch.utils.data import DataLoader, default_collate
from torchvision import transforms as T
from torchvision.transforms import v2 as T2
from torchvision.transforms.v2 import functional as TF

from mocohub.data import batched as B
from mocohub.data import draws as D
from mocohub.data import views as V
from mocohub.data.augment import augmentation, recipe, two_views, view_specs
from mocohub.data.batched import BatchedTwoViews
from mocohub.data.folder import ImageFolder, collate_images


def _noise(w=40, h=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)


def _v2_crop(rrc):
    """``rrc``'s draws, with torchvision v2's uint8 resize (v1 resizes in float and rounds)."""
    return lambda img: TF.resized_crop(img, *rrc.get_params(img, rrc.scale, rrc.ratio), list(rrc.size), antialias=True)


@pytest.mark.parametrize("name", ["cifar", "moco-v1"])
def test_batched_views_equal_torchvision_transforms_on_the_same_seed(name):
    """torchvision's transforms run on tensors too: the recipe's own pipeline is the reference."""
    views = view_specs(name, 24)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in recipe(name).normalize)
    batched = BatchedTwoViews(name, 24)
    for seed in range(8):
        image = _noise(seed=seed)
        torch.manual_seed(seed)
        # the crop on the uint8 image (as the loader does: torchvision v2's resize), the rest in float
        refs = [T.Compose([_v2_crop(crop), T.ConvertImageDtype(torch.float), *rest])(image)
                for crop, *rest in (view.pil() for view in views)]
        torch.manual_seed(seed)
        q, k = batched.augment(default_collate([batched(image)]))
        for out, ref in zip((q[0], k[0]), refs):
            assert (out * std + mean - ref).abs().max() <= 2 / 255


def test_moco_v3_draws_what_its_pil_pipeline_draws(monkeypatch):
    """Same seed, same draws: crop boxes, jitter, blur sigma, solarize, and the generator's end state."""
    seen = {"box": [], "jitter": [], "radius": [], "solarize": 0}
    get_box, get_jitter, blur, solarize = (T.RandomResizedCrop.get_params, T.ColorJitter.get_params,
                                           ImageFilter.GaussianBlur, ImageOps.solarize)
    monkeypatch.setattr(T.RandomResizedCrop, "get_params",
                        staticmethod(lambda *a: seen["box"].append(get_box(*a)) or seen["box"][-1]))
    monkeypatch.setattr(T.ColorJitter, "get_params",
                        staticmethod(lambda *a: seen["jitter"].append(get_jitter(*a)) or seen["jitter"][-1]))
    monkeypatch.setattr(ImageFilter, "GaussianBlur", lambda radius: seen["radius"].append(radius) or blur(radius))
    monkeypatch.setattr(ImageOps, "solarize", lambda img: seen.__setitem__("solarize", seen["solarize"] + 1)
                        or solarize(img))
    pil, batched = two_views("moco-v3", 32, crop_min=0.2), BatchedTwoViews("moco-v3", 32, crop_min=0.2)
    image = Image.effect_noise((48, 40), 50).convert("RGB")
    for seed in range(30):
        for key in ("box", "jitter", "radius"):
            seen[key].clear()
        seen["solarize"] = 0
        torch.manual_seed(seed)
        pil(image)
        state = torch.get_rng_state()
        expected = {key: list(seen[key]) for key in ("box", "jitter", "radius")}
        torch.manual_seed(seed)
        boxes, rows = batched.draw(image.height, image.width)
        assert torch.equal(torch.get_rng_state(), state)
        assert boxes == expected["box"]
        torch.manual_seed(seed)
        crops = batched(image)
        assert torch.equal(crops.params, rows) and torch.equal(torch.get_rng_state(), state)
        params = [crops.view_params(i) for i in (0, 1)]
        sigmas = [float(p["blur_sigma"]) for p in params]
        assert [s for s in sigmas if s > 0] == pytest.approx(expected["radius"])
        assert sum(bool(p["solarize"]) for p in params[1:]) == seen["solarize"]
        drawn = [tuple(p["jitter_order"].tolist()) for p in params if p["jitter"]]
        assert drawn == [tuple(j[0].tolist()) for j in expected["jitter"]]


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
    assert V.blur_kernel_size(224) == 23 and V.blur_kernel_size(32) == 3


def _draws(view, n, image_shape=(3, 64, 64)):
    torch.manual_seed(123)
    image = torch.empty(image_shape, dtype=torch.uint8)
    boxes, params = zip(*(view.sample(image) for _ in range(n)))
    return boxes, default_collate(list(params))


def _within(count, n, p, sigmas=4.5):
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1


def test_parameter_distributions_match_torchvision():
    n = 3000
    boxes, v2 = _draws(view_specs("moco-v2", 32)[0], n)
    assert _within(int(v2["jitter"].sum()), n, 0.8) and _within(int(v2["gray"].sum()), n, 0.2)
    assert _within(int((v2["blur_sigma"] > 0).sum()), n, 0.5) and _within(int(v2["flip"].sum()), n, 0.5)
    on = v2["jitter"]
    f = v2["jitter_factors"][on]
    assert f[:, :3].min() >= 0.6 and f[:, :3].max() <= 1.4 and f[:, 3].abs().max() <= 0.1
    assert torch.equal(v2["jitter_factors"][~on], torch.tensor([1.0, 1, 1, 0]).expand((~on).sum(), 4))
    # Kolmogorov-Smirnov: brightness ~ U[0.6, 1.4]; critical value at alpha = 0.001 is 1.95 / sqrt(n)
    b = f[:, 0].sort().values
    cdf = (b - 0.6) / 0.8
    emp = torch.arange(1, len(b) + 1) / len(b)
    assert (emp - cdf).abs().max() < 1.95 / math.sqrt(len(b))
    # chi-square: the 24 jitter orders are equally likely (23 dof, critical value at 0.001: 49.73)
    orders = v2["jitter_order"][on]
    codes = (orders * torch.tensor([64, 16, 4, 1])).sum(1)
    counts = torch.bincount(codes, minlength=256)[torch.unique(codes)].float()
    assert len(counts) == 24
    expected = len(orders) / 24
    assert ((counts - expected) ** 2 / expected).sum() < 49.73
    sigma = v2["blur_sigma"][v2["blur_sigma"] > 0]
    assert sigma.min() >= 0.1 and sigma.max() <= 2.0 and abs(sigma.mean() - 1.05) < 0.05
    # RandomResizedCrop: crop areas distributed as torchvision v2's own implementation draws them
    # (two-sample KS, critical value at alpha = 0.001: 1.95 * sqrt(2 / n))
    v2_rrc = T2.RandomResizedCrop(32, scale=(0.2, 1.0))
    torch.manual_seed(7)
    theirs = torch.tensor([(lambda b: b["height"] * b["width"])(v2_rrc.make_params([torch.zeros(3, 64, 64)]))
                           for _ in range(n)]).float().sort().values
    ours = torch.tensor([h * w for _, _, h, w in boxes]).float()
    cdf = lambda sample, at: torch.searchsorted(sample.sort().values, at, right=True) / len(sample)  # noqa: E731
    assert (cdf(ours, theirs) - cdf(theirs, theirs)).abs().max() < 1.95 * math.sqrt(2 / n)
    assert ours.min() >= 0.19 * 64 ** 2
    _, v3 = _draws(view_specs("moco-v3", 32)[1], n)
    assert _within(int(v3["solarize"].sum()), n, 0.2) and _within(int((v3["blur_sigma"] > 0).sum()), n, 0.1)
    assert v3["jitter_factors"][v3["jitter"]][:, 2].max() <= 1.2
    _, v3q = _draws(view_specs("moco-v3", 32)[0], 200)
    assert bool((v3q["blur_sigma"] > 0).all())


def test_crop_fallback_on_extreme_aspect_ratios():
    """A 200x10 image makes every ratio draw fail: get_params falls back to a central crop."""
    boxes, _ = _draws(view_specs("cifar", 8)[0], 50, (3, 10, 200))
    assert all(h == 10 and w == round(10 * 4 / 3) for _, _, h, w in boxes)


def _save_images(root, n=12):
    root.mkdir()
    for i in range(n):
        Image.effect_noise((36 + i, 30), 40 + i).convert("RGB").save(root / f"{i:02d}.png")
    return root


def test_views_depend_only_on_seed_epoch_and_index(tmp_path):
    ds = ImageFolder(_save_images(tmp_path / "d"), BatchedTwoViews("moco-v2", 16), seed=5)
    runs = []
    for workers in (0, 2):
        loader = DataLoader(ds, batch_size=4, num_workers=workers, collate_fn=collate_images)
        runs.append(list(loader))
    for a, b in zip(*runs):
        assert torch.equal(a.images.crops, b.images.crops) and torch.equal(a.images.params, b.images.params)
    first = runs[0][0].images
    q, k = ds.transform.augment(first)
    assert q.shape == (4, 3, 16, 16) and not torch.equal(q, k)
    ds.set_epoch(1)
    assert not torch.equal(ds[0][0].crops, first.crops[0])


SHAPES = [(32, 32), (375, 500), (23, 37), (10, 200)]  # (height, width); 10x200 always falls back


@pytest.mark.parametrize("name", ["cifar", "moco-v1", "moco-v2", "moco-v3"])
def test_fast_draws_equal_the_torch_calls(name):
    """``View.draw`` (one read of the generator) gives ``View.sample``'s values (torch calls), bit
    for bit, and leaves the generator where the calls leave it."""
    assert D.fast_draws_available()
    views = view_specs(name, 24)
    for seed in range(60):
        height, width = SHAPES[seed % len(SHAPES)]
        torch.manual_seed(seed)
        expected = [view.sample(torch.empty(0, height, width)) for view in views]
        state = torch.get_rng_state()
        torch.manual_seed(seed)
        words = D.Words(sum(view.max_words for view in views))
        drawn = [view.draw(words, height, width) for view in views]
        words.commit()
        assert torch.equal(torch.get_rng_state(), state)
        for (box, params), (my_box, row) in zip(expected, drawn):
            assert my_box == box and torch.equal(torch.tensor(row), V.pack(params))


def test_draws_across_a_regeneration_of_the_generator_state():
    """Reads that run past the 624-word state (the twist computed ahead) and unseeded use."""
    torch.manual_seed(3)
    torch.rand(600)
    view = view_specs("moco-v3", 24)[1]
    with torch.random.fork_rng(devices=()):
        expected = [view.sample(torch.empty(0, 40, 40)) for _ in range(30)]
    for box, params in expected:
        words = D.Words(view.max_words)
        my_box, row = view.draw(words, 40, 40)
        words.commit()
        assert my_box == box and torch.equal(torch.tensor(row), V.pack(params))


def test_the_self_check_holds_where_uniform_is_not_fused():
    """The float32 ``uniform_`` rounds once (FMA) on AVX2/AVX-512 kernels, twice on the default
    one: the self-check finds which, and the draws still equal torch's."""
    code = ("import torch; from mocohub.data import draws as D, views as V; from mocohub.data.augment import view_specs;"
            "ok = D.fast_draws_available(); v = view_specs('moco-v2', 24)[0]; torch.manual_seed(1);"
            "e = v.sample(torch.empty(0, 50, 60)); torch.manual_seed(1); w = D.Words(v.max_words);"
            "b, r = v.draw(w, 50, 60); print(ok, D.Words.fused, b == e[0] and torch.equal(torch.tensor(r), V.pack(e[1])))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "ATEN_CPU_CAPABILITY": "default"})
    assert out.stdout.split() == ["True", "False", "True"], out.stderr[-2000:]


def test_batched_views_without_fast_draws_are_the_same(monkeypatch):
    image = _noise(60, 45)
    fast, slow = BatchedTwoViews("moco-v2", 24), BatchedTwoViews("moco-v2", 24)
    slow.fast_draws = False
    for seed in range(10):
        torch.manual_seed(seed)
        a = fast(image)
        torch.manual_seed(seed)
        b = slow(image)
        assert torch.equal(a.crops, b.crops) and torch.equal(a.params, b.params)
    monkeypatch.setattr(D, "_CHECKED", False)  # what a failed self-check does
    assert not BatchedTwoViews("cifar", 24).fast_draws and not D.fast_draws_available()


_REFS = {"jitter": None, "gray": lambda img: TF.rgb_to_grayscale(img, 3), "solarize": lambda img: TF.solarize(img, 128 / 255)}


def _reference_view(view, crop, params):
    """One view by torchvision.transforms.v2.functional, one op at a time, from the drawn parameters."""
    x = crop.float() / 255
    jitter_ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for stage in view.stages:
        if isinstance(stage, V.ColorJitter) and params["jitter"]:
            for op in params["jitter_order"].tolist():
                x = jitter_ops[op](x, float(params["jitter_factors"][op]))
        elif isinstance(stage, V.Grayscale) and params["gray"]:
            x = TF.rgb_to_grayscale(x, 3)
        elif isinstance(stage, V.Blur) and params["blur_sigma"] > 0:
            size = V.blur_kernel_size(x.shape[-1])
            x = TF.gaussian_blur(x, [size, size], [float(params["blur_sigma"])] * 2)
        elif isinstance(stage, V.Solarize) and params["solarize"]:
            x = TF.solarize(x, 128 / 255)
    return x


@pytest.mark.parametrize("name, chunk_bytes", [("moco-v2", None), ("moco-v3", None), ("moco-v3", 1), ("cifar", 40000)])
def test_augment_equals_torchvision_op_by_op_in_every_chunking(name, chunk_bytes, monkeypatch):
    """The CPU path (samples sorted by hue position, cache-sized chunks, runs of one stage; one
    image per chunk with ``chunk_bytes`` 1), the whole-batch path a GPU takes, and channels_last
    output all equal the drawn parameters applied by torchvision, sample by sample."""
    if chunk_bytes is not None:
        monkeypatch.setattr(B, "CPU_CHUNK_BYTES", chunk_bytes)
    views = BatchedTwoViews(name, 40, crop_min=0.2)
    torch.manual_seed(0)
    batch = default_collate([views(_noise(70, 60, seed=i)) for i in range(48)])
    q, k = views.augment(batch)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in recipe(name).normalize)
    for i, out in enumerate((q, k)):
        params = batch.view_params(i)
        ref = torch.stack([_reference_view(views.views[i], batch.crops[j, i], {n: v[j] for n, v in params.items()})
                           for j in range(len(out))])
        assert (out * std + mean - ref).abs().max() <= 2 / 255
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))  # the GPU's one chunk
    q2, k2 = views.augment(batch, channels_last=True)
    assert q2.is_contiguous(memory_format=torch.channels_last)
    # a chunk's blur keeps the taps any of its samples needs: chunkings differ by skipped taps (< 1e-4 of the range)
    assert (q2 - q).abs().max() <= 1e-3 and (k2 - k).abs().max() <= 1e-3


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
    """A 32 px image for a 32 px view ships as it is (crop box pending); a batch mixing such
    images with larger ones augments each exactly as the per-image loader crop would."""
    views = BatchedTwoViews("cifar", 32)
    small, large = _noise(32, 32, seed=1), _noise(40, 36, seed=2)
    torch.manual_seed(3)
    shipped = views(small)
    assert shipped.boxes[:, 0].tolist() == [1, 1] and torch.equal(shipped.crops[0], small)
    items = []
    for seed, image in enumerate([small, large, small, small, large]):
        torch.manual_seed(seed)
        items.append(views(image))
    batch = default_collate(items)
    q, k = views.augment(batch)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in recipe("cifar").normalize)
    for j, item in enumerate(items):
        for i, out in enumerate((q[j], k[j])):
            pending, *box = item.boxes[i].tolist()
            crop = item.crops[i]
            if pending:  # the float crop (torchvision's float resized_crop: not rounded to uint8)
                crop = B.batched_resized_crop(crop.unsqueeze(0), torch.tensor([box]),
                                              [bool(item.params[i, V.SLOTS["flip"]] > 0.5)], 32)[0]
            ref = _reference_view(views.views[i], crop, item.view_params(i))
            assert (out * std + mean - ref).abs().max() <= 2 / 255


def test_views_of_output_size_images_through_loader_workers(tmp_path):
    root = tmp_path / "s"
    root.mkdir()
    for i in range(8):
        Image.effect_noise((16, 16), 40 + i).convert("RGB").save(root / f"{i}.png")
    ds = ImageFolder(root, BatchedTwoViews("cifar", 16), seed=1, cache_images="on")
    runs = [list(DataLoader(ds, batch_size=4, num_workers=w, collate_fn=collate_images)) for w in (0, 2)]
    for a, b in zip(*runs):
        assert bool((a.images.boxes[..., 0] == 1).all())
        assert torch.equal(a.images.crops, b.images.crops) and torch.equal(a.images.boxes, b.images.boxes)
        assert all(torch.equal(x, y) for x, y in zip(ds.transform.augment(a.images), ds.transform.augment(b.images)))


def test_the_self_check_leaves_the_generators_alone(monkeypatch):
    seeded = []
    monkeypatch.setattr(torch, "manual_seed", lambda seed: seeded.append(seed))  # would reseed CUDA's too
    state = torch.get_rng_state()
    assert D._self_check() and torch.equal(torch.get_rng_state(), state) and seeded == []
