"""The gradient exchange: every rank's gradients summed, in few large messages.

MLX's ring pays a fixed latency per collective (milliseconds on loopback), so one all_sum
per tensor costs more than the bytes: 20 tensors of the tiny model's full fine-tune took
~280 ms that way and ~16 ms in one buffer (scripts/bench_distributed.py). This is the
concatenate-reduce-split of mlx.nn.average_gradients, minus its division: each rank's loss
is already scaled by 1/global_pairs, so the plain sum is the example-weighted average.
"""
from __future__ import annotations

BUCKET_BYTES = 32 * 2**20  # mlx.nn.average_gradients' default grouping


def sum_over_ranks(grads, group, bucket_bytes: int = BUCKET_BYTES):
    """The tree of gradients summed over `group`, same structure, shapes and dtypes."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    flat = tree_flatten(grads)
    out = []
    for bucket in _buckets(flat, bucket_bytes):
        joined = mx.concatenate([g.reshape(-1) for _, g in bucket])
        summed = mx.distributed.all_sum(joined, group=group)
        offset = 0
        for name, g in bucket:
            out.append((name, summed[offset:offset + g.size].reshape(g.shape)))
            offset += g.size
    return tree_unflatten(out)


def _buckets(flat: list, bucket_bytes: int) -> list[list]:
    """Consecutive tensors of one dtype, each bucket closed once it reaches bucket_bytes."""
    buckets, current, size = [], [], 0
    for name, g in flat:
        if current and (g.dtype != current[0][1].dtype or size >= bucket_bytes):
            buckets.append(current)
            current, size = [], 0
        current.append((name, g))
        size += g.nbytes
    if current:
        buckets.append(current)
    return buckets
