"""Cached reference log-probs: the same numbers as the live reference, found again by later
runs, and never reused for other data or other weights."""
from __future__ import annotations

import numpy as np
import pytest

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_dpo import refcache
from mlx_dpo.data.batching import collate
from mlx_dpo.data.pipeline import prepare_data
from mlx_dpo.engines.mlx_engine import MLXEngine


@pytest.fixture
def setup(make_config, tmp_path):
    cfg = make_config(**{"training.reference_cache_dir": str(tmp_path / "cache")})
    engine = MLXEngine(cfg)
    pairs = prepare_data(cfg, engine.tokenizer).train.pairs[:12]
    return cfg, engine, pairs


def test_cached_step_equals_live_step(setup):
    cfg, engine, pairs = setup
    values = refcache.load_or_compute(engine, pairs, 5, cfg.training.reference_cache_dir, echo=lambda _: None)
    live_batch = collate(pairs[:4], engine.tokenizer.eos_token_id)
    refcache.attach(pairs, values)
    cached_batch = collate(pairs[:4], engine.tokenizer.eos_token_id)
    assert live_batch.ref_logps is None and cached_batch.ref_logps.shape == (8,)
    # The cache was filled in different batches (other padding): equal up to float rounding.
    live_ref = np.array(engine.reference_sums(live_batch))
    np.testing.assert_allclose(cached_batch.ref_logps, live_ref, rtol=1e-6, atol=1e-4)
    # Move the policy off the reference: at policy == reference every reward is 0 and the
    # accuracy would flip on rounding noise.
    engine.forward_backward(collate(pairs[4:8], engine.tokenizer.eos_token_id), 4)
    engine.apply_update(1e-2)
    live = engine.forward_backward(live_batch, 4)
    assert abs(live["rewards/margins"]) > 1e-3
    g_live = {k: np.array(v) for k, v in tree_flatten(engine._grads)}
    engine._grads = None
    cached = engine.forward_backward(cached_batch, 4)
    g_cached = {k: np.array(v) for k, v in tree_flatten(engine._grads)}
    for key in live:
        assert cached[key] == pytest.approx(live[key], rel=1e-5, abs=1e-5), key
    for name in g_live:
        np.testing.assert_allclose(g_cached[name], g_live[name], rtol=1e-4, atol=1e-6)


def test_a_later_run_reads_the_cache_instead_of_computing(setup, monkeypatch):
    cfg, engine, pairs = setup
    lines = []
    first = refcache.load_or_compute(engine, pairs, 4, cfg.training.reference_cache_dir, echo=lines.append)
    assert "computed" in lines[-1]

    def no_compute(*args):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(refcache, "compute", no_compute)
    again = refcache.load_or_compute(MLXEngine(cfg), pairs, 4, cfg.training.reference_cache_dir,
                                     echo=lines.append)
    assert "from cache" in lines[-1]
    np.testing.assert_array_equal(again, first)


def test_the_key_follows_data_and_reference_weights_but_not_adapters(setup):
    cfg, engine, pairs = setup
    key = refcache.cache_key(engine, pairs)
    assert refcache.cache_key(engine, pairs[:-1]) != key
    changed = list(pairs)
    changed[0] = refcache.EncodedPair(pairs[0].prompt, pairs[0].chosen + [5], pairs[0].rejected)
    assert refcache.cache_key(engine, changed) != key
    policy = engine.models.policy
    lora = [m for _, m in policy.named_modules() if hasattr(m, "lora_b")][0]
    lora.lora_b = lora.lora_b + 1.0  # training moves the adapters: the reference is unchanged
    assert refcache.cache_key(engine, pairs) == key
    base = lora.linear
    base.weight = base.weight + 1e-3
    assert refcache.cache_key(engine, pairs) != key


def test_a_damaged_cache_file_is_recomputed(setup):
    cfg, engine, pairs = setup
    folder = cfg.training.reference_cache_dir
    first = refcache.load_or_compute(engine, pairs, 4, folder, echo=lambda _: None)
    path = next(iter(__import__("pathlib").Path(folder).glob("*.safetensors")))
    path.write_bytes(b"not a safetensors file")
    lines = []
    again = refcache.load_or_compute(engine, pairs, 4, folder, echo=lines.append)
    assert "computed" in lines[-1]
    np.testing.assert_allclose(again, first, rtol=1e-6)
    assert np.isfinite(first).all() and (first < 0).all()


def test_training_with_the_cache_follows_the_live_run(make_config, tmp_path):
    from mlx_dpo.run import run_training

    def losses(precompute: bool, name: str):
        cfg = make_config(**{"training.precompute_reference": precompute,
                             "training.reference_cache_dir": str(tmp_path / "cache"),
                             "logging.output_dir": str(tmp_path / name), "training.max_steps": 3})
        lines = []
        run_training(cfg, echo=lines.append, progress=False)
        assert any("reference log-probs" in line for line in lines) == precompute
        import json

        rows = [json.loads(r) for r in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r]

    live, cached = losses(False, "live"), losses(True, "cached")
    assert len(live) == 3
    np.testing.assert_allclose(cached, live, rtol=1e-5)
