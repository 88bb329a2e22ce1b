"""A micro-batch split over CPU streams (engines/cpu_streams.py) trains exactly like one stream,
up to float rounding. (A refused non-finite update spread over streams: test_perf_exactness.py.)"""
from __future__ import annotations

import os

import numpy as np
import pytest

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_dpo.data.batching import collate, split_pairs
from mlx_dpo.data.tokenize import EncodedPair
from mlx_dpo.engines.cpu_streams import alternating_leaves
from mlx_dpo.engines.mlx_engine import MLXEngine
from mlx_dpo.engines.mlx_fast import added


def _pairs(n: int, seed: int = 0) -> list[EncodedPair]:
    rng = np.random.default_rng(seed)

    def ids(lo, hi):
        return [int(i) for i in rng.integers(5, 40, int(rng.integers(lo, hi)))]

    return [EncodedPair(ids(2, 20), ids(1, 15), ids(1, 15), ref_logps=(float(-i), float(-2 * i))) for i in range(n)]


def test_split_pairs_keeps_rows_tokens_and_cached_reference():
    batch = collate(_pairs(5), pad_id=2)
    parts = split_pairs(batch, 2)
    assert [p.num_pairs for p in parts] == [3, 2]
    assert sum(p.num_tokens for p in parts) == batch.num_tokens
    # Part 2 holds pairs 3 and 4: chosen rows 3, 4 and rejected rows 8, 9 of the batch.
    np.testing.assert_array_equal(parts[1].inputs, batch.inputs[[3, 4, 8, 9]])
    np.testing.assert_array_equal(parts[1].ref_logps, batch.ref_logps[[3, 4, 8, 9]])
    assert split_pairs(batch, 9)[-1].num_pairs == 1 and len(split_pairs(batch, 9)) == 5


def test_parts_are_handed_to_eval_leaf_by_leaf_in_turn():
    """The dispatcher follows the order of the outputs it is given: the streams' leaves alternate,
    every leaf once, in each tree's own order, a longer tree's rest at the end."""
    a = {"x": mx.array(1), "y": [mx.array(2), mx.array(3)]}
    b = {"x": mx.array(10), "y": [mx.array(20), mx.array(30)]}
    c = {"x": mx.array(100)}
    assert [int(v) for v in alternating_leaves([a, b])] == [1, 10, 2, 20, 3, 30]
    assert [int(v) for v in alternating_leaves([a, c, b])] == [1, 100, 10, 2, 20, 3, 30]
    assert [int(v) for v in alternating_leaves([a])] == [1, 2, 3]


def _assert_same_gradients(split_engine, whole_engine):
    """Gradients from equal weights (the streams' parts added): equal up to summation order."""
    split, whole = (dict(tree_flatten(added(e._grads))) for e in (split_engine, whole_engine))
    for name, value in whole.items():
        scale = float(mx.abs(value).max())
        np.testing.assert_allclose(np.array(split[name]), np.array(value), rtol=1e-4, atol=1e-5 * scale, err_msg=name)


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_two_streams_train_like_one(make_config, finetune):
    batch = collate(_pairs(4, seed=1), pad_id=2)
    engines = [MLXEngine(make_config(**{"model.finetune": finetune, "compute.cpu_streams": n})) for n in (2, 1)]
    assert len(engines[0].cpu_streams.split(batch)) == 2 and len(engines[1].cpu_streams.split(batch)) == 1
    for step in range(3):
        stats = [e.forward_backward(batch, 4) for e in engines]
        for key in stats[1]:
            assert stats[0][key] == pytest.approx(stats[1][key], rel=1e-5, abs=1e-5), key
        if step == 0:  # later steps start from weights that Adam has moved apart a little (below)
            _assert_same_gradients(*engines)
        norms = [e.apply_update(1e-3)[0] for e in engines]
        assert norms[0] == pytest.approx(norms[1], rel=1e-5)
    split, whole = (dict(tree_flatten(e.models.policy.trainable_parameters())) for e in engines)
    # Adam divides by sqrt(v), and its first step moves every weight by lr (1e-3) whatever the size
    # of its gradient: where a gradient is ~0, summation-order rounding can move a weight by a few
    # percent of lr (1.4e-5 for one LoRA B element of 256 with the AVX2 LoRA kernels).
    for name, value in whole.items():
        np.testing.assert_allclose(np.array(split[name]), np.array(value), rtol=1e-4, atol=3e-5, err_msg=name)
    assert int(np.array(engines[0].optimizer.state["step"])) == 3


def test_reference_pass_over_streams_keeps_each_pairs_rows(make_config):
    """The one-off reference pass (refcache.py) split over two streams returns what one stream
    does, in the batch's row order: every pair's chosen sum, then every pair's rejected sum; five
    pairs split 3 + 2 and are put back in order."""
    batch = collate(_pairs(5, seed=2), pad_id=2)
    engines = [MLXEngine(make_config(**{"compute.cpu_streams": n})) for n in (2, 1)]
    assert len(engines[0].cpu_streams.split(batch)) == 2
    split, whole = (np.array(e.reference_sums(batch)) for e in engines)
    assert split.shape == whole.shape == (10,)
    np.testing.assert_allclose(split, whole, rtol=1e-5, atol=1e-4)
    assert len(set(np.round(whole, 3))) == 10  # distinct sums: a swapped row would show


def test_evaluation_over_streams_sums_like_one_stream(make_config):
    """Validation statistics (DPO terms, KL, preference gap) over two streams are one stream's, with
    the policy moved off the reference so that they are not all zero."""
    batch = collate(_pairs(5, seed=3), pad_id=2)
    engines = [MLXEngine(make_config(**{"compute.cpu_streams": n})) for n in (2, 1)]
    for engine in engines:
        engine.forward_backward(collate(_pairs(4, seed=4), pad_id=2), 4)
        engine.apply_update(1e-2)
    split, whole = (e.evaluate(batch) for e in engines)
    assert split.keys() == whole.keys() and {"kl_sum", "gap_sum", "loss"} <= whole.keys()
    assert whole["pairs"] == 5 and abs(whole["kl_sum"]) > 1e-6
    for key in whole:
        assert split[key] == pytest.approx(whole[key], rel=1e-4, abs=1e-5), key


def test_stream_parts_reach_the_optimizer_apart_only_without_accumulation(make_config):
    """One micro-batch per step: the two streams' gradients stay two trees (the fused kernels add
    them); accumulating, they are summed at once, so that no extra tree is held between
    micro-batches. The steps agree either way."""
    batch = collate(_pairs(4, seed=2), pad_id=2)
    apart, summed = (MLXEngine(make_config(**{"compute.cpu_streams": 2,
                                              "training.gradient_accumulation_steps": steps})) for steps in (1, 2))
    for engine in (apart, summed):
        engine.forward_backward(batch, 4)
    assert len(apart._grads) == 2 and len(summed._grads) == 1
    total = dict(tree_flatten(summed._grads[0]))
    for name, value in tree_flatten(apart._grads[0]):
        np.testing.assert_allclose(np.array(value + dict(tree_flatten(apart._grads[1]))[name]), np.array(total[name]),
                                   rtol=1e-6, atol=1e-7, err_msg=name)
    norms = [engine.apply_update(1e-3)[0] for engine in (apart, summed)]
    assert norms[0] == pytest.approx(norms[1], rel=1e-6)


def _cache_limit() -> int:
    """MLX's current buffer-cache limit (MLX reads it only by setting a new one)."""
    value = mx.set_cache_limit(0)
    mx.set_cache_limit(value)
    return value


def test_runtime_defaults_for_the_cpu(monkeypatch):
    from mlx_dpo import hardware

    if os.uname().sysname == "Linux":
        assert int(os.environ["MLX_BFS_MAX_WIDTH"]) >= 2000
    assert hardware.CPU_CACHE_FRACTION == 0 or "MLX_DPO_CPU_CACHE_FRACTION" in os.environ
    before = _cache_limit()
    hardware.keep_cpu_buffers()
    assert _cache_limit() == before  # MLX's own cache limit by default
    monkeypatch.setattr(hardware, "CPU_CACHE_FRACTION", 0.25)
    hardware.keep_cpu_buffers()
    assert _cache_limit() >= hardware.cpu_cache_ceiling() * 0.99


def test_cpu_cache_follows_the_largest_steps_working_set(make_config, monkeypatch):
    """MLX_DPO_CPU_CACHE_FRACTION=0.25: the cache sized to the largest step's working set."""
    from mlx_dpo import hardware, refcache

    monkeypatch.setattr(hardware, "CPU_CACHE_FRACTION", 0.25)
    engine = MLXEngine(make_config())
    quarter = hardware.cpu_cache_ceiling()
    assert _cache_limit() >= quarter * 0.99  # raised for the first step
    pairs = _pairs(4, seed=2)
    refcache.compute(engine, pairs, 2)
    assert mx.get_cache_memory() == 0  # the one-off reference pass leaves nothing cached
    mx.reset_peak_memory()
    engine.forward_backward(collate(pairs, pad_id=2), 4)
    engine.apply_update(1e-3)
    working = mx.get_peak_memory() - mx.get_active_memory()
    assert _cache_limit() == max(int(working * 1.25), 32 * 2**20) < quarter
    # A larger working set (a 256 MiB intermediate) raises the cap; smaller ones leave it there.
    mx.eval((mx.ones((2**26,)) * 2).sum())
    hardware.fit_cpu_cache()
    raised = _cache_limit()
    assert raised >= 1.25 * 256 * 2**20
    mx.eval((mx.ones((2**20,)) * 2).sum())
    hardware.fit_cpu_cache()
    assert _cache_limit() == raised < quarter
