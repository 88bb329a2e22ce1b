"""Per-sequence completion log-probs and exact token-level KL, from logits (MLX arrays).

Shapes: logits (N, T, V), targets (N, T) int, mask (N, T) float with 1 on completion tokens.
"""
from __future__ import annotations

import mlx.core as mx

from . import cpu_kernels


def token_logps(logits: mx.array, targets: mx.array) -> mx.array:
    """log p(target) at every position, (N, T): the target logit minus the log-partition."""
    return cpu_kernels.target_logps(logits.astype(mx.float32), targets)


def sequence_logps(logits: mx.array, targets: mx.array, mask: mx.array) -> mx.array:
    """Summed log-prob of each sequence's completion tokens, (N,)."""
    return (token_logps(logits, targets) * mask).sum(axis=-1)


def token_kl(policy_logits: mx.array, ref_logits: mx.array, mask: mx.array) -> mx.array:
    """KL(policy || reference) summed over completion tokens of each sequence, (N,)."""
    return (position_kl(policy_logits, ref_logits) * mask).sum(axis=-1)


def position_kl(policy_logits: mx.array, ref_logits: mx.array) -> mx.array:
    """KL(policy || reference) at every position, (N, T), exact over the whole vocabulary:
    sum_v p(v) (log p(v) - log q(v))."""
    logp = policy_logits.astype(mx.float32)
    logp = logp - mx.logsumexp(logp, axis=-1, keepdims=True)
    logq = ref_logits.astype(mx.float32)
    logq = logq - mx.logsumexp(logq, axis=-1, keepdims=True)
    return (mx.exp(logp) * (logp - logq)).sum(axis=-1)
