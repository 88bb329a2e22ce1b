"""constraints.kl_target during training: KL forced over the target by a high learning rate,
with each kl_action; the best checkpoint; eval/preference_gap at every evaluation."""
import json
import math
from pathlib import Path

import numpy as np
import pytest

from mlx_dpo import checkpoint
from mlx_dpo.errors import TrainingStopped
from mlx_dpo.run import run_training

HIGH_LR = {"training.learning_rate": 3e-2, "training.max_steps": 6, "training.eval_steps": 2,
           "training.save_steps": 2}


def evals(cfg):
    rows = [json.loads(line) for line in open(Path(cfg.logging.output_dir) / "metrics.jsonl")]
    return [r for r in rows if "eval/kl" in r]


def adapters(folder):
    import mlx.core as mx

    return {k: np.array(v) for k, v in mx.load(str(folder / "adapters.safetensors")).items()}


def test_warn_logs_and_trains_to_the_end(make_config):
    cfg = make_config(**HIGH_LR, **{"constraints.kl_action": "warn"})
    lines = []
    summary = run_training(cfg, echo=lines.append, progress=False)
    over = [r["step"] for r in evals(cfg) if r["eval/kl"] > cfg.constraints.kl_target]
    assert over, "the high learning rate must push KL over the target"
    warnings = [line for line in lines if line.startswith("warning:") and "kl_target" in line]
    assert [int(w.split()[2].rstrip(":")) for w in warnings] == over
    assert summary["steps"] == 6 and summary["kl_violations"] == len(over)
    assert (Path(cfg.logging.output_dir) / "final").is_dir()


def test_stop_ends_the_run_at_the_first_evaluation_over_target(make_config):
    cfg = make_config(**HIGH_LR, **{"constraints.kl_action": "stop"})
    with pytest.raises(TrainingStopped, match=r"kl_action: stop") as err:
        run_training(cfg, echo=lambda _: None, progress=False)
    assert err.value.exit_code == 1
    rows = evals(cfg)
    assert rows[-1]["eval/kl"] > cfg.constraints.kl_target  # it stopped at the violating evaluation
    assert all(r["eval/kl"] <= cfg.constraints.kl_target for r in rows[:-1])
    assert f"step {rows[-1]['step']}:" in str(err.value)
    assert not (Path(cfg.logging.output_dir) / "final").exists()


def test_rollback_restores_the_best_checkpoint_then_stops_after_max_rollbacks(make_config):
    cfg = make_config(**HIGH_LR, **{"constraints.kl_action": "rollback", "constraints.max_rollbacks": 2,
                                    "logging.save_total_limit": 1})
    lines = []
    with pytest.raises(TrainingStopped, match=r"after 2 rollback\(s\)"):
        run_training(cfg, echo=lines.append, progress=False)
    out = Path(cfg.logging.output_dir)
    best = json.loads((out / "best.json").read_text())
    # Only the starting point (checkpoint-0, saved for rollback) was within the target.
    assert best["checkpoint"] == "checkpoint-0" and best["kl"] < 1e-6
    assert (out / "checkpoint-0").is_dir(), "the best checkpoint must survive rotation (save_total_limit 1)"
    assert [line.split(":")[0] for line in lines if line.startswith("rollback")] == ["rollback 1/2", "rollback 2/2"]
    # The checkpoint saved right after the last rollback holds the restored weights and their metrics.
    after = checkpoint.latest_checkpoint(out)
    assert after.name == "checkpoint-4"
    start = adapters(out / "checkpoint-0")
    restored = adapters(after)
    assert all(np.array_equal(start[k], restored[k]) for k in start)
    assert json.loads((after / "training_metrics.json").read_text())["kl_divergence"] < 1e-6


def test_best_checkpoint_tracked_within_target_and_kept_by_rotation(make_config):
    cfg = make_config(**{"training.max_steps": 6, "training.eval_steps": 1, "training.save_steps": 1,
                         "logging.save_total_limit": 1, "constraints.kl_target": 0.1})
    summary = run_training(cfg, echo=lambda _: None, progress=False)
    rows = [r for r in evals(cfg) if r["step"] > 0]
    within = [r for r in rows if r["eval/kl"] <= 0.1]
    assert within and len(within) < len(rows), "fixture drift: want some evaluations within the target, some over"
    expected = min(within, key=lambda r: r["eval/loss"])
    out = Path(cfg.logging.output_dir)
    best = json.loads((out / "best.json").read_text())
    assert best["checkpoint"] == f"checkpoint-{expected['step']}"
    assert best["value"] == pytest.approx(expected["eval/loss"]) and best["mode"] == "min"
    assert summary["best_checkpoint"] == str(out / best["checkpoint"])
    kept = {p.name for p in checkpoint.list_checkpoints(out)}
    assert kept == {best["checkpoint"], "checkpoint-6"}


def test_best_metric_max_mode(make_config):
    cfg = make_config(**{"training.max_steps": 4, "training.eval_steps": 1, "training.save_steps": 1,
                         "constraints.kl_target": 10.0, "constraints.best_metric": "eval/preference_gap"})
    run_training(cfg, echo=lambda _: None, progress=False)
    rows = [r for r in evals(cfg) if r["step"] > 0]
    best = json.loads((Path(cfg.logging.output_dir) / "best.json").read_text())
    assert best["mode"] == "max"
    assert best["step"] == max(rows, key=lambda r: r["eval/preference_gap"])["step"]


def test_preference_gap_reported_at_every_evaluation(make_config):
    cfg = make_config(**{"training.max_steps": 4, "training.eval_steps": 2})
    summary = run_training(cfg, echo=lambda _: None, progress=False)
    rows = evals(cfg)
    assert [r["step"] for r in rows] == [0, 2, 4]
    assert rows[0]["eval/preference_gap"] == 0.0  # policy == reference: every margin is 0
    assert all(0.0 <= r["eval/preference_gap"] <= 1.0 for r in rows)
    assert rows[-1]["eval/preference_gap"] > 0  # the learnable fixture separates chosen from rejected
    assert summary["eval/preference_gap"] == rows[-1]["eval/preference_gap"]
    assert summary["gap_within_target"] == (rows[-1]["eval/preference_gap"] >= 0.15)
    metrics = json.loads((Path(cfg.logging.output_dir) / "checkpoint-4" / "training_metrics.json").read_text())
    assert metrics["eval/preference_gap"] == rows[-1]["eval/preference_gap"]


def test_gap_is_floored_at_zero_and_averages_tanh_half_margin():
    from mlx_dpo.preference_gap import gap_of_margin, mean_gap

    # margins 2 and -1: (tanh(1) + tanh(-0.5)) / 2 = (0.76159 - 0.46212) / 2 = 0.14974
    total = gap_of_margin(2.0) + gap_of_margin(-1.0)
    assert mean_gap(total, 2) == pytest.approx(0.149738, abs=1e-6)
    assert mean_gap(gap_of_margin(-3.0), 1) == 0.0
    assert math.isnan(mean_gap(0.0, 0))
