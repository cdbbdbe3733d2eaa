"""MoCo v1/v2 against hand-computed values and an independent transcription of the official code."""
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from mocohub import MoCo
from mocohub.algorithm import SplitBatchNorm, momentum_update_
from reference_moco import ReferenceMoCo
from step_equality import step_both_and_compare


def _strip(sd, prefix="module."):
    return {k[len(prefix):]: v for k, v in sd.items()}


def test_official_resnet50_v2_state_dict_loads_strictly():
    ref = ReferenceMoCo("resnet50", dim=128, K=256, mlp=True)
    official = {"module." + k: v for k, v in ref.state_dict().items()}  # the layout of the released files
    ours = MoCo("resnet50", dim=128, K=256, mlp=True)
    ours.load_state_dict(_strip(official), strict=True)
    assert ours.encoder_q.fc[0].weight.shape == (2048, 2048)
    assert ours.encoder_q.fc[2].weight.shape == (128, 2048)
    assert set(ours.state_dict()) == set(_strip(official))


def test_v1_head_is_linear():
    ours = MoCo("resnet18", dim=64, K=128)
    assert isinstance(ours.encoder_q.fc, nn.Linear) and ours.encoder_q.fc.weight.shape == (64, 512)
    assert all(not p.requires_grad for p in ours.encoder_k.parameters())
    assert ours.queue.shape == (64, 128) and torch.allclose(ours.queue.norm(dim=0), torch.ones(128))


def test_backbone_config_of_a_mocohub_resnet_name_rebuilds_it_in_plain_timm():
    ours = MoCo("resnet10t_half", dim=16, K=32, mlp=True).eval()
    spec = ours.backbone_config()
    assert (spec["architecture"], spec["num_features"]) == ("resnet10t", 256)
    plain = timm.create_model(spec["architecture"], num_classes=0, **spec["model_args"]).eval()
    plain.load_state_dict(ours.backbone_state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), ours.encoder_q.forward_head(ours.encoder_q.forward_features(x),
                                                                         pre_logits=True))


@pytest.mark.parametrize("mlp", [False, True])
def test_matches_official_forward_backward_update_and_queue(mlp):
    torch.manual_seed(0)
    ref = ReferenceMoCo("resnet18", dim=16, K=8, m=0.9, T=0.2, mlp=mlp, cifar_stem=True)
    ours = MoCo("resnet18", dim=16, K=8, m=0.9, T=0.2, mlp=mlp, stem="cifar")
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref, ours = ref.double(), ours.double()  # float64: agreement to 1e-9 leaves no room for a bug
    opt_ref = torch.optim.SGD(ref.encoder_q.parameters(), lr=0.05, momentum=0.9)
    opt_ours = torch.optim.SGD(ours.encoder_q.parameters(), lr=0.05, momentum=0.9)
    for step in range(3):  # 3 steps of 4 keys wrap the 8-slot queue (the 3rd overwrites the 1st's keys)
        im_q, im_k = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randn(4, 3, 8, 8, dtype=torch.float64)
        torch.manual_seed(100 + step)
        logits_r, labels_r = ref(im_q, im_k)
        loss_r = F.cross_entropy(logits_r, labels_r)
        torch.manual_seed(100 + step)
        logits_o, labels_o = ours(im_q, im_k)
        loss_o = F.cross_entropy(logits_o, labels_o)
        torch.testing.assert_close(logits_o, logits_r, rtol=1e-9, atol=1e-9)
        assert torch.equal(labels_o, labels_r)
        torch.testing.assert_close(loss_o, loss_r)
        step_both_and_compare(ref, ours, opt_ref, opt_ours, loss_r, loss_o)
    assert int(ours.queue_ptr) == 4


def test_momentum_update_by_hand():
    k, q = [torch.ones(3), torch.full((2,), 10.0)], [torch.full((3,), 3.0), torch.zeros(2)]
    momentum_update_(k, q, 0.9)
    assert torch.allclose(k[0], torch.full((3,), 1.2)) and torch.allclose(k[1], torch.full((2,), 9.0))


def test_momentum_update_leaves_bn_buffers():
    model = MoCo("resnet18", dim=8, K=8, m=0.5, stem="cifar")
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(1.0)
        model.encoder_q.bn1.running_mean.fill_(7.0)
    before = [p.clone() for p in model.encoder_k.parameters()]
    model._momentum_update_key_encoder()
    for b, k, q in zip(before, model.encoder_k.parameters(), model.encoder_q.parameters()):
        torch.testing.assert_close(k, 0.5 * b + 0.5 * q)
    assert torch.all(model.encoder_k.bn1.running_mean == 0)


class _Linear(nn.Module):
    """A one-layer 'ResNet': fc over flattened input, so logits can be computed by hand."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2, bias=False)

    def forward(self, x):
        return self.fc(x)


def test_logits_and_queue_by_hand():
    model = MoCo(_Linear(), dim=2, K=4, m=0.0, T=0.5)
    with torch.no_grad():
        model.encoder_q.fc.weight.copy_(torch.eye(2))
        model.encoder_q.fc.bias.zero_()
        model.queue.copy_(torch.tensor([[1.0, 0.0, -1.0, 0.0], [0.0, 1.0, 0.0, -1.0]]))
    im_q = torch.tensor([[3.0, 4.0], [0.0, 2.0]])   # normalised: (.6, .8), (0, 1)
    im_k = torch.tensor([[1.0, 0.0], [0.0, -5.0]])  # normalised: (1, 0), (0, -1)
    logits, labels = model(im_q, im_k)
    expected = torch.tensor([[0.6, 0.6, 0.8, -0.6, -0.8], [-1.0, 0.0, 1.0, 0.0, -1.0]]) / 0.5
    torch.testing.assert_close(logits, expected)
    assert labels.tolist() == [0, 0]
    torch.testing.assert_close(model.queue, torch.tensor([[1.0, 0.0, -1.0, 0.0], [0.0, -1.0, 0.0, -1.0]]))
    assert model.queue_ptr.tolist() == [2]


def test_queue_size_must_divide_batch():
    model = MoCo(_Linear(), dim=2, K=5)
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(2, 2), torch.randn(2, 2))


def test_split_batchnorm_normalises_each_group():
    torch.manual_seed(0)
    bn = SplitBatchNorm(3, num_splits=2, momentum=0.1)
    x = torch.randn(8, 3, 4, 4) * 3 + 1
    out = bn(x)
    for g in range(2):  # sample n is in group n % 2
        part = x[g::2]
        mean, var = part.mean((0, 2, 3), keepdim=True), part.var((0, 2, 3), unbiased=False, keepdim=True)
        torch.testing.assert_close(out[g::2], (part - mean) / torch.sqrt(var + bn.eps), rtol=1e-4, atol=1e-4)
    # running stats: each group updates (momentum 0.1) from 0 / 1 with its mean / unbiased variance,
    # then the groups are averaged
    groups = [x[g::2].transpose(0, 1).reshape(3, -1) for g in range(2)]
    expected_mean = sum(0.9 * 0.0 + 0.1 * part.mean(1) for part in groups) / 2
    expected_var = sum(0.9 * 1.0 + 0.1 * part.var(1, unbiased=True) for part in groups) / 2
    torch.testing.assert_close(bn.running_mean, expected_mean)
    torch.testing.assert_close(bn.running_var, expected_var)
    bn.eval()
    torch.testing.assert_close(bn(x), F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias))


def test_bn_splits_convert_both_encoders_and_keep_state_dict():
    plain, split = MoCo("resnet18", dim=8, K=16, stem="cifar"), MoCo("resnet18", dim=8, K=16, stem="cifar", bn_splits=4)
    assert isinstance(split.encoder_k.bn1, SplitBatchNorm) and split.encoder_q.layer1[0].bn2.num_splits == 4
    assert set(plain.state_dict()) == set(split.state_dict())
    logits, _ = split(torch.randn(8, 3, 8, 8), torch.randn(8, 3, 8, 8))
    assert logits.shape == (8, 17)


def test_logits_are_fp32_under_bf16_autocast_and_equal_the_fp32_computation():
    """The encoders run in bf16 under autocast; the InfoNCE logits must not (a bf16 l_neg rounds the
    negatives to 3 significant digits while l_pos stays fp32)."""
    torch.manual_seed(0)
    model = MoCo(_Linear64(), dim=64, K=256, m=0.5, T=0.07)
    x_q, x_k = torch.randn(8, 64), torch.randn(8, 64)
    queue = model.queue.clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = model.encoder_q(x_q).float()
        logits, labels = model(x_q, x_k)
    assert logits.dtype == torch.float32
    q = F.normalize(q, dim=1)
    k = F.normalize(model.queue[:, :8].t(), dim=1)  # the keys just enqueued
    expected = torch.cat([(q * k).sum(1, keepdim=True), q @ queue], dim=1) / 0.07
    torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-5)


class _Linear64(nn.Module):
    """A 64-wide one-layer encoder: bf16 rounding shows in its outputs (test_moco_v3 uses it too)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)

    def forward(self, x):
        return self.fc(x)
