"""Data parallelism over CPU cores inside one process, for the MLX engine on the CPU.

MLX runs each CPU operation on one thread (BLAS aside), so on a 2-core machine one core idles
through every softmax, norm and optimizer pass. Each CPU stream has its own thread: cutting a
micro-batch into whole pairs, one part per stream, runs the parts side by side, with OpenBLAS at
one thread per call so that the streams, not OpenBLAS's pool, share the cores. The parts'
gradients and statistics are summed, so the step equals the unsplit one up to float rounding
(tests/test_cpu_streams.py). Nothing changes on Metal, where one stream already fills the GPU.
"""
from __future__ import annotations

import contextlib
import itertools
import os

import mlx.core as mx
from mlx.utils import tree_flatten

from ..data.batching import Batch, split_pairs
from ..hardware import openblas_threads


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


class CpuStreams:
    def __init__(self, requested: int):
        on_cpu = mx.default_device() == mx.cpu
        count = (requested or cpu_cores()) if on_cpu else 1
        self.streams = [mx.new_stream(mx.cpu) for _ in range(count)] if count > 1 else []

    def describe(self) -> str:
        return f"CPU streams: {len(self.streams)} (a micro-batch's pairs split across cores)" if self.streams \
            else "CPU streams: off"

    def split(self, batch: Batch) -> list[tuple[object, Batch]]:
        """(stream, part) for each part; a stream of None means the default one."""
        if len(self.streams) < 2 or batch.num_pairs < 2:
            return [(None, batch)]
        parts = split_pairs(batch, len(self.streams))
        return list(zip(self.streams, parts))

    @staticmethod
    def built(parts: list, fn) -> list:
        """fn(part) for each (stream, part) of `split`, each built on its part's stream; nothing is
        evaluated (evaluate inside `running(parts)`)."""
        out = []
        for stream, part in parts:
            with on_stream(stream):
                out.append(fn(part))
        return out

    @staticmethod
    def running(parts: list) -> contextlib.AbstractContextManager:
        """Context for evaluating `parts`: one OpenBLAS thread per stream when there are several."""
        return openblas_threads(1) if len(parts) > 1 else contextlib.nullcontext()


def alternating_leaves(trees: list) -> list:
    """The arrays of `trees` (one per stream), taken in turn: the first of each, the second of each...

    One thread dispatches an `mx.eval`, staying only a few operations ahead of the streams (MLX
    throttles it by the number of operations in flight, over all streams). The order in which the
    outputs are handed over shapes the order of dispatch: with each part's gradient tree whole, one
    after the other, a stream ran dry for 0.5-1.1 s of a ~5 s full fine-tuning step while the
    dispatcher fed the other; with the leaves alternating, both stay busy (docs/benchmarks.md,
    "Feeding both CPU streams")."""
    leaves = [[leaf for _, leaf in tree_flatten(tree)] for tree in trees]
    return [leaf for row in itertools.zip_longest(*leaves) for leaf in row if leaf is not None]


def on_stream(stream) -> contextlib.AbstractContextManager:
    return mx.stream(stream) if stream is not None else contextlib.nullcontext()
