"""The preference gap the policy maintains: the one definition the trainer, the monitor and
the gates share.

For a validation pair the policy's implicit rewards are r = beta * (log pi(y|x) - log ref(y|x))
(losses.py returns them), and the Bradley-Terry probability that the chosen response wins is
sigmoid(r_chosen - r_rejected). The pair's gap rescales that probability from [0.5, 1] to
[0, 1]:

    gap_i = 2 * sigmoid(m_i) - 1 = tanh(m_i / 2),   m_i = r_chosen - r_rejected

and the reported gap is the mean over pairs, floored at 0:  max(0, mean_i gap_i)  in [0, 1].

This is exactly the data gap of issue #3 (mlx_dpo/data/gap.py, "model scores") applied to the
policy's own implicit rewards, so `validate_dpo_pairs(val, scores=...)` on the policy's margins
gives the same number. At the start of training (policy == reference) every margin is 0 and
the gap is 0; it grows as the policy separates chosen from rejected. Like every implicit
reward, it scales with beta.
"""
from __future__ import annotations

import math


def pair_gaps(chosen_rewards, rejected_rewards, xp):
    """Per-pair gap tanh((r_c - r_r) / 2), shape (B,), for MLX or torch arrays (`xp`)."""
    return xp.tanh((chosen_rewards - rejected_rewards) / 2)


def mean_gap(gap_sum: float, pairs: float) -> float:
    """The reported gap from a sum of per-pair gaps: mean floored at 0; NaN with no pairs."""
    if pairs <= 0:
        return math.nan
    return max(0.0, gap_sum / pairs)


def gap_of_margin(margin: float) -> float:
    """One pair's gap from its reward margin (plain floats)."""
    return math.tanh(margin / 2.0)
