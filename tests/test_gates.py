"""`mlx-dpo gates STAGE` and `enforce_gates`: each stage's pass, fail and bad-input paths."""
import json

import pytest
import yaml
from click.testing import CliRunner

from conftest import write_jsonl
from mlx_dpo.cli import main
from mlx_dpo.gates import GateInputError, enforce_gates, judge
from mlx_dpo import eval_report

BENCH_TEXT = "compute the largest prime factor of an integer greater than one and return it to the caller now"


def pairs(n, scores=(8.0, 3.0)):
    return [{"prompt": f"question number {i} about the garden", "chosen": f"a careful answer {i}",
             "rejected": f"no idea {i}", "score_chosen": scores[0], "score_rejected": scores[1]}
            for i in range(n)]


def gates(*args):
    result = CliRunner().invoke(main, ["gates", *map(str, args)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def rows(output):
    """{gate name: (value text, status)} from the printed table."""
    out = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[2] == "target":
            status = parts[5] if parts[3] != "-" else parts[4]
            out[parts[0]] = (parts[1], status)
    return out


@pytest.fixture
def bench(tmp_path):
    return write_jsonl(tmp_path / "bench.jsonl", [{"task_id": "B/0", "prompt": BENCH_TEXT}])


@pytest.fixture
def checkpoint(tmp_path):
    def make(metrics, name="checkpoint-10"):
        folder = tmp_path / "run" / name
        folder.mkdir(parents=True)
        (folder / "training_metrics.json").write_text(json.dumps(metrics))
        return folder
    return make


# -- preference_data (stage 2) ------------------------------------------------------------
def test_preference_data_pass_lists_every_gate(tmp_path, bench):
    path = write_jsonl(tmp_path / "p.jsonl", pairs(1000))
    result = gates("preference_data", "--pairs", path, "--benchmark", bench)
    assert result.exit_code == 0, result.output
    table = rows(result.output)
    assert table["pairs"] == ("1000", "PASS")
    assert table["preference_gap"] == ("0.5556", "PASS")  # (8 - 3) / (10 - 1)
    assert table["decontamination"] == ("1", "PASS")
    assert "Result: PASSED" in result.output


def test_preference_data_fail_exit_1(tmp_path, bench):
    path = write_jsonl(tmp_path / "p.jsonl", pairs(1000, scores=(5.0, 4.0)) + [
        {"prompt": BENCH_TEXT, "chosen": "yes", "rejected": "no"}])
    result = gates("preference_data", "--pairs", path, "--benchmark", bench)
    assert result.exit_code == 1, result.output
    table = rows(result.output)
    assert table["preference_gap"][1] == "FAIL"  # 1/9 < 0.15
    assert table["decontamination"] == ("0.999", "PASS")  # 1 of 1001 contaminated: still >= 0.9
    assert "Result: FAILED (preference_gap)" in result.output


def test_preference_data_target_from_config(tmp_path, bench, tiny_model):
    path = write_jsonl(tmp_path / "p.jsonl", pairs(1000, scores=(5.0, 4.0)))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": {"base_model": str(tiny_model)}, "data": {"train_file": str(path)},
                                      "constraints": {"preference_gap_target": 0.1}}))
    result = gates("preference_data", "--pairs", path, "--benchmark", bench, "--config", config)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("args, message", [
    ([], "needs dpo_pairs_path (--pairs)"),
    (["--pairs", "missing.jsonl"], "not found"),
    (["--kl", "0.1"], "belong to another stage"),
])
def test_preference_data_bad_input_exit_2(args, message):
    result = gates("preference_data", *args)
    assert result.exit_code == 2 and message in result.output, result.output


# -- dpo_training (stage 5) ---------------------------------------------------------------
@pytest.mark.parametrize("kl, code", [(0.05, 0), (0.1, 0), (0.5, 1)])
def test_dpo_training_kl_by_hand(kl, code):
    result = gates("dpo_training", "--kl", kl)
    assert result.exit_code == code, result.output
    assert rows(result.output)["kl_divergence"][1] == ("PASS" if code == 0 else "FAIL")


def test_dpo_training_kl_target_from_config(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": {"base_model": "m"}, "data": {"train_file": "t.jsonl"},
                                      "constraints": {"kl_target": 0.6}}))
    assert gates("dpo_training", "--kl", 0.5, "--config", config).exit_code == 0


@pytest.mark.parametrize("metrics, code, failed", [
    ({"step": 10, "kl_divergence": 0.05, "eval/kl": 0.05, "eval/preference_gap": 0.3}, 0, []),
    ({"step": 10, "kl_divergence": 0.05, "eval/kl": 0.05, "eval/preference_gap": 0.1}, 1, ["preference_gap"]),
    ({"step": 10, "kl_divergence": 0.2, "eval/kl": 0.2, "eval/preference_gap": 0.3}, 1, ["kl_divergence"]),
    ({"step": 10, "kl_divergence": None}, 1, ["kl_divergence", "preference_gap"]),  # no validation file
])
def test_dpo_training_checkpoint(checkpoint, metrics, code, failed):
    result = gates("dpo_training", "--checkpoint", checkpoint(metrics), "--json")
    assert result.exit_code == code, result.output
    report = json.loads(result.output)
    assert report["passed"] == (code == 0)
    assert [n for n, g in report["gates"].items() if not g["passed"]] == failed


def test_dpo_training_bad_input_exit_2(tmp_path, checkpoint):
    assert "needs a checkpoint" in gates("dpo_training").output
    assert gates("dpo_training").exit_code == 2
    assert gates("dpo_training", "--checkpoint", tmp_path / "nope").exit_code == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    result = gates("dpo_training", "--checkpoint", empty)
    assert result.exit_code == 2 and "no training_metrics.json" in result.output
    broken = checkpoint({}, name="checkpoint-2")
    (broken / "training_metrics.json").write_text("{not json")
    assert gates("dpo_training", "--checkpoint", broken).exit_code == 2


def test_dpo_training_checkpoint_and_kl_by_hand_conflict(checkpoint):
    # The checkpoint supplies its measured KL: a KL by hand next to it used to be ignored silently.
    folder = checkpoint({"step": 10, "kl_divergence": 0.05, "eval/preference_gap": 0.3})
    result = gates("dpo_training", "--checkpoint", folder, "--kl", 5)
    assert result.exit_code == 2 and "--checkpoint or --kl, not both" in result.output, result.output


@pytest.mark.parametrize("stage, option, value", [
    ("dpo_training", "--kl", "-1"), ("dpo_training", "--kl", "nan"), ("dpo_training", "--kl", "inf"),
    ("evaluation", "--retention", "-5"), ("evaluation", "--retention", "nan"),
    ("evaluation", "--retention", "inf"),
])
def test_impossible_value_by_hand_is_bad_input(stage, option, value):
    """A negative, NaN or infinite value cannot be measured: bad input (2), not PASS or FAIL."""
    result = gates(stage, option, value)
    assert result.exit_code == 2, result.output
    key = {"--kl": "kl_divergence", "--retention": "capability_retention"}[option]
    allowed = eval_report.RANGES[key][2]  # the same range and words as an evaluation report's
    assert f"({option}) must be {allowed}" in result.output
    assert f"got {float(value)!r}" in result.output


@pytest.mark.parametrize("stage, option, value, code", [
    ("dpo_training", "--kl", 0, 0), ("evaluation", "--retention", 0, 1),
    ("evaluation", "--retention", 103.5, 0),  # above the SFT baseline
])
def test_edge_values_by_hand_are_judged(stage, option, value, code):
    assert gates(stage, option, value).exit_code == code


# -- evaluation (stage 7) -----------------------------------------------------------------
@pytest.mark.parametrize("retention, code", [(96.5, 0), (95.0, 0), (90.0, 1)])
def test_evaluation_retention_by_hand(retention, code):
    assert gates("evaluation", "--retention", retention).exit_code == code


def test_evaluation_report_computes_retention_as_mean_ratio(tmp_path):
    report = tmp_path / "r.json"
    # retention = mean(0.44 / 0.45, 0.20 / 0.20) * 100 = (97.78 + 100) / 2 = 98.89
    report.write_text(json.dumps({"benchmarks": {"mmlu": {"baseline": 0.45, "final": 0.44},
                                                 "gsm8k": {"baseline": 0.2, "final": 0.2}},
                                  "win_rate": 57.0, "kl_divergence": 0.08}))
    result = gates("evaluation", "--report", report, "--json")
    assert result.exit_code == 0, result.output
    got = json.loads(result.output)["gates"]
    assert got["capability_retention"]["value"] == pytest.approx(98.888, abs=1e-3)
    assert got["retention/mmlu"]["value"] == pytest.approx(97.778, abs=1e-3)
    assert got["win_rate"]["passed"] and got["kl_divergence"]["passed"]


def test_evaluation_report_failures(tmp_path):
    report = tmp_path / "r.json"
    report.write_text(json.dumps({"capability_retention": 96.0, "win_rate": 50.0, "preference_gap": 0.1}))
    result = gates("evaluation", "--report", report)
    assert result.exit_code == 1
    table = rows(result.output)
    assert table["capability_retention"][1] == "PASS"
    assert table["win_rate"][1] == "FAIL"  # must exceed 50 %, a tie is not a win
    assert table["preference_gap"][1] == "FAIL"


@pytest.mark.parametrize("content, message", [
    ({"retention": 96}, "unknown key(s) retention"),
    ({"capability_retention": "high"}, "capability_retention must be a finite number"),
    ({"benchmarks": {"mmlu": {"baseline": 0, "final": 0.4}}}, "benchmarks.mmlu.baseline must be > 0"),
    ({"benchmarks": {"mmlu": {"final": 0.4}}}, "exactly baseline and final"),
    ({"win_rate": 60}, "needs capability_retention"),
    ([1, 2], "expected a JSON object"),
    ({"capability_retention": 97, "win_rate": 150}, "win_rate must be a percentage in [0, 100], got 150"),
    ({"capability_retention": 97, "kl_divergence": -1}, "kl_divergence must be a KL divergence >= 0"),
    ({"capability_retention": 97, "decontamination": 1.7}, "decontamination must be a share in [0, 1]"),
    ({"capability_retention": 97, "preference_gap": -0.2}, "preference_gap must be a gap in [0, 1]"),
    ({"capability_retention": -3}, "capability_retention must be a percentage >= 0"),
])
def test_evaluation_bad_report_exit_2(tmp_path, content, message):
    report = tmp_path / "r.json"
    report.write_text(json.dumps(content))
    result = gates("evaluation", "--report", report)
    assert result.exit_code == 2 and message in result.output, result.output


def test_evaluation_bad_input_exit_2(tmp_path):
    assert gates("evaluation").exit_code == 2
    assert gates("evaluation", "--report", tmp_path / "missing.json").exit_code == 2
    report = tmp_path / "r.json"
    report.write_text(json.dumps({"capability_retention": 96.0}))
    result = gates("evaluation", "--retention", 96, "--report", report)
    assert result.exit_code == 2 and "not both" in result.output


def test_unknown_stage_lists_stages():
    result = gates("reward_model", "--kl", 0.1)
    assert result.exit_code == 2
    assert "preference_data, dpo_training, evaluation" in result.output


# -- Python API ---------------------------------------------------------------------------
def test_enforce_gates_api_returns_bool_and_prints():
    lines = []
    assert enforce_gates("dpo_training", kl_divergence=0.08, echo=lines.append) is True
    assert any("kl_divergence" in line and "PASS" in line for line in lines)
    assert enforce_gates("evaluation", capability_retention=94.9, echo=lines.append) is False
    assert enforce_gates("dpo_training", kl_divergence=0.05, config={"constraints": {"kl_target": 0.01},
                                                                     "model": {"base_model": "m"},
                                                                     "data": {"train_file": "t"}},
                         echo=lines.append) is False
    with pytest.raises(GateInputError, match="unknown stage"):
        enforce_gates("sft", echo=lines.append)
    with pytest.raises(GateInputError, match="needs"):
        enforce_gates("evaluation", echo=lines.append)
    with pytest.raises(GateInputError, match="must be a KL divergence"):
        enforce_gates("dpo_training", kl_divergence=-0.1, echo=lines.append)
    with pytest.raises(GateInputError, match="must be a percentage"):
        enforce_gates("evaluation", capability_retention=float("nan"), echo=lines.append)


def test_judge_treats_nan_as_unmeasured():
    check = judge("kl_divergence", float("nan"), 0.1, "<=")
    assert not check.passed and check.value is None and check.detail == "not measured"
    assert judge("win_rate", 50.0, 50.0, ">").passed is False
    assert judge("win_rate", 50.1, 50.0, ">").passed is True
