"""Each batched op equals torchvision.transforms.v2.functional's (or PIL's) on every image of the batch."""
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torchvision.transforms.v2 import functional as TF

from mocohub.data import photometric as P
from mocohub.data.batched import resized_crop
from mocohub.data.transfer import send
from mocohub.data.views import Blur, ColorJitter

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
    """In [0, 1] as torchvision's float images, and in [0, 255] as the batched pipeline runs."""
    factors = _factors(low, high)
    expected = _each(ref, images, factors)
    out = op(images.clone(), factors)
    assert (out - expected).abs().max() <= TOL
    assert not torch.allclose(out, images, atol=TOL)  # they did something
    kwargs = {} if op is P.adjust_hue else {"bound": 255.0}
    assert (op(images * 255, factors, **kwargs) / 255 - expected).abs().max() <= TOL


def test_ops_work_in_place_and_on_single_images(images):
    """A chunk of one image takes the plain-float paths (hue, blur): the same results."""
    for op, factors in [(P.adjust_hue, _factors(-0.5, 0.5)), (P.adjust_saturation, _factors(0.0, 2.0)),
                        (lambda x, s: P.gaussian_blur(x, s, 5), _factors(0.1, 2.0))]:
        x = images.clone()
        assert op(x, factors).data_ptr() == x.data_ptr()
        singles = torch.cat([op(images[i:i + 1].clone(), factors[i:i + 1]) for i in range(N)])
        assert (x - singles).abs().max() <= 1e-5


def test_hue_on_ties_gray_and_primary_colours():
    """Every tie of the max (R first, as torchvision), gray pixels, all six sextants, both wraps."""
    levels = torch.tensor([0.0, 0.25, 0.5, 1.0])
    rgb = torch.cartesian_prod(levels, levels, levels).t().reshape(1, 3, 8, 8)
    x = rgb.expand(7, -1, -1, -1).contiguous()
    shifts = torch.tensor([-0.5, -0.31, -1 / 6, 0.0, 0.07, 1 / 3, 0.5])
    out = P.adjust_hue(x.clone(), shifts)
    assert (out - _each(TF.adjust_hue, x, shifts)).abs().max() <= 1e-5


def test_blend_runs_a_different_op_on_each_sample(images):
    """Brightness, contrast, saturation and the identity in one call, each sample its own."""
    f = _factors(0.6, 1.4)
    kinds = [0, 1, 2, 3, 1, 2]  # brightness, contrast, saturation, identity
    alpha = torch.where(torch.tensor(kinds) == 3, torch.ones(N), f)
    beta = torch.tensor([1 - float(f[i]) if k == 1 else 0.0 for i, k in enumerate(kinds)])
    gamma = torch.tensor([1 - float(f[i]) if k == 2 else 0.0 for i, k in enumerate(kinds)])
    out = P.blend(images.clone(), alpha, beta, gamma)
    refs = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, lambda img, _: img)
    for i, k in enumerate(kinds):
        assert (out[i] - refs[k](images[i], float(f[i]))).abs().max() <= TOL


def test_grayscale_and_solarize_match_torchvision(images):
    assert torch.equal(P.grayscale(images), TF.rgb_to_grayscale(images))
    ref = torch.stack([TF.solarize(img, 128 / 255) for img in images])
    assert torch.equal(P.solarize(images.clone()), ref)
    assert torch.allclose(P.solarize(images * 255, 128, bound=255.0) / 255, ref, atol=1e-6)


def _edge_blur(img, sigma, radius):
    """A separable Gaussian of ``radius`` taps each side, edge pixels repeated (PIL's border), by conv2d."""
    grid = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (grid / sigma) ** 2)
    k = (k / k.sum()).float()
    x = F.pad(img.unsqueeze(1), (radius,) * 4, mode="replicate")
    return F.conv2d(F.conv2d(x, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1)).squeeze(1)


@pytest.mark.parametrize("size", [5, 23])
@pytest.mark.parametrize("shape", [(30, 34), (32, 48), (24, 40), (16, 16)])  # taps; banded products in blocks
# of 16, of 8; of 8 where a 16 block pads the bottom by more than the image (23 taps)
def test_blur_with_per_sample_sigma_matches_a_direct_convolution(size, shape):
    """Taps under BLUR_TAIL are skipped: within 5e-4 of the full kernel (2/255 is 8e-3).
    Single images whose sides divide by 16 or 8 blur by banded matrix products, others (and
    chunks of several images) by one multiply-add per tap."""
    x = torch.rand(N, 3, *shape, generator=torch.Generator().manual_seed(3))
    sigma = _factors(0.1, 2.0)
    sigma[0] = 0.1  # a single-tap kernel
    ref = torch.stack([_edge_blur(img, float(s), size // 2) for img, s in zip(x, sigma)])
    assert (P.gaussian_blur(x.clone(), sigma, size) - ref).abs().max() <= 5e-4
    singles = torch.cat([P.gaussian_blur(x[i:i + 1].clone(), sigma[i:i + 1], size) for i in range(N)])
    assert (singles - ref).abs().max() <= 5e-4


@pytest.mark.parametrize("size", [32, 64, 224])
@pytest.mark.parametrize("sigma", [0.1, 2.0])
def test_blur_stage_equals_pil_gaussian_blur_at_every_size(size, sigma):
    """The batched blur with the kernel its stage draws for a view of ``size`` px, against the
    reference pipeline's ``ImageFilter.GaussianBlur(radius=sigma)`` on a noise image (the hardest
    case: every pixel differs from its neighbours). PIL approximates the Gaussian by box blurs and
    rounds to uint8, so pixels differ (a 0.1 sigma by up to 6/255): the mean difference is within
    2/255, and the blur as strong (pixel spread within 2/255). A kernel of 10% of the image (3 taps
    at 32 px) made sigma 2 a mild filter: mean difference 16/255."""
    image = Image.fromarray(np.random.default_rng(size).integers(0, 256, (size, size, 3), dtype=np.uint8))
    ref = torch.from_numpy(np.array(image.filter(ImageFilter.GaussianBlur(radius=sigma)))).permute(2, 0, 1).float()
    stage = Blur(1.0, (sigma, sigma))
    params = stage.draw(np.random.default_rng(0).random((1, stage.draws)), size)
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().unsqueeze(0)
    for dev in (None, send(params, x.device)):  # a single CPU image, and a chunk's path
        out = stage.apply(x.clone(), params, dev, 255.0)[0]
        assert (out - ref).abs().mean() <= 2.0 and abs(out.std() - ref.std()) <= 2.0


def test_blur_uses_matrix_products_only_at_full_float32_precision(monkeypatch):
    calls = []
    monkeypatch.setattr(P, "_blur_gemm", lambda *a: calls.append(1) or a[0])
    x = torch.rand(1, 3, 32, 32)
    P.gaussian_blur(x, torch.tensor([1.0]), 5)
    assert calls == [1]
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")  # matmuls may then round through bf16 or tf32
    try:
        P.gaussian_blur(x, torch.tensor([1.0]), 5)
    finally:
        torch.set_float32_matmul_precision(previous)
    assert calls == [1]


def test_apply_where_computes_only_the_selected_samples(images, monkeypatch):
    calls = []

    def op(x, f):
        calls.append(len(x))
        return P.adjust_brightness(x, f)

    factors = _factors(0.6, 1.4)
    expected = P.adjust_brightness(images.clone(), factors)
    for mask, counts in [([True, False, True, False, False, True], [1, 1, 1]),  # runs, in place
                         ([True, True, False, False, True, True], [2, 2]),
                         ([True, False] * 3, None)]:
        calls.clear()
        mask_t = torch.tensor(mask)
        if counts is None:  # more runs than MAX_RUNS: gathered, computed, written back
            monkeypatch.setattr(P, "MAX_RUNS", 2)
            counts = [3]
        out = P.apply_where(images.clone(), mask, op, factors)
        assert calls == counts
        assert torch.equal(out[~mask_t], images[~mask_t])
        assert torch.equal(out[mask_t], expected[mask_t])
    calls.clear()
    assert torch.equal(P.apply_where(images.clone(), [False] * N, op, factors), images) and calls == []


def _one(params, i):
    return {name: value[i:i + 1] for name, value in params.items()}


@pytest.mark.parametrize("bound", [1.0, 255.0])
def test_jitter_applies_each_samples_own_order(images, bound):
    jitter = ColorJitter(0.4, 0.4, 0.4, 0.1)
    g = torch.Generator().manual_seed(2)
    order = torch.stack([torch.randperm(4, generator=g) for _ in range(N)])
    factors = torch.stack([_factors(0.6, 1.4, 3)[:4], _factors(0.6, 1.4, 4)[:4], _factors(0.6, 1.4, 5)[:4],
                           _factors(-0.1, 0.1, 6)[:4]], 1).repeat(2, 1)[:N]
    on = torch.tensor([True, True, True, True, False, True])
    params = jitter.params(on.numpy(), order.numpy(), factors.numpy())
    out = jitter.apply(images.clone() * bound, params, send(params, images.device), bound) / bound
    # one image at a time: runs of blends merged into one (every factor but a run's last <= 1)
    singles = torch.cat([jitter.apply(images[i:i + 1].clone() * bound, _one(params, i), None, bound)
                         for i in range(N)]) / bound
    refs = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for i in range(N):
        expected = images[i]
        for op_id in order[i].tolist() if on[i] else []:
            expected = refs[op_id](expected, float(factors[i, op_id]))
        assert (out[i] - expected).abs().max() <= TOL
        assert (singles[i] - expected).abs().max() <= TOL


def test_merged_blend_runs_match_torchvision():
    """Every order of brightness, contrast and saturation, factors on both sides of 1."""
    x = torch.rand(1, 3, 10, 12, generator=torch.Generator().manual_seed(4))
    jitter = ColorJitter(0.4, 0.4, 0.4, 0.0)
    refs = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    for order in itertools.permutations(range(3)):
        for factors in ([0.7, 0.8, 0.9, 0.0], [1.3, 0.7, 1.2, 0.0], [0.65, 1.35, 0.75, 0.0]):
            params = jitter.params(np.array([True]), np.array([[*order, 3]]), np.array([factors]))
            expected = x[0]
            for op in order:
                expected = refs[op](expected, factors[op])
            out = jitter.apply(x.clone() * 255, params, None, 255.0)[0] / 255
            assert (out - expected).abs().max() <= TOL, (order, factors)


def test_crop_and_flip_match_torchvision():
    img = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)
    for box, size in [((3, 5, 30, 41), 24), ((0, 0, 40, 50), 64), ((7, 2, 9, 13), 16)]:
        assert torch.equal(resized_crop(img, *box, size), TF.resized_crop(img, *box, [size, size], antialias=True))
    hwc = img.permute(1, 2, 0).contiguous().permute(2, 0, 1)  # the layout pil_to_uint8 gives
    assert torch.equal(resized_crop(hwc, 3, 5, 30, 41, 24), TF.resized_crop(img, 3, 5, 30, 41, [24, 24]))
    assert torch.equal(img.flip(-1), TF.horizontal_flip(img))
    assert torch.equal(resized_crop(img, 4, 6, 24, 24, 24), TF.resized_crop(img, 4, 6, 24, 24, [24, 24]))  # cut only
