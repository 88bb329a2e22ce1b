"""Evaluation's cached reference hidden states: the same KL, log-probs and preference gap as a
live evaluation, no reference forward after the first evaluation or in a later run, and a
memory bound that falls back to the live reference."""
from __future__ import annotations

from pathlib import Path

import pytest

from mlx_dpo.data.batching import collate
from mlx_dpo.data.pipeline import prepare_data
from mlx_dpo.engines.mlx_engine import MLXEngine
from mlx_dpo.engines.mlx_fast import FastPath
from mlx_dpo.trainer import Trainer


@pytest.fixture
def setup(make_config, tmp_path):
    """An engine whose policy has moved off the reference (else the KL is 0 and the rewards too)."""
    cfg = make_config(**{"training.reference_cache_dir": str(tmp_path / "cache")})
    engine = MLXEngine(cfg)
    data = prepare_data(cfg, engine.tokenizer)
    pad = engine.tokenizer.eos_token_id
    for start in (0, 4):
        engine.forward_backward(collate(data.train.pairs[start:start + 4], pad), 4)
        engine.apply_update(3e-2)
    return cfg, engine, data


def evaluate(cfg, engine, data, lines=None) -> dict:
    echo = lines.append if lines is not None else (lambda _: None)
    return Trainer(cfg, engine, data.train, data.val, 4, echo=echo, progress=False)._evaluate()


def no_reference(monkeypatch):
    def refuse(*args):
        raise AssertionError("the reference ran although its hidden states were cached")

    monkeypatch.setattr(FastPath, "reference_hidden", refuse)


def assert_same(metrics: dict, live: dict) -> None:
    assert metrics.keys() == live.keys()
    for key, value in live.items():
        assert metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key


def test_cached_evaluation_equals_the_live_one_and_runs_no_reference(setup, make_config, monkeypatch):
    cfg, engine, data = setup
    live = evaluate(make_config(**{"training.eval_reference_cache_gb": 0}), engine, data)
    assert all(p.ref_hidden is None for p in data.val.pairs)
    assert live["kl"] > 1e-4 and abs(live["rewards/margins"]) > 1e-4  # the policy left the reference

    trainer = Trainer(cfg, engine, data.train, data.val, 4, echo=lambda _: None, progress=False)
    first = trainer._evaluate()  # makes the cache: one reference pass, as a live evaluation would
    assert all(p.ref_hidden is not None for p in data.val.pairs)
    chosen, rejected = data.val.pairs[0].ref_hidden
    assert chosen.shape[0] == len(data.val.pairs[0].chosen) and rejected.shape[0] == len(data.val.pairs[0].rejected)
    assert_same(first, live)
    no_reference(monkeypatch)
    assert_same(trainer._evaluate(), live)


def test_a_later_run_reads_the_cached_hidden_states(setup, monkeypatch):
    cfg, engine, data = setup
    lines: list = []
    first = evaluate(cfg, engine, data, lines)
    assert any("computed, cached in" in line for line in lines)
    later = prepare_data(cfg, engine.tokenizer)  # a new run: fresh pairs, same data and model
    no_reference(monkeypatch)
    lines.clear()
    assert_same(evaluate(cfg, engine, later, lines), first)
    assert any("from cache" in line for line in lines)


def test_over_the_memory_bound_evaluation_runs_the_reference(setup, make_config):
    cfg, engine, data = setup
    live = evaluate(make_config(**{"training.eval_reference_cache_gb": 0}), engine, data)
    lines: list = []
    bounded = make_config(**{"training.eval_reference_cache_gb": 1e-9,
                             "training.reference_cache_dir": cfg.training.reference_cache_dir})
    assert_same(evaluate(bounded, engine, data, lines), live)
    assert any("over training.eval_reference_cache_gb" in line for line in lines)
    assert all(p.ref_hidden is None for p in data.val.pairs)


def test_a_damaged_cache_file_is_recomputed(setup):
    cfg, engine, data = setup
    first = evaluate(cfg, engine, data)
    (path,) = Path(cfg.training.reference_cache_dir).glob("*.eval-hidden.safetensors")
    path.write_bytes(b"not a safetensors file")
    lines: list = []
    assert_same(evaluate(cfg, engine, prepare_data(cfg, engine.tokenizer), lines), first)
    assert any("computed, cached in" in line for line in lines)


def test_without_a_hidden_size_in_the_config_the_first_batch_shows_it(setup, make_config, monkeypatch):
    cfg, engine, data = setup
    monkeypatch.delitem(engine.models.model_config, "hidden_size")
    lines: list = []
    bounded = make_config(**{"training.eval_reference_cache_gb": 1e-9,
                             "training.reference_cache_dir": cfg.training.reference_cache_dir})
    evaluate(bounded, engine, data, lines)
    assert any("over training.eval_reference_cache_gb" in line for line in lines)
    assert all(p.ref_hidden is None for p in data.val.pairs)
    evaluate(cfg, engine, data)  # within the bound: attached
    assert all(p.ref_hidden is not None for p in data.val.pairs)
