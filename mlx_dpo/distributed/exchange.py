"""The gradient exchange: every rank's gradients summed, in as few messages as pays off.

MLX's ring pays a fixed cost per collective, so small tensors (LoRA matrices, norms,
biases) are packed into shared buffers, the concatenate-reduce-split of
mlx.nn.average_gradients minus its division: each rank's loss is already scaled by
1/global_pairs, so the plain sum is the example-weighted average. Tensors of a bucket's size
or more go alone and uncopied: in a full fine-tune, copying them into buffers cost more than
the messages it saved (scripts/bench_distributed.py, docs/benchmarks.md).
"""
from __future__ import annotations

BUCKET_BYTES = 2**20


def sum_over_ranks(grads, group, bucket_bytes: int = BUCKET_BYTES):
    """The tree of gradients summed over `group`, same structure, shapes and dtypes."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    out = []
    for bucket in _buckets(tree_flatten(grads), bucket_bytes):
        if len(bucket) == 1:
            out.append((bucket[0][0], mx.distributed.all_sum(bucket[0][1], group=group)))
            continue
        summed = mx.distributed.all_sum(mx.concatenate([g.reshape(-1) for _, g in bucket]), group=group)
        offset = 0
        for name, g in bucket:
            out.append((name, summed[offset:offset + g.size].reshape(g.shape)))
            offset += g.size
    return tree_unflatten(out)


def _buckets(flat: list, bucket_bytes: int) -> list[list]:
    """Messages in a fixed order (the same on every rank): a tensor of at least bucket_bytes
    alone; smaller ones of one dtype packed together up to bucket_bytes."""
    buckets, current, size = [], [], 0
    for name, g in flat:
        if g.nbytes >= bucket_bytes:
            buckets.append([(name, g)])
            continue
        if current and (g.dtype != current[0][1].dtype or size + g.nbytes > bucket_bytes):
            buckets.append(current)
            current, size = [], 0
        current.append((name, g))
        size += g.nbytes
    if current:
        buckets.append(current)
    return buckets
