"""Reference modules: shapes, CBAM semantics against hand-written maths, A-Softmax margin."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from naslung import ConvRes
from naslung.models import AngleLinear, AngleLoss, ResidualCBAM, WooCBAM, make_loss


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("batch, crop", [(1, 32), (3, 24), (2, 40)])
@pytest.mark.parametrize("head", ["asoftmax", "linear"])
def test_convres_returns_class_logits(mode, batch, crop, head):
    torch.manual_seed(0)
    model = ConvRes("4,8/8/16", head=head).train(mode == "train")
    logits = model(torch.randn(batch, 1, crop, crop, crop))
    assert logits.shape == (batch, 2) and torch.isfinite(logits).all()
    probs = torch.softmax(logits, 1)
    assert torch.allclose(probs.sum(1), torch.ones(batch))


def _hand_mlp(cbam, v, relu):
    hidden = v @ cbam.fc1.weight.T
    return (F.relu(hidden) if relu else hidden) @ cbam.fc2.weight.T


def _hand_spatial(cbam, x):
    pooled = torch.cat([x.max(1, keepdim=True).values, x.mean(1, keepdim=True)], 1)
    return torch.sigmoid(F.conv3d(pooled, cbam.spatial_conv.weight, padding=1))


def test_nas_lung_cbam_matches_hand_computation():
    torch.manual_seed(1)
    cbam = ResidualCBAM(8)
    x = torch.randn(2, 8, 5, 6, 7)
    avg = x.flatten(2).mean(2)
    mx = x.flatten(2).max(2).values
    weights = torch.softmax(_hand_mlp(cbam, avg, False) + _hand_mlp(cbam, mx, False), dim=1)
    s = _hand_spatial(cbam, x * weights[:, :, None, None, None])
    expected = s * x + x  # the block input is scaled, not the channel-weighted map
    assert torch.allclose(cbam(x), expected, atol=1e-6)
    assert torch.allclose(cbam.attention(x), s, atol=1e-6)


def test_woo_cbam_matches_hand_computation():
    torch.manual_seed(2)
    cbam = WooCBAM(8)
    x = torch.randn(2, 8, 4, 4, 4)
    avg, mx = x.flatten(2).mean(2), x.flatten(2).max(2).values
    gate = torch.sigmoid(_hand_mlp(cbam, avg, True) + _hand_mlp(cbam, mx, True))
    xc = x * gate[:, :, None, None, None]
    assert torch.allclose(cbam(x), _hand_spatial(cbam, xc) * xc, atol=1e-6)


def test_cbam_variants_share_state_dict_layout():
    a = ConvRes("4,8/8/16", cbam="nas-lung")
    b = ConvRes("4,8/8/16", cbam="woo")
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 1, 16, 16, 16)
    assert not torch.allclose(a.eval()(x), b.eval()(x))


def test_angle_linear_logits_are_cos_times_norm():
    torch.manual_seed(3)
    head = AngleLinear(6, 2)
    x = torch.randn(5, 6)
    w = head.weight / head.weight.norm(dim=0, keepdim=True)
    cos = (x @ w) / x.norm(dim=1, keepdim=True)
    assert torch.allclose(head(x), cos * x.norm(dim=1, keepdim=True), atol=1e-6)


def test_phi_is_cos_m_theta_then_monotone():
    head = AngleLinear(2, 2)
    theta = torch.linspace(0.01, math.pi - 0.01, 500)
    phi = head._phi(torch.cos(theta))
    small = theta < math.pi / 4
    assert torch.allclose(phi[small], torch.cos(4 * theta[small]), atol=1e-5)
    assert (phi[1:] <= phi[:-1] + 1e-6).all(), "phi must decrease with the angle"


def test_margin_is_applied_to_target_class_only():
    torch.manual_seed(4)
    model = ConvRes("4/4/8")
    loss_fn = make_loss(model.head)
    assert isinstance(loss_fn, AngleLoss)
    logits = model(torch.randn(6, 1, 16, 16, 16))
    target = torch.tensor([0, 1, 1, 0, 1, 0])
    adjusted = loss_fn.margin_logits(logits, target)
    phi = model.head.phi_logits
    rows = torch.arange(6)
    other = 1 - target
    lam = loss_fn.lam
    assert torch.equal(adjusted[rows, other], logits[rows, other])
    expected = logits[rows, target] - (logits[rows, target] - phi[rows, target]) / (1 + lam)
    assert torch.allclose(adjusted[rows, target], expected)
    assert (adjusted[rows, target] <= logits[rows, target] + 1e-6).all()


def test_margin_makes_loss_larger_and_anneals():
    torch.manual_seed(5)
    head = AngleLinear(8, 2)
    loss_fn = AngleLoss(head)
    x = torch.randn(16, 8)
    target = torch.randint(0, 2, (16,))
    plain = F.cross_entropy(head(x), target)
    assert loss_fn.lam == 1500.0
    first = loss_fn(head(x), target)
    assert loss_fn.step == 1 and first >= plain
    loss_fn.step = 10_000  # lambda has annealed to its floor of 5
    assert loss_fn.lam == 5.0
    late = loss_fn(head(x), target)
    assert late > first + 1e-3, "with lambda at 5 the margin must weigh clearly"
    loss_fn.eval()
    loss_fn(head(x), target)
    assert loss_fn.step == 10_001, "the step counter advances only in training"


def test_angle_loss_needs_a_fresh_training_forward():
    head = AngleLinear(4, 2)
    loss_fn = AngleLoss(head)
    with pytest.raises(RuntimeError, match="latest forward"):
        loss_fn(torch.zeros(2, 2), torch.tensor([0, 1]))
    logits = head(torch.randn(2, 4))
    loss_fn(logits, torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="latest forward"):
        loss_fn(logits, torch.tensor([0, 1]))  # the margin term is used once
    head.eval()
    assert head(torch.randn(2, 4)).shape == (2, 2) and head.phi_logits is None


def test_model_copies_after_a_training_forward():
    import copy

    model = ConvRes("4/4/8")
    model(torch.randn(2, 1, 16, 16, 16))
    make_loss(model.head)(model(torch.randn(2, 1, 16, 16, 16)), torch.tensor([0, 1]))
    copy.deepcopy(model)


def test_linear_head_uses_cross_entropy():
    model = ConvRes("4/4/8", head="linear")
    assert isinstance(make_loss(model.head), torch.nn.CrossEntropyLoss)


def test_unknown_variants_are_rejected():
    with pytest.raises(ValueError, match="CBAM variant"):
        ConvRes("4/4/8", cbam="se")
    with pytest.raises(ValueError, match="unknown head"):
        ConvRes("4/4/8", head="arcface")
