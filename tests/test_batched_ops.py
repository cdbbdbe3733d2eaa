"""Each batched op equals torchvision.transforms.v2.functional's on every image of the batch."""
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from mocohub.data import photometric as P
from mocohub.data.batched import resized_crop
from mocohub.data.views import ColorJitter

TOL = 2 / 255
N = 6


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(N, 3, 12, 14, generator=g)
    x[0] = x[0, :1]  # a gray image
    x[1, :, :2] = 1.0  # saturated pixels: clamping and hue ties
    return x


def _factors(low, high, seed=1):
    return torch.empty(N).uniform_(low, high, generator=torch.Generator().manual_seed(seed))


def _each(ref, x, factors):
    return torch.stack([ref(img, float(f)) for img, f in zip(x, factors)])


@pytest.mark.parametrize("op, ref, low, high", [
    (P.adjust_brightness, TF.adjust_brightness, 0.6, 1.4),
    (P.adjust_contrast, TF.adjust_contrast, 0.6, 1.4),
    (P.adjust_saturation, TF.adjust_saturation, 0.0, 2.0),
    (P.adjust_hue, TF.adjust_hue, -0.5, 0.5),
])
def test_colour_adjustments_match_torchvision(images, op, ref, low, high):
    factors = _factors(low, high)
    out = op(images.clone(), factors)
    assert (out - _each(ref, images, factors)).abs().max() <= TOL
    assert not torch.allclose(out, images, atol=TOL)  # they did something


def test_hue_shift_of_zero_is_identity_and_full_turn_wraps(images):
    assert torch.allclose(P.adjust_hue(images, torch.zeros(N)), images, atol=1e-6)
    half = P.adjust_hue(P.adjust_hue(images, torch.full((N,), 0.5)), torch.full((N,), 0.5))
    assert torch.allclose(half, images, atol=1e-5)


def test_grayscale_and_solarize_match_torchvision(images):
    assert (P.grayscale(images) - TF.rgb_to_grayscale(images)).abs().max() <= TOL
    ref = torch.stack([TF.solarize(img, 128 / 255) for img in images])
    assert torch.equal(P.solarize(images), ref)


def test_blur_with_per_sample_sigma_matches_torchvision(images):
    sigma = _factors(0.1, 2.0)
    out = P.gaussian_blur(images, sigma, 5)
    ref = torch.stack([TF.gaussian_blur(img, [5, 5], [float(s)] * 2) for img, s in zip(images, sigma)])
    assert (out - ref).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="larger than 12 px"):
        P.gaussian_blur(images, sigma, 25)


def test_apply_where_computes_only_the_selected_samples(images):
    mask = torch.tensor([True, False, True, False, False, True])
    calls = []

    def op(x, f):
        calls.append(len(x))
        return P.adjust_brightness(x, f)

    factors = _factors(0.6, 1.4)
    out = P.apply_where(images, mask, op, factors)
    assert calls == [3]
    assert torch.equal(out[~mask], images[~mask])
    assert torch.equal(out[mask], P.adjust_brightness(images[mask], factors[mask]))


def test_jitter_applies_each_samples_own_order(images):
    jitter = ColorJitter(0.4, 0.4, 0.4, 0.1)
    g = torch.Generator().manual_seed(2)
    order = torch.stack([torch.randperm(4, generator=g) for _ in range(N)])
    factors = torch.stack([_factors(0.6, 1.4, 3)[:4], _factors(0.6, 1.4, 4)[:4], _factors(0.6, 1.4, 5)[:4],
                           _factors(-0.1, 0.1, 6)[:4]], 1).repeat(2, 1)[:N]
    on = torch.tensor([True, True, True, True, False, True])
    out = jitter.apply(images.clone(), {"jitter": on, "jitter_order": order, "jitter_factors": factors})
    refs = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for i in range(N):
        expected = images[i]
        for op_id in order[i].tolist() if on[i] else []:
            expected = refs[op_id](expected, float(factors[i, op_id]))
        assert (out[i] - expected).abs().max() <= TOL


def test_crop_and_flip_match_torchvision():
    img = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)
    for box, size in [((3, 5, 30, 41), 24), ((0, 0, 40, 50), 64), ((7, 2, 9, 13), 16)]:
        assert torch.equal(resized_crop(img, *box, size), TF.resized_crop(img, *box, [size, size], antialias=True))
    hwc = img.permute(1, 2, 0).contiguous().permute(2, 0, 1)  # the layout pil_to_uint8 gives
    assert torch.equal(resized_crop(hwc, 3, 5, 30, 41, 24), TF.resized_crop(img, 3, 5, 30, 41, [24, 24]))
    assert torch.equal(img.flip(-1), TF.horizontal_flip(img))
