"""`check_quality_gates`, `mlx-dpo monitor` (one checkpoint and --watch) and the workflow scripts."""
import importlib.util
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from mlx_dpo.cli import main
from mlx_dpo.config import config_from_dict
from mlx_dpo.errors import UserError
from mlx_dpo.gates import GateInputError
from mlx_dpo.monitor import check_quality_gates, watch
from mlx_dpo.run import run_training

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def run(tiny_model, tiny_data, tmp_path_factory):
    """A finished 4-step run with a checkpoint (and an evaluation) every 2 steps."""
    folder = tmp_path_factory.mktemp("monitored")
    raw = {"model": {"base_model": str(tiny_model), "lora_rank": 4},
           "data": {"train_file": str(tiny_data["train"]), "validation_file": str(tiny_data["val"]),
                    "max_prompt_length": 32, "max_response_length": 32},
           "training": {"learning_rate": 1e-3, "batch_size": 4, "max_steps": 4, "eval_steps": 2,
                        "save_steps": 2, "seed": 0},
           "optimization": {"lr_scheduler": "constant", "weight_decay": 0.0},
           "logging": {"output_dir": str(folder / "out")}}
    config = folder / "dpo_config.yaml"
    config.write_text(yaml.safe_dump(raw))
    run_training(config_from_dict(raw), echo=lambda _: None, progress=False)
    return {"config": config, "raw": raw, "out": folder / "out"}


def recorded(folder):
    return json.loads((folder / "training_metrics.json").read_text())


def test_recomputed_gap_matches_the_one_recorded_in_training(run):
    folder = run["out"] / "checkpoint-4"
    result = check_quality_gates(folder, run["config"])
    metrics = recorded(folder)
    assert result["kl_divergence"] == pytest.approx(metrics["kl_divergence"])
    assert result["recorded_preference_gap"] == metrics["eval/preference_gap"]
    # Scored one pair at a time through validate_dpo_pairs vs batched in training: same number.
    assert result["preference_gap"] == pytest.approx(metrics["eval/preference_gap"], abs=1e-5)
    assert result["preference_gap"] > 0
    expected = metrics["kl_divergence"] <= 0.1 and result["preference_gap"] >= 0.15
    assert result["gates_passed"] == expected


def test_config_as_workflow_dict_and_without_recompute(run):
    folder = run["out"] / "checkpoint-2"
    strict = {**run["raw"], "constraints": {"kl_target": 1e-9, "preference_gap_target": 0.0}}
    result = check_quality_gates(folder, strict, recompute=False)  # a yaml.safe_load dict
    assert result["preference_gap"] == recorded(folder)["eval/preference_gap"]
    assert result["gates_passed"] is False and result["checks"]["kl_divergence"]["passed"] is False
    relaxed = {**run["raw"], "constraints": {"kl_target": 10.0, "preference_gap_target": 0.0}}
    assert check_quality_gates(folder, relaxed, recompute=False)["gates_passed"] is True


def test_missing_checkpoint_is_an_input_error(run, tmp_path):
    with pytest.raises(GateInputError, match="not found"):
        check_quality_gates(tmp_path / "nope", run["config"])
    with pytest.raises(GateInputError, match="no training_metrics.json"):
        check_quality_gates(tmp_path, run["config"])


def monitor(*args):
    result = CliRunner().invoke(main, ["monitor", *map(str, args)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def test_monitor_command_exit_codes(run, tmp_path):
    folder = run["out"] / "checkpoint-2"
    relaxed = tmp_path / "relaxed.yaml"
    relaxed.write_text(yaml.safe_dump({**run["raw"], "constraints": {"kl_target": 10.0,
                                                                    "preference_gap_target": 0.0}}))
    result = monitor(folder, "--config", relaxed)
    assert result.exit_code == 0, result.output
    assert "Gates passed:   yes" in result.output and "KL divergence:" in result.output
    strict = tmp_path / "strict.yaml"
    strict.write_text(yaml.safe_dump({**run["raw"], "constraints": {"kl_target": 1e-9}}))
    result = monitor(folder, "--config", strict, "--no-recompute")
    assert result.exit_code == 1 and "Gates passed:   no" in result.output
    assert monitor(tmp_path / "nope").exit_code == 2
    assert monitor().exit_code == 2  # neither a checkpoint nor --watch
    # No --config: the checkpoint's recorded config gives the targets.
    result = monitor(folder, "--no-recompute", "--json")
    assert json.loads(result.output)["kl_target"] == 0.1


def test_watch_prints_each_checkpoint_of_a_finished_run(run):
    lines = []
    result = watch(run["out"], run["config"], recompute=False, interval=0.01, echo=lines.append)
    assert [line.split()[0] for line in lines[:-1]] == ["checkpoint-2", "checkpoint-4"]
    assert lines[-1].startswith("run finished")
    assert result["step"] == 4
    cli = monitor("--watch", run["out"], "--no-recompute", "--interval", 0.01)
    assert cli.exit_code == (0 if result["gates_passed"] else 1), cli.output
    assert cli.output.splitlines() == lines


def fake_checkpoint(out: Path, step: int, kl: float, config: dict) -> None:
    tmp = out / f".tmp-{step}"
    tmp.mkdir(parents=True)
    (tmp / "training_metrics.json").write_text(json.dumps({"step": step, "kl_divergence": kl, "eval/kl": kl,
                                                           "eval/preference_gap": 0.2}))
    (tmp / "state.json").write_text(json.dumps({"step": step, "config": config}))
    tmp.rename(out / f"checkpoint-{step}")  # appears complete, as checkpoint.py writes it


def test_watch_follows_a_running_training(run, tmp_path):
    out = tmp_path / "live"
    out.mkdir()
    lines = []

    def training():
        for step, kl in ((10, 0.05), (20, 0.3)):
            time.sleep(0.2)
            fake_checkpoint(out, step, kl, run["raw"])
        time.sleep(0.2)
        (out / "final").mkdir()

    writer = threading.Thread(target=training)
    writer.start()
    result = watch(out, None, recompute=False, interval=0.02, timeout=10, echo=lines.append)
    writer.join()
    assert [line.split()[0] for line in lines] == ["checkpoint-10", "checkpoint-20", "run"]
    assert "gates PASS" in lines[0] and "kl_divergence 0.3000 (<= 0.1 FAIL)" in lines[1]
    assert result["gates_passed"] is False


def test_watch_gives_up_after_timeout(tmp_path):
    lines = []
    assert watch(tmp_path, None, recompute=False, interval=0.01, timeout=0.05, echo=lines.append) is None
    assert lines == ["no new checkpoint in 0.05 s: stopped watching"]


def test_watch_waits_for_a_missing_folder_then_gives_up_as_bad_input(tmp_path):
    lines = []
    with pytest.raises(UserError, match="never appeared in 0.05 s"):
        watch(tmp_path / "typo", None, recompute=False, interval=0.01, timeout=0.05, echo=lines.append)
    assert lines == [f"waiting for {tmp_path / 'typo'} to appear (the run has not started yet?)"]
    result = monitor("--watch", tmp_path / "typo", "--no-recompute", "--interval", 0.01, "--timeout", 0.05)
    assert result.exit_code == 2, result.output
    assert "waiting for" in result.output and "never appeared" in result.output


def test_watch_of_a_folder_that_appears_late_times_out_normally(tmp_path):
    late, lines = tmp_path / "late", []

    def echo(line):  # the run starts right after the watch says it is waiting
        lines.append(line)
        late.mkdir(exist_ok=True)

    assert watch(late, None, recompute=False, interval=0.01, timeout=0.05, echo=echo) is None
    assert lines == [f"waiting for {late} to appear (the run has not started yet?)",
                     "no new checkpoint in 0.05 s: stopped watching"]


@pytest.mark.parametrize("option, value", [("--interval", "inf"), ("--interval", "nan"), ("--timeout", "nan")])
def test_watch_rejects_non_finite_seconds(tmp_path, option, value):
    result = monitor("--watch", tmp_path, "--no-recompute", "--timeout", 0.05, option, value)
    assert result.exit_code == 2 and f"{option} must be a finite number" in result.output, result.output


def script(name):
    """The workflow script as a module: its main(argv) is what `python scripts/NAME` runs."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_workflow_scripts(run, capsys):
    monitor_training, enforce = script("monitor_training"), script("enforce_quality_gates")
    code = monitor_training([str(run["config"]), str(run["out"] / "checkpoint-4")])
    out = capsys.readouterr().out
    assert code in (0, 1) and "KL Divergence:" in out and "Preference Gap:" in out
    assert ("✅" in out) == (code == 0)
    assert monitor_training([str(run["config"]), str(run["out"] / "missing")]) == 2
    assert enforce(["--kl", "0.08", "--retention", "96.5"]) == 0
    capsys.readouterr()
    assert enforce(["--kl", "0.5", "--retention", "96.5"]) == 1
    assert "evaluation" not in capsys.readouterr().out  # it stops at the failing stage
    assert enforce(["--pairs", "missing.jsonl"]) == 2
    with pytest.raises(SystemExit) as no_input:
        enforce([])
    assert no_input.value.code == 2


def test_scripts_run_standalone():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "enforce_quality_gates.py"), "--kl", "0.08"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and "Result: PASSED" in done.stdout, done.stderr
