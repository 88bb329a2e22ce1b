"""`mlx-dpo train CONFIG --smoke`: a short real run that must pass, fail loudly, and project."""
import tempfile
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from mlx_dpo import smoke
from mlx_dpo.cli import main
from mlx_dpo.engines.mlx_engine import MLXEngine


def write_config(tmp_path, tiny_model, tiny_data, **sections) -> Path:
    raw = {"model": {"base_model": str(tiny_model), "lora_rank": 4},
           "data": {"train_file": str(tiny_data["train"]), "validation_file": str(tiny_data["val"]),
                    "max_prompt_length": 32, "max_response_length": 32},
           "training": {"learning_rate": 1e-3, "batch_size": 4, "max_steps": 500, "eval_steps": 100,
                        "save_steps": 250, "seed": 0},
           "logging": {"output_dir": str(tmp_path / "real-run")}}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_smoke_passes_projects_and_leaves_the_run_folder_alone(tmp_path, tiny_model, tiny_data):
    config = write_config(tmp_path, tiny_model, tiny_data)
    result = CliRunner().invoke(main, ["train", str(config), "--smoke"])
    assert result.exit_code == 0, result.output
    assert "smoke: passed" in result.output
    assert "resumed from checkpoint-2" in result.output
    assert "projected wall time of the full run" in result.output
    assert "(500 steps, 6 evaluations of 16 pairs, 2 checkpoint saves" in result.output
    assert "projected peak memory" in result.output
    assert not (tmp_path / "real-run").exists()  # only a temporary folder was written


def test_projection_is_the_measured_times_scaled_to_the_full_run(make_config):
    cfg = make_config(**{"training.max_steps": 1000, "training.eval_steps": 300, "training.save_steps": 400})

    class Measured:
        step_seconds = [5.0, 0.5, 0.7, 0.6]  # the first (warm-up) is left out: median 0.6
        eval_seconds, eval_pairs = 2.0, 40  # 0.05 s per pair
        save_seconds = [0.25, 0.25]

    sample = {"val_count": 200, "longest": [type("P", (), {"length": 64})()]}
    report = smoke._project(cfg, Measured(), sample, 4, load_seconds=3.0, peak=1.5, memory_gb=16.0)
    # evaluations at step 0, 300, 600, 900 and the end; saves at 400, 800 and the end
    assert (report["full_evals"], report["full_saves"]) == (5, 3)
    expected = 3.0 + 0.6 * 1000 + 0.05 * 200 * 5 + 0.25 * 3
    assert report["projected_seconds"] == pytest.approx(expected)
    assert any("10m 54s" in line for line in smoke.report_lines({**report, "resume_loss_diff": 0.0}))


def test_a_broken_resume_fails_the_smoke_run(tmp_path, tiny_model, tiny_data, monkeypatch):
    """If loading a checkpoint restored nothing, the resumed run ends elsewhere: exit 1."""
    monkeypatch.setattr(MLXEngine, "load_state", lambda self, folder: None)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the kept files land in the test's folder
    config = write_config(tmp_path, tiny_model, tiny_data)
    result = CliRunner().invoke(main, ["train", str(config), "--smoke"])
    assert result.exit_code == 1, result.output
    assert "smoke run failed while training, evaluating, saving and resuming" in result.output
    assert "the resumed run ends at eval/loss" in result.output


def test_a_step_that_crashes_fails_the_smoke_run(tmp_path, tiny_model, tiny_data, monkeypatch):
    def crash(self, batch, global_pairs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(MLXEngine, "forward_backward", crash)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the kept files land in the test's folder
    result = CliRunner().invoke(main, ["train", str(write_config(tmp_path, tiny_model, tiny_data)), "--smoke"])
    assert result.exit_code == 1
    assert "RuntimeError: kernel exploded" in result.output
    kept = list(tmp_path.glob("mlx-dpo-smoke-*"))  # a failed smoke run keeps its files to look at
    assert len(kept) == 1 and f"files kept in {kept[0]}" in result.output


def test_bad_input_is_exit_2_without_a_traceback(tmp_path, tiny_model, tiny_data):
    config = write_config(tmp_path, tiny_model, tiny_data, data={"train_file": str(tmp_path / "missing.jsonl")})
    result = CliRunner().invoke(main, ["train", str(config), "--smoke"])
    assert result.exit_code == 2
    assert "missing.jsonl" in result.output and "Traceback" not in result.output


def test_smoke_samples_the_longest_pairs_for_peak_memory(make_config):
    cfg = make_config()
    engine = MLXEngine(cfg)
    sample = smoke._sample(cfg, engine.tokenizer, batch_size=4, steps=2)
    assert len(sample["train"].pairs) == 8 and len(sample["val"].pairs) == 4
    encoded = [smoke.make_encoder(cfg, engine.tokenizer).encode(p) for p in
               smoke.read_pairs(cfg.data.train_file).pairs]
    lengths = sorted((e.length for e in encoded), reverse=True)
    assert [p.length for p in sample["longest"]] == lengths[:4]
    assert lengths[0] > lengths[-1]  # the fixture has pairs of different lengths
