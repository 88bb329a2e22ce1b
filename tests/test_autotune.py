"""training.batch_size auto: the per-chip table, else a probe of real steps, cached."""
import pytest

import mlx_dpo.autotune as autotune
from mlx_dpo.engines.mlx_engine import MLXEngine
from mlx_dpo.errors import UserError
from mlx_dpo.hardware import DeviceInfo

UNKNOWN_CHIP = DeviceInfo("metal", "Apple M9 Test", 64.0)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_DPO_CACHE_DIR", str(tmp_path / "cache"))


def test_table_knows_listed_chips_only():
    assert autotune.table_lookup(DeviceInfo("metal", "Apple M4 Max", 128.0)) == 32
    assert autotune.table_lookup(DeviceInfo("metal", "Apple M3 Ultra", 512.0)) == 4
    assert autotune.table_lookup(DeviceInfo("metal", "Apple M4", 16.0)) is None  # base M4: not listed
    assert autotune.table_lookup(DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", 80.0)) is None
    assert autotune.table_lookup(DeviceInfo("cpu", "cpu (x86_64)", 16.0)) == 4


def test_probe_keeps_the_largest_batch_within_budget(make_config):
    engine = MLXEngine(make_config())
    autotune._trial(engine, 1, 32, 32)  # warm-up: one-time allocations are not per-pair memory
    peaks = {b: autotune._trial(engine, b, 32, 32) for b in (1, 2, 4, 8)}
    assert peaks[1] < peaks[2] < peaks[4] < peaks[8]  # memory grows with the batch
    budget = (peaks[4] + peaks[8]) / 2
    size, peak = autotune.probe_batch_size(engine, 32, 32, budget, echo=lambda line: None, max_batch=16)
    assert 4 <= size < 8 and peak <= budget
    # a budget with room for everything stops at the cap; none for one pair is a clear error
    assert autotune.probe_batch_size(engine, 32, 32, 1e6, echo=lambda line: None, max_batch=16)[0] == 16
    with pytest.raises(UserError, match="does not fit the memory budget"):
        autotune.probe_batch_size(engine, 32, 32, peaks[1] / 10, echo=lambda line: None)


def test_probe_never_runs_a_size_predicted_over_budget(make_config, monkeypatch):
    """Peak = 1 GB + 1 GB per pair; budget 10.5 GB: sizes 1, 2, 4, 8 fit, 16 is never tried,
    and the fit through the measurements adds 9 (10 GB)."""
    engine = MLXEngine(make_config())
    tried = []

    def fake_trial(engine, size, prompt_len, response_len):
        tried.append(size)
        return 1.0 + size

    monkeypatch.setattr(autotune, "_trial", fake_trial)
    size, peak = autotune.probe_batch_size(engine, 32, 32, 10.5, echo=lambda line: None)
    assert (size, peak) == (9, 10.0)
    assert tried == [1, 1, 2, 4, 8, 9]  # the first is the unmeasured warm-up


def test_unknown_chip_is_probed_once_then_cached(make_config, monkeypatch):
    cfg = make_config(**{"training.batch_size": "auto", "compute.memory_fraction": 0.5})
    engine = MLXEngine(cfg)
    calls = []

    def fake_probe(engine, prompt_len, response_len, budget, echo):
        calls.append((prompt_len + response_len, budget))
        return 12, 20.0

    monkeypatch.setattr(autotune, "probe_batch_size", fake_probe)
    size, source = autotune.resolve_batch_size(cfg, UNKNOWN_CHIP, engine)
    assert (size, calls) == (12, [(64, 32.0)]) and source.startswith("a probe")
    size, source = autotune.resolve_batch_size(cfg, UNKNOWN_CHIP, engine)
    assert size == 12 and "cached" in source and len(calls) == 1
    assert autotune.cache_path().is_file()
    longer = make_config(**{"training.batch_size": "auto", "data.max_response_length": 64})
    autotune.resolve_batch_size(longer, UNKNOWN_CHIP, engine)  # another sequence length: probed again
    assert len(calls) == 2


def test_explicit_batch_size_is_never_probed(make_config, monkeypatch):
    monkeypatch.setattr(autotune, "probe_batch_size", lambda *a, **k: pytest.fail("probed"))
    assert autotune.resolve_batch_size(make_config(), UNKNOWN_CHIP, engine=None) == (4, "config")
