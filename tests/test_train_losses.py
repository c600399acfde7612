"""DPO-family, Bradley-Terry and Plackett-Luce losses against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from synthfb.train.dpo import dpo_loss
from synthfb.train.rm import bt_loss, plackett_luce_loss


def _t(*x):
    return torch.tensor(x, dtype=torch.float64)


def _sig(x):
    return 1 / (1 + math.exp(-x))


# policy chosen -1, rejected -3; reference -2, -2: h = (−1+2) − (−3+2) = 2
PC, PR, RC, RR = _t(-1.0), _t(-3.0), _t(-2.0), _t(-2.0)


def test_sigmoid_matches_hand_value():
    loss = dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="sigmoid")
    assert loss.item() == pytest.approx(0.598139, abs=1e-6)  # -log sigmoid(0.2)
    assert loss.item() == pytest.approx(-math.log(_sig(0.2)), abs=1e-12)


def test_cdpo_label_smoothing():
    eps = 0.1
    loss = dpo_loss(PC, PR, RC, RR, beta=0.1, label_smoothing=eps).item()
    want = -(1 - eps) * math.log(_sig(0.2)) - eps * math.log(_sig(-0.2))
    assert loss == pytest.approx(want, abs=1e-12)
    assert loss == pytest.approx(0.618139, abs=1e-6)
    # per-example soft labels as a tensor
    per = dpo_loss(_t(-1, -1), _t(-3, -3), _t(-2, -2), _t(-2, -2), beta=0.1, label_smoothing=_t(0.0, 0.1))
    assert per[0].item() == pytest.approx(0.598139, abs=1e-6)
    assert per[1].item() == pytest.approx(want, abs=1e-12)


def test_ipo_matches_hand_value():
    # (h - 1/(2 beta))^2 = (2 - 5)^2 = 9
    assert dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="ipo").item() == pytest.approx(9.0, abs=1e-12)
    assert dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type="ipo").item() == pytest.approx(1.0, abs=1e-12)


def test_hinge_matches_hand_value():
    assert dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="hinge").item() == pytest.approx(0.8, abs=1e-12)
    assert dpo_loss(PC, PR, RC, RR, beta=1.0, loss_type="hinge").item() == pytest.approx(0.0, abs=1e-12)


def test_simpo_matches_hand_value_and_ignores_reference():
    # chosen -4 over 4 tokens = -1/token, rejected -9 over 3 tokens = -3/token
    # beta 2, gamma 1: z = 2 * (-1 - -3) - 1 = 3
    kw = dict(beta=2.0, loss_type="simpo", gamma=1.0, chosen_lengths=_t(4), rejected_lengths=_t(3))
    loss = dpo_loss(_t(-4.0), _t(-9.0), None, None, **kw).item()
    assert loss == pytest.approx(-math.log(_sig(3.0)), abs=1e-12)
    assert dpo_loss(_t(-4.0), _t(-9.0), _t(100.0), _t(-100.0), **kw).item() == loss
    # already-averaged log-probs without lengths
    assert dpo_loss(_t(-1.0), _t(-3.0), None, None, beta=2.0, loss_type="simpo", gamma=1.0).item() == pytest.approx(loss)


def test_policy_equal_reference_gives_ln2():
    lp = torch.randn(16, dtype=torch.float64) * 10
    lr = torch.randn(16, dtype=torch.float64) * 10
    loss = dpo_loss(lp, lr, lp.clone(), lr.clone(), beta=0.1)
    assert torch.allclose(loss, torch.full_like(loss, math.log(2)), atol=1e-12)
    # cDPO is ln 2 there too; hinge is 1; ipo is 1/(4 beta^2)
    assert torch.allclose(dpo_loss(lp, lr, lp, lr, beta=0.1, label_smoothing=0.2), torch.full_like(loss, math.log(2)))
    assert torch.allclose(dpo_loss(lp, lr, lp, lr, beta=0.1, loss_type="hinge"), torch.ones_like(loss))
    assert torch.allclose(dpo_loss(lp, lr, lp, lr, beta=0.1, loss_type="ipo"), torch.full_like(loss, 25.0))


def test_dpo_gradient_sign():
    pc = _t(-2.0).requires_grad_()
    pr = _t(-2.0).requires_grad_()
    dpo_loss(pc, pr, _t(-2.0), _t(-2.0)).sum().backward()
    assert pc.grad.item() < 0 < pr.grad.item()  # descent raises chosen, lowers rejected
    assert pc.grad.item() == pytest.approx(-0.1 * 0.5)  # -beta * sigmoid(-0)


def test_unknown_loss_type_and_missing_reference():
    with pytest.raises(ValueError, match="unknown loss_type"):
        dpo_loss(PC, PR, RC, RR, loss_type="kto")
    with pytest.raises(ValueError, match="reference"):
        dpo_loss(PC, PR, None, None, loss_type="sigmoid")


def test_bradley_terry_margin_and_centering():
    rc, rr = _t(1.5), _t(0.5)
    assert bt_loss(rc, rr).item() == pytest.approx(-math.log(_sig(1.0)))
    assert bt_loss(rc, rr, _t(0.25)).item() == pytest.approx(-math.log(_sig(0.75)))
    assert bt_loss(rc, rr, None, 0.01).item() == pytest.approx(-math.log(_sig(1.0)) + 0.01 * 4.0)


def test_plackett_luce_matches_enumeration_and_reduces_to_bt():
    s = _t(2.0, 0.5, -1.0)[None]
    # P(order 0 > 1 > 2) = e^2/(e^2+e^.5+e^-1) * e^.5/(e^.5+e^-1)
    e = [math.exp(x) for x in (2.0, 0.5, -1.0)]
    want = -math.log(e[0] / sum(e) * e[1] / (e[1] + e[2]))
    assert plackett_luce_loss(s).item() == pytest.approx(want, abs=1e-12)
    # the probabilities of all 6 orders sum to 1
    import itertools

    total = sum(math.exp(-plackett_luce_loss(s[:, list(p)]).item()) for p in itertools.permutations(range(3)))
    assert total == pytest.approx(1.0, abs=1e-12)
    # K = 2 is Bradley-Terry; a masked third entry is ignored
    assert plackett_luce_loss(_t(1.5, 0.5)[None]).item() == pytest.approx(bt_loss(_t(1.5), _t(0.5)).item())
    masked = plackett_luce_loss(_t(1.5, 0.5, 9.0)[None], torch.tensor([[True, True, False]]))
    assert masked.item() == pytest.approx(bt_loss(_t(1.5), _t(0.5)).item())
