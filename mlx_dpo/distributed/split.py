"""How each global batch is divided: fixed shares from compute.split, or measured ones.

`auto` times a few identical probe steps on every rank (forward and backward on the same
number of pairs; nothing is applied) and gives each rank a share in proportion to its pairs
per second. Every rank learns every rate through one all-reduce, so all compute the same
shares. The shares only decide who computes what: the update is the same for any split.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import numpy as np

from ..config import split_shares
from ..data.batching import collate
from ..errors import UserError

MIN_SHARE = 0.02  # a slower machine still gets work; a zero share is the same as leaving it out


def parse_split(text: str, world: int, where: str = "compute.split") -> Optional[list[float]]:
    """Shares per rank (normalized), or None for `auto`."""
    shares = split_shares(text, where)
    if shares is None:
        return None
    if len(shares) != world:
        raise UserError(f"{where}: {str(text).strip()!r} gives {len(shares)} share(s) but the run has {world} "
                        "ranks; give one share per hostfile entry, in order, or auto")
    total = sum(shares)
    return [s / total for s in shares]


def format_split(shares: list[float]) -> str:
    return ",".join(f"{s:.2f}" for s in shares)


def shares_from_rates(rates: np.ndarray) -> list[float]:
    """Shares proportional to the measured pairs/second, none below MIN_SHARE."""
    rates = np.maximum(np.asarray(rates, dtype=np.float64), 1e-9)
    shares = np.maximum(rates / rates.sum(), MIN_SHARE)
    return [float(s) for s in shares / shares.sum()]


def probe_rate(engine, pairs, pad_id: int, steps: int) -> float:
    """Pairs per second of this rank's forward+backward on `pairs` (median of `steps`, after a warm-up).

    apply_update(skip=True) drops the accumulated gradients without an exchange or an update."""
    batch = collate(pairs, pad_id)
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        engine.forward_backward(batch, len(pairs))
        engine.apply_update(0.0, skip=True)
        if i:  # the first step compiles and allocates
            times.append(time.perf_counter() - start)
    return len(pairs) / float(np.median(times))


def measure_split(engine, train_pairs, batch_size: int, pad_id: int, rank: int, world: int, steps: int,
                  echo: Callable[[str], None]) -> list[float]:
    """Probe every rank, share the rates through one all-reduce, return the shares."""
    probe = train_pairs[:batch_size]
    mine = np.zeros(world)
    mine[rank] = probe_rate(engine, probe, pad_id, steps)
    rates = engine.all_reduce_sum(mine)
    shares = shares_from_rates(rates)
    detail = ", ".join(f"rank {r} {rates[r]:.1f}" for r in range(world))
    echo(f"compute.split auto: {detail} pairs/s over {steps} probe step(s) of {len(probe)} pairs "
         f"-> split {format_split(shares)}")
    return shares
