"""One starting point for every rank: rank 0's weights, optimizer state and data position.

Only rank 0 writes checkpoints, so on a second machine `--resume` finds nothing on disk; and
even on a fresh start, a different MLX build or seed handling could initialise LoRA
differently. So after the (optional) resume, every rank takes rank 0's trainable weights,
optimizer moments and RunState. MLX has no broadcast: an all-sum where every other rank
contributes zeros is one (x + 0 = x exactly).
"""
from __future__ import annotations

from dataclasses import fields

import numpy as np

RING_PROOF_BYTES = 32


def broadcast_arrays(arrays: dict, group, rank: int) -> dict:
    """Rank 0's value of every array. Ranks may hold the same names in different orders (a
    loaded optimizer state is sorted, a fresh one is not), and collectives must be issued in
    one order everywhere: so one flat buffer per dtype, names sorted, evaluated one by one."""
    import mlx.core as mx

    out = {}
    by_dtype: dict = {}
    for name in sorted(arrays):
        by_dtype.setdefault(str(arrays[name].dtype), []).append(name)
    for dtype in sorted(by_dtype):
        names = by_dtype[dtype]
        flat = mx.concatenate([arrays[n].reshape(-1) for n in names])
        flat = mx.distributed.all_sum(flat if rank == 0 else mx.zeros_like(flat), group=group)
        mx.eval(flat)
        offset = 0
        for n in names:
            size = arrays[n].size
            out[n] = flat[offset:offset + size].reshape(arrays[n].shape)
            offset += size
    return out


def sync_from_rank0(engine, state, group, rank: int) -> None:
    """Overwrite this rank's trainable weights, optimizer state and `state` (a RunState) with rank 0's."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    policy = engine.models.policy
    params = dict(tree_flatten(policy.trainable_parameters()))
    optimizer = dict(tree_flatten(engine.optimizer.state))
    synced = broadcast_arrays({**{"p/" + k: v for k, v in params.items()},
                               **{"o/" + k: v for k, v in optimizer.items()}}, group, rank)
    policy.load_weights([(k, synced["p/" + k]) for k in params], strict=False)
    engine.optimizer.state = tree_unflatten([(k, synced["o/" + k]) for k in optimizer])
    mx.eval(policy.parameters(), engine.optimizer.state)
    sync_run_state(state, engine.all_reduce_sum, rank)


def sync_run_state(state, all_reduce_sum, rank: int) -> None:
    """Overwrite `state`'s numbers (a RunState: step, data position, ...) with rank 0's, through
    an all-sum where the other ranks give zeros. Both engines' group runs use it."""
    numeric = [f.name for f in fields(state) if isinstance(getattr(state, f.name), (int, float))
               and not isinstance(getattr(state, f.name), bool)]
    values = np.array([getattr(state, k) for k in numeric], dtype=np.float64)
    values = all_reduce_sum(values if rank == 0 else np.zeros_like(values))
    for name, value in zip(numeric, values):
        kind = type(getattr(state, name))
        setattr(state, name, kind(round(value)) if kind is int else float(value))


def exchange_ring_proofs(mine: bytes, group, world: int) -> list[bytes]:
    """Every rank's 32-byte proof, gathered over the ring itself (so it is the ring's peer that proves)."""
    import mlx.core as mx

    gathered = mx.distributed.all_gather(mx.array(np.frombuffer(mine, dtype=np.uint8)), group=group)
    rows = np.array(gathered, dtype=np.uint8).reshape(world, RING_PROOF_BYTES)
    return [row.tobytes() for row in rows]

