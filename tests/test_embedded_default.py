"""`mlx-dpo train` with no argument: the bundled smoke run learns the preference within the KL target."""
import json

from click.testing import CliRunner

from mlx_dpo.cli import main
from mlx_dpo.commands.train import ASSETS, load_train_config


def test_smoke_config_points_into_the_package():
    cfg = load_train_config(None, ())
    assert cfg.model.base_model == str(ASSETS / "tiny-model")
    assert sum(1 for _ in open(cfg.data.train_file)) >= 1000
    train_prompts = {json.loads(line)["prompt"] for line in open(cfg.data.train_file)}
    val_prompts = {json.loads(line)["prompt"] for line in open(cfg.data.validation_file)}
    assert not train_prompts & val_prompts


def test_embedded_default_run_reaches_accuracy_and_kl_targets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["train", "--no-progress"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in open(tmp_path / "outputs" / "smoke" / "metrics.jsonl")]
    evals = [r for r in rows if "eval/kl" in r]
    assert evals[0]["step"] == 0 and abs(evals[0]["eval/kl"]) < 1e-6
    final = evals[-1]
    assert final["step"] == 120
    assert final["eval/rewards/accuracies"] >= 0.8 and final["eval/kl"] <= 0.1
    assert "validation reward accuracy:" in result.output and "within kl_target" in result.output
    assert (tmp_path / "outputs" / "smoke" / "final" / "adapters.safetensors").exists()


def test_running_the_smoke_default_again_replaces_its_own_earlier_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    short = ["train", "--no-progress", "--set", "training.warmup_steps=0", "--set", "training.eval_steps=100"]
    first = CliRunner().invoke(main, [*short, "--set", "training.max_steps=2"])
    assert first.exit_code == 0, first.output
    (tmp_path / "outputs" / "smoke" / "NOTES.txt").write_text("mine")
    again = CliRunner().invoke(main, [*short, "--set", "training.max_steps=1"])
    assert again.exit_code == 0, again.output
    assert "starting again: removing the earlier run" in again.output
    steps = [json.loads(line)["step"] for line in open(tmp_path / "outputs" / "smoke" / "metrics.jsonl")]
    assert max(steps) == 1 and steps.count(0) == 1  # the earlier run's rows are gone, not mixed in
    assert (tmp_path / "outputs" / "smoke" / "NOTES.txt").read_text() == "mine"
