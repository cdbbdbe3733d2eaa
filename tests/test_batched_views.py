"""Batched views: the PIL pipeline's parameters, torchvision's distributions, seeded per sample."""
import math

import pytest
import torch
from PIL import Image, ImageFilter, ImageOps
from torch.utils.data import DataLoader, default_collate
from torchvision import transforms as T
from torchvision.transforms import v2 as T2
from torchvision.transforms.v2 import functional as TF

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
        params = batched(image).params
        assert torch.equal(torch.get_rng_state(), state)
        assert seen["box"][len(expected["box"]):] == expected["box"]
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
        assert torch.equal(a.images.crops, b.images.crops)
        assert all(torch.equal(p[k], r[k]) for p, r in zip(a.images.params, b.images.params) for k in p)
    first = runs[0][0].images
    q, k = ds.transform.augment(first)
    assert q.shape == (4, 3, 16, 16) and not torch.equal(q, k)
    ds.set_epoch(1)
    assert not torch.equal(ds[0][0].crops, first.crops[0])
