"""MoCo v3 against an independent transcription of the official code, in float64."""
import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from mocohub import MoCoV3, MocohubError, from_pretrained
from mocohub.backbones import create_vit
from mocohub.training.optim import LARS, scaled_lr, v3_lr, v3_momentum, v3_optimizer
from mocohub.zoo.formats import convert
from mocohub.zoo.pretrained import build_config, write_pretrained
from reference_moco_v3 import (ReferenceLARS, ReferenceMoCoV3ResNet, ReferenceMoCoV3ViT, adjust_learning_rate,
                               adjust_moco_momentum, official_resnet, official_vit)
from step_equality import assert_close
from test_moco import _Linear64

TINY_VIT = dict(img_size=16, patch_size=8, embed_dim=48, depth=2)  # 12 heads of 4 dims, a 2x2 grid


def _pair(kind: str, T: float):
    torch.manual_seed(0)
    if kind == "resnet":
        ref = ReferenceMoCoV3ResNet(official_resnet("resnet18", cifar_stem=True), dim=8, mlp_dim=16, T=T)
        ours = MoCoV3("resnet18", dim=8, mlp_dim=16, T=T, stem="cifar")
    else:
        ref = ReferenceMoCoV3ViT(official_vit(num_heads=12, stop_grad_conv1=True, **TINY_VIT), dim=8, mlp_dim=16, T=T)
        ours = MoCoV3("vit_small", dim=8, mlp_dim=16, T=T, stop_grad_conv1=True, **TINY_VIT)
    with torch.no_grad():  # every weight and BN scale different from its init, so every path carries signal
        for p in ref.base_encoder.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref.double(), ours.double()


@pytest.mark.parametrize("kind", ["resnet", "vit"])
def test_matches_official_loss_gradients_and_momentum_update(kind):
    ref, ours = _pair(kind, T=1.0 if kind == "resnet" else 0.2)
    # LARS for both: Adam would turn the rounding noise of the key bias's zero gradient into whole steps
    opt_ref = ReferenceLARS(ref.parameters(), lr=0.5, weight_decay=1e-4)
    opt_ours = v3_optimizer(ours.parameters(), "lars", lr=0.5, weight_decay=1e-4)
    size = 8 if kind == "resnet" else 16
    for step in range(2):
        x1, x2 = (torch.randn(4, 3, size, size, dtype=torch.float64) for _ in range(2))
        m = v3_momentum(step / 2, 4, 0.9)  # changes every step: the update must use the m it is given
        loss_ref, loss_ours = ref(x1, x2, m), ours(x1, x2, m)
        torch.testing.assert_close(loss_ours, loss_ref, rtol=1e-10, atol=1e-10)
        for opt, loss in ((opt_ref, loss_ref), (opt_ours, loss_ours)):
            opt.zero_grad()
            loss.backward()
        grads = 0
        for (name, p_r), p_o in zip(ref.named_parameters(), ours.parameters()):
            assert (p_o.grad is None) == (p_r.grad is None), name
            if p_r.grad is not None:
                assert_close(p_o.grad, p_r.grad, rtol=1e-8, atol=1e-10, msg=name)
                grads += 1
        assert grads == sum(p.requires_grad for p in ref.parameters())
        opt_ref.step()
        opt_ours.step()
        theirs, mine = ref.state_dict(), ours.state_dict()
        assert mine.keys() == theirs.keys()
        for key, value in theirs.items():  # both encoders (momentum update), predictor, BN stats
            assert_close(mine[key], value, rtol=1e-9, atol=1e-10, msg=key)


def test_heads_as_the_official():
    resnet = MoCoV3("resnet50", dim=256, mlp_dim=512)
    vit = MoCoV3("vit_small", dim=256, mlp_dim=512, **TINY_VIT)
    proj, pred = resnet.base_encoder.fc, resnet.predictor
    assert [type(l) for l in proj] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d]
    assert proj[0].weight.shape == (512, 2048) and proj[0].bias is None and not proj[4].affine
    assert [type(l) for l in pred] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]  # no last BN on ResNet
    assert len(vit.base_encoder.head) == 8 and vit.base_encoder.head[0].weight.shape == (512, 48)
    assert isinstance(vit.predictor[-1], nn.BatchNorm1d) and not vit.predictor[-1].affine
    assert all(not p.requires_grad for p in resnet.momentum_encoder.parameters())
    assert not resnet.base_encoder.layer1[0].bn3.weight.any()  # zero_init_residual
    assert MoCoV3.sync_bn


@pytest.mark.parametrize("kind", ["resnet", "vit"])
def test_official_state_dict_loads_strictly_and_the_zoo_reads_it(kind):
    if kind == "resnet":
        ref = ReferenceMoCoV3ResNet(official_resnet("resnet50", cifar_stem=False), dim=32, mlp_dim=64)
        ours = MoCoV3("resnet50", dim=32, mlp_dim=64)
    else:  # ViT-S's layout (the zoo names the timm model by embed dim and patch), one block
        vit = dict(img_size=32, embed_dim=384, depth=1)
        ref = ReferenceMoCoV3ViT(official_vit(num_heads=12, patch_size=16, **vit), dim=32, mlp_dim=64)
        ours = MoCoV3("vit_small", dim=32, mlp_dim=64, **vit)
    official = {"module." + k: v for k, v in ref.state_dict().items()}  # as main_moco.py saves it
    ours.load_state_dict({k.removeprefix("module."): v for k, v in official.items()}, strict=True)
    backbone = convert({"epoch": 100, "arch": "resnet50", "state_dict": official})
    assert backbone.format == "moco-v3" and backbone.state_dict.keys() == ours.backbone_state_dict().keys()
    assert not any(k.startswith(("fc.", "head.")) for k in backbone.state_dict)


def test_vit_initialisation_as_the_official():
    torch.manual_seed(0)
    vit = create_vit("vit_small", stop_grad_conv1=True, img_size=32, patch_size=16)
    ref = official_vit(num_heads=12, img_size=32, patch_size=16, embed_dim=384, depth=12)(num_classes=0)
    assert torch.equal(vit.pos_embed, ref.pos_embed) and not vit.pos_embed.requires_grad
    assert float(vit.pos_embed[0, 0].abs().sum()) == 0  # the class token's slot
    assert not vit.patch_embed.proj.weight.requires_grad and not vit.patch_embed.proj.bias.requires_grad
    qkv = vit.blocks[0].attn.qkv.weight  # Q, K, V as three (384 x 384) matrices
    bound = math.sqrt(6 / (384 + 384))
    assert bound * 0.99 < float(qkv.detach().abs().max()) <= bound
    fc1 = vit.blocks[0].mlp.fc1.weight  # xavier over (1536 x 384)
    assert math.sqrt(6 / (1536 + 384)) * 0.99 < float(fc1.detach().abs().max()) <= math.sqrt(6 / (1536 + 384))
    patch = vit.patch_embed.proj.weight
    assert math.sqrt(6 / (3 * 256 + 384)) * 0.99 < float(patch.abs().max()) <= math.sqrt(6 / (3 * 256 + 384))
    assert not vit.blocks[0].attn.qkv.bias.any() and not vit.patch_embed.proj.bias.any()
    assert 0 < float(vit.cls_token.detach().std()) < 1e-5
    assert vit.blocks[0].attn.num_heads == 12 and vit.norm.eps == 1e-6


def test_vit_bad_inputs():
    with pytest.raises(MocohubError, match="multiple of the patch size"):
        MoCoV3("vit_small", img_size=40)
    with pytest.raises(MocohubError, match="unknown ViT"):
        MoCoV3("vit_tiniest")
    with pytest.raises(MocohubError, match="stem"):
        MoCoV3("vit_small", stem="cifar", **TINY_VIT)
    with pytest.raises(MocohubError, match="`fc`.*`head`"):
        MoCoV3(nn.Conv2d(3, 3, 1))


@pytest.mark.parametrize("kind", ["resnet", "resnet10t_half", "vit"])
def test_exported_backbone_loads_in_from_pretrained_and_timm(tmp_path, kind):
    torch.manual_seed(0)
    model = MoCoV3("resnet18", dim=8, mlp_dim=16, stem="cifar") if kind == "resnet" else \
        MoCoV3("resnet10t_half", dim=8, mlp_dim=16) if kind == "resnet10t_half" else \
        MoCoV3("vit_small", dim=8, mlp_dim=16, stop_grad_conv1=True, **TINY_VIT)
    x1, x2 = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    model(x1, x2, 0.5).backward()  # a step, so BN statistics and weights are not their init
    spec = model.backbone_config()
    config = build_config(spec["architecture"], num_features=spec["num_features"], stem=spec["stem"])
    config["model_args"] = spec["model_args"]
    write_pretrained(tmp_path, model.backbone_state_dict(), config)
    encoder = model.base_encoder.eval()
    with torch.no_grad():
        expected = encoder.forward_head(encoder.forward_features(x1), pre_logits=True)
        torch.testing.assert_close(from_pretrained(tmp_path)(x1), expected)
        if kind != "resnet":  # plain timm, from the names in config.json (the CIFAR stem is not timm's)
            plain = timm.create_model(spec["architecture"], num_classes=0, **spec["model_args"]).eval()
            plain.load_state_dict(model.backbone_state_dict(), strict=True)
            torch.testing.assert_close(plain(x1), expected)


def test_v3_optimizer_takes_only_trainable_parameters():
    model = MoCoV3("vit_small", dim=8, mlp_dim=16, stop_grad_conv1=True, **TINY_VIT)
    adamw = v3_optimizer(model.parameters(), "adamw", lr=1e-3, weight_decay=0.1)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["weight_decay"] == 0.1
    trainable = {id(p) for p in adamw.param_groups[0]["params"]}
    assert trainable == {id(p) for p in model.parameters() if p.requires_grad}
    frozen = (model.base_encoder.pos_embed, model.base_encoder.patch_embed.proj.weight,
              model.momentum_encoder.cls_token)
    assert not trainable & {id(p) for p in frozen}
    assert isinstance(v3_optimizer(model.parameters(), "lars", lr=0.1, weight_decay=1e-6), LARS)
    with pytest.raises(ValueError, match="lars, adamw"):
        v3_optimizer(model.parameters(), "sgd", lr=0.1, weight_decay=0)


def test_lars_by_hand():
    w = nn.Parameter(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))  # ||w|| = 5
    b = nn.Parameter(torch.tensor([1.0, -1.0]))
    opt = LARS([w, b], lr=0.1, weight_decay=0.5, momentum=0.9, trust_coefficient=0.001)
    # step 1, w: u = g + 0.5 w = [[0, 3], [4, 0]], ||u|| = 5, trust = 0.001 * 5 / 5 -> u = [[0, .003], [.004, 0]];
    # mu = u; w -= 0.1 mu. b (1-D): no decay, no trust ratio: mu = g = [2, 4]; b -= 0.1 mu
    w.grad = torch.tensor([[-1.5, 3.0], [4.0, -2.0]])
    b.grad = torch.tensor([2.0, 4.0])
    opt.step()
    torch.testing.assert_close(w.detach(), torch.tensor([[3.0, -3e-4], [-4e-4, 4.0]]))
    torch.testing.assert_close(b.detach(), torch.tensor([0.8, -1.4]))
    # step 2, w: g = -0.5 w, so u = 0 and the trust ratio is 1: mu = 0.9 mu = [[0, .0027], [.0036, 0]]
    # b: mu = 0.9 [2, 4] + [-1, 0] = [0.8, 3.6]
    w.grad = -0.5 * w.detach()
    b.grad = torch.tensor([-1.0, 0.0])
    opt.step()
    torch.testing.assert_close(w.detach(), torch.tensor([[3.0, -5.7e-4], [-7.6e-4, 4.0]]))
    torch.testing.assert_close(b.detach(), torch.tensor([0.72, -1.76]))
    assert set(opt.state[w]) == {"mu"}


def test_lars_zero_norms_and_random_steps_match_the_official():
    torch.manual_seed(0)
    shapes = [(4, 3), (3,), (2, 3, 3, 3), (5, 2)]
    ours = [nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in shapes]
    with torch.no_grad():
        ours[3].zero_()  # ||p|| = 0: no trust ratio
    ref = [nn.Parameter(p.detach().clone()) for p in ours]
    opt_o, opt_r = LARS(ours, lr=0.3, weight_decay=1e-3), ReferenceLARS(ref, lr=0.3, weight_decay=1e-3)
    for step in range(3):
        for o, r in zip(ours, ref):
            o.grad = torch.randn_like(o) * (step != 1)  # step 1: zero gradients, so ||u|| = ||wd p||
            r.grad = o.grad.clone()
        ours[1].grad = None if step == 2 else ours[1].grad  # a parameter without a gradient is skipped
        ref[1].grad = None if step == 2 else ref[1].grad
        opt_o.step()
        opt_r.step()
        for o, r in zip(ours, ref):
            torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-14)


def test_schedules_by_hand():
    base = scaled_lr(0.6, 4096)  # the R50 recipe: 0.6 x 4096 / 256
    assert base == pytest.approx(9.6)
    assert v3_lr(0.0, 100, 10, base) == 0.0
    assert v3_lr(2.5, 100, 10, base) == pytest.approx(2.4)  # a quarter of the warmup
    assert v3_lr(10.0, 100, 10, base) == pytest.approx(9.6)  # warmup done: the cosine starts at the top
    assert v3_lr(55.0, 100, 10, base) == pytest.approx(4.8)  # halfway through the cosine
    assert v3_lr(77.5, 100, 10, base) == pytest.approx(9.6 * 0.5 * (1 - math.sqrt(0.5)))  # three quarters
    assert v3_lr(100.0, 100, 10, base) == pytest.approx(0.0, abs=1e-12)
    assert v3_momentum(0.0, 100, 0.99) == pytest.approx(0.99)
    assert v3_momentum(50.0, 100, 0.99) == pytest.approx(0.995)
    assert v3_momentum(25.0, 100, 0.99) == pytest.approx(1 - 0.005 * (1 + math.sqrt(0.5)))
    assert v3_momentum(100.0, 100, 0.99) == pytest.approx(1.0)
    for epoch in (0.0, 3.3, 10.0, 42.7, 99.9):  # and the official functions agree everywhere
        assert v3_lr(epoch, 100, 10, 1.5e-4) == pytest.approx(adjust_learning_rate(epoch, 1.5e-4, 10, 100))
        assert v3_momentum(epoch, 100, 0.996) == pytest.approx(adjust_moco_momentum(epoch, 0.996, 100))


def test_logits_are_fp32_under_bf16_autocast_and_equal_the_fp32_computation():
    """The encoders run in bf16 under autocast; the contrastive logits must not."""
    torch.manual_seed(0)
    model = MoCoV3(_Linear64(), dim=32, mlp_dim=64, T=0.2)
    q, k = torch.randn(8, 32), torch.randn(8, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q16, k16 = (t.to(torch.bfloat16) for t in (q, k))  # what the bf16 predictor and encoder hand over
        loss, logits, labels = model.contrastive_loss(q16, k16)
    assert logits.dtype == torch.float32 and loss.dtype == torch.float32
    expected = F.normalize(q16.float(), dim=1) @ F.normalize(k16.float(), dim=1).t() / 0.2
    torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss, F.cross_entropy(expected, torch.arange(8)) * 0.4)
