"""DPO-family losses as pure functions of per-sequence log-probs.

Every loss takes the four log-prob vectors, shape (B,), plus beta and label_smoothing, and
returns (losses, chosen_rewards, rejected_rewards), each shape (B,) and unreduced. They use
only arithmetic, `abs`, `logaddexp` and `zeros_like`, which MLX and PyTorch share, so both
engines call the same code with their own arrays (`xp` is the array module).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


def _log_sigmoid(x, xp):
    # log(sigmoid(x)) = -log(1 + e^-x), computed stably.
    return -xp.logaddexp(xp.zeros_like(x), -x)


def _relu(x):
    return (x + abs(x)) * 0.5


def _margins(pc, pr, rc, rr):
    """h = (log pi(yw) - log pi(yl)) - (log ref(yw) - log ref(yl))."""
    return (pc - pr) - (rc - rr)


def sigmoid_loss(pc, pr, rc, rr, beta, label_smoothing=0.0, xp=None):
    """DPO (Rafailov et al. 2023); with label_smoothing e, conservative DPO:
    -(1-e) log sig(beta h) - e log sig(-beta h)."""
    xp = xp or _mx()
    z = beta * _margins(pc, pr, rc, rr)
    losses = -(1 - label_smoothing) * _log_sigmoid(z, xp) - label_smoothing * _log_sigmoid(-z, xp)
    return losses, beta * (pc - rc), beta * (pr - rr)


def robust_loss(pc, pr, rc, rr, beta, label_smoothing=0.0, xp=None):
    """Robust DPO (Chowdhury et al. 2024), unbiased under label-flip rate e:
    (-(1-e) log sig(beta h) + e log sig(-beta h)) / (1 - 2e)."""
    xp = xp or _mx()
    z = beta * _margins(pc, pr, rc, rr)
    losses = (-(1 - label_smoothing) * _log_sigmoid(z, xp)
              + label_smoothing * _log_sigmoid(-z, xp)) / (1 - 2 * label_smoothing)
    return losses, beta * (pc - rc), beta * (pr - rr)


def ipo_loss(pc, pr, rc, rr, beta, label_smoothing=0.0, xp=None):
    """IPO (Azar et al. 2023): (h - 1/(2 beta))^2, on length-averaged log-probs
    (see `LOSSES[...].length_normalized`), as TRL computes it."""
    h = _margins(pc, pr, rc, rr)
    losses = (h - 1 / (2 * beta)) ** 2
    return losses, beta * (pc - rc), beta * (pr - rr)


def hinge_loss(pc, pr, rc, rr, beta, label_smoothing=0.0, xp=None):
    """SLiC hinge (Zhao et al. 2023): max(0, 1 - beta h)."""
    z = beta * _margins(pc, pr, rc, rr)
    return _relu(1 - z), beta * (pc - rc), beta * (pr - rr)


@dataclass(frozen=True)
class LossSpec:
    fn: Callable
    length_normalized: bool = False  # feed mean per-token log-probs instead of sums


LOSSES = {
    "sigmoid": LossSpec(sigmoid_loss),
    "robust": LossSpec(robust_loss),
    "ipo": LossSpec(ipo_loss, length_normalized=True),
    "hinge": LossSpec(hinge_loss),
}


def _mx():
    import mlx.core as mx

    return mx
