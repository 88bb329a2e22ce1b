"""Losses against hand-computed values (arithmetic in each docstring)."""
import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_dpo.losses import LOSSES, hinge_loss, ipo_loss, robust_loss, sigmoid_loss

# policy chosen/rejected, reference chosen/rejected
PC, PR, RC, RR = mx.array([-5.0, -3.0]), mx.array([-7.0, -2.0]), mx.array([-6.0, -3.0]), mx.array([-6.0, -3.0])


def test_sigmoid_equals_ln2_when_policy_is_reference():
    for eps in (0.0, 0.1, 0.3):
        losses, cr, rr = sigmoid_loss(RC, RR, RC, RR, beta=0.1, label_smoothing=eps)
        assert np.allclose(np.array(losses), math.log(2), atol=1e-7)
        assert np.array(cr).tolist() == [0.0, 0.0] and np.array(rr).tolist() == [0.0, 0.0]


def test_sigmoid_hand_computed():
    """h = (pc - pr) - (rc - rr): pair 0: (-5+7) - 0 = 2; pair 1: (-3+2) - 0 = -1.
    beta = 0.5: z = [1, -0.5]; loss = log(1 + e^-z) = [0.313262, 0.974077].
    rewards: chosen = 0.5 * (pc - rc) = [0.5, 0], rejected = 0.5 * (pr - rr) = [-0.5, 0.5]."""
    losses, cr, rr = sigmoid_loss(PC, PR, RC, RR, beta=0.5)
    assert np.allclose(np.array(losses), [0.313262, 0.974077], atol=1e-6)
    assert np.allclose(np.array(cr), [0.5, 0.0]) and np.allclose(np.array(rr), [-0.5, 0.5])


def test_label_smoothing_hand_computed():
    """eps = 0.1, z = 1: 0.9 * log(1 + e^-1) + 0.1 * log(1 + e^1) = 0.9*0.313262 + 0.1*1.313262 = 0.413262."""
    losses, _, _ = sigmoid_loss(PC[:1], PR[:1], RC[:1], RR[:1], beta=0.5, label_smoothing=0.1)
    assert abs(losses.item() - 0.413262) < 1e-6


def test_robust_hand_computed():
    """eps = 0.1, z = 1: (0.9 * 0.313262 - 0.1 * 1.313262) / 0.8 = (0.281936 - 0.131326) / 0.8 = 0.188262."""
    losses, _, _ = robust_loss(PC[:1], PR[:1], RC[:1], RR[:1], beta=0.5, label_smoothing=0.1)
    assert abs(losses.item() - 0.188262) < 1e-6


def test_ipo_hand_computed():
    """beta = 0.5: target 1/(2*0.5) = 1; h = [2, -1]: (2-1)^2 = 1, (-1-1)^2 = 4."""
    losses, _, _ = ipo_loss(PC, PR, RC, RR, beta=0.5)
    assert np.allclose(np.array(losses), [1.0, 4.0])
    assert LOSSES["ipo"].length_normalized and not LOSSES["sigmoid"].length_normalized


def test_hinge_hand_computed():
    """beta = 0.5: z = [1, -0.5]: max(0, 1 - z) = [0, 1.5]."""
    losses, _, _ = hinge_loss(PC, PR, RC, RR, beta=0.5)
    assert np.allclose(np.array(losses), [0.0, 1.5])


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_losses_are_unreduced_and_lower_for_a_better_margin(name):
    good = LOSSES[name].fn(mx.array([-1.0]), mx.array([-9.0]), RC[:1], RR[:1], 0.1, 0.1, xp=mx)[0]
    bad = LOSSES[name].fn(mx.array([-9.0]), mx.array([-1.0]), RC[:1], RR[:1], 0.1, 0.1, xp=mx)[0]
    assert good.shape == (1,) and good.item() < bad.item()
