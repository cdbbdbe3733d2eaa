"""MoCo v1/v2 with the symmetric loss of the official CIFAR-10 demo, by hand and against its transcription."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mocohub import MoCo
from reference_moco import ReferenceMoCo
from test_moco import _Linear
from step_equality import step_both_and_compare


class ReferenceSymmetricMoCo(ReferenceMoCo):
    """The demo's ``contrastive_loss`` and ``forward(im1, im2)`` with ``symmetric=True`` (one GPU)."""

    def contrastive_loss(self, im_q, im_k):
        q = nn.functional.normalize(self.encoder_q(im_q), dim=1)
        with torch.no_grad():
            idx_shuffle = torch.randperm(im_k.shape[0])
            k = nn.functional.normalize(self.encoder_k(im_k[idx_shuffle]), dim=1)[torch.argsort(idx_shuffle)]
        l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", [q, self.queue.clone().detach()])
        logits = torch.cat([l_pos, l_neg], dim=1) / self.T
        return nn.CrossEntropyLoss()(logits, torch.zeros(logits.shape[0], dtype=torch.long)), q, k

    def forward(self, im1, im2):
        with torch.no_grad():
            for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
                param_k.data = param_k.data * self.m + param_q.data * (1.0 - self.m)
        loss_12, q1, k2 = self.contrastive_loss(im1, im2)
        loss_21, q2, k1 = self.contrastive_loss(im2, im1)
        k = torch.cat([k1, k2], dim=0)
        with torch.no_grad():
            ptr = int(self.queue_ptr)
            self.queue[:, ptr:ptr + k.shape[0]] = k.T
            self.queue_ptr[0] = (ptr + k.shape[0]) % self.K
        return loss_12 + loss_21


def test_matches_the_official_demo():
    torch.manual_seed(0)
    ref = ReferenceSymmetricMoCo("resnet18", dim=8, K=8, m=0.9, T=0.1, mlp=True, cifar_stem=True).double()
    ours = MoCo("resnet18", dim=8, K=8, m=0.9, T=0.1, mlp=True, stem="cifar", symmetric=True)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ours.double()
    opt_ref = torch.optim.SGD(ref.encoder_q.parameters(), lr=0.06, momentum=0.9, weight_decay=5e-4)
    opt_ours = torch.optim.SGD(ours.encoder_q.parameters(), lr=0.06, momentum=0.9, weight_decay=5e-4)
    for step in range(3):  # 3 steps of 4 keys wrap the 8-slot queue
        im1, im2 = torch.randn(2, 3, 16, 16, dtype=torch.float64), torch.randn(2, 3, 16, 16, dtype=torch.float64)
        torch.manual_seed(100 + step)
        loss_r = ref(im1, im2)
        torch.manual_seed(100 + step)  # the same two Shuffle BN permutations, drawn in the same order
        loss_o, logits, labels = ours(im1, im2, return_loss=True)
        torch.testing.assert_close(loss_o, loss_r, rtol=1e-10, atol=1e-10)
        assert logits.shape == (4, 9) and not labels.any()
        step_both_and_compare(ref, ours, opt_ref, opt_ours, loss_r, loss_o)
    assert int(ours.queue_ptr) == 4


def test_symmetric_by_hand():
    model = MoCo(_Linear(), dim=2, K=4, m=0.0, T=0.5, symmetric=True)
    with torch.no_grad():
        model.encoder_q.fc.weight.copy_(torch.eye(2))
        model.encoder_q.fc.bias.zero_()
        model.queue.copy_(torch.tensor([[1.0, 0.0, -1.0, 0.0], [0.0, 1.0, 0.0, -1.0]]))
    im1 = torch.tensor([[3.0, 4.0], [0.0, 2.0]])   # normalised: (.6, .8), (0, 1)
    im2 = torch.tensor([[1.0, 0.0], [0.0, -5.0]])  # normalised: (1, 0), (0, -1)
    loss, logits, labels = model(im1, im2, return_loss=True)
    logits_12 = torch.tensor([[0.6, 0.6, 0.8, -0.6, -0.8], [-1.0, 0.0, 1.0, 0.0, -1.0]]) / 0.5
    logits_21 = torch.tensor([[0.6, 1.0, 0.0, -1.0, 0.0], [-1.0, 0.0, -1.0, 0.0, 1.0]]) / 0.5
    torch.testing.assert_close(logits, torch.cat([logits_12, logits_21]))
    zeros = torch.zeros(2, dtype=torch.long)
    torch.testing.assert_close(loss, F.cross_entropy(logits_12, zeros) + F.cross_entropy(logits_21, zeros))
    assert labels.tolist() == [0, 0, 0, 0]
    # both views' keys entered: k1 (of im1) then k2 (of im2)
    torch.testing.assert_close(model.queue, torch.tensor([[0.6, 0.0, 1.0, 0.0], [0.8, 1.0, 0.0, -1.0]]))
    assert model.queue_ptr.tolist() == [0]


def test_symmetric_needs_return_loss_and_a_queue_of_twice_the_batch():
    with pytest.raises(ValueError, match="return_loss=True"):
        MoCo(_Linear(), dim=2, K=8, symmetric=True)(torch.randn(2, 2), torch.randn(2, 2))
    MoCo(_Linear(), dim=2, K=6)(torch.randn(2, 2), torch.randn(2, 2))  # 2 keys a step divide 6
    with pytest.raises(ValueError, match="twice it with the symmetric loss"):
        MoCo(_Linear(), dim=2, K=6, symmetric=True)(torch.randn(2, 2), torch.randn(2, 2), return_loss=True)
    loss, logits, labels = MoCo(_Linear(), dim=2, K=4)(torch.randn(2, 2), torch.randn(2, 2), return_loss=True)
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels))  # asymmetric: the usual loss
