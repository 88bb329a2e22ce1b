"""`mlx-dpo data` at its edges: an output that would destroy data is refused before any work,
unusable files exit 2 with `file: reason`, a JSON error names the column in the file's line,
and a UTF-8 BOM (files saved on Windows) is read."""
import codecs
import json

import pytest
from click.testing import CliRunner

from conftest import write_jsonl
from mlx_dpo.cli import main
from mlx_dpo.data.records import RecordError, read_pairs

ROWS = [{"prompt": f"prompt {i}", "chosen": f"good answer {i}", "rejected": f"bad answer {i}"} for i in range(6)]


def run(*args):
    return CliRunner().invoke(main, ["data", *map(str, args)])


def one_line(text):
    """Help text without click's line wrapping."""
    return " ".join(text.split())


@pytest.fixture
def pairs(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", ROWS)


def writer_args(command, tmp_path):
    # A model that does not exist: a refusal must come before the model loads.
    return ["--model", tmp_path / "no-model"] if command == "score" else []


@pytest.mark.parametrize("command", ["clean", "score"])
def test_output_that_is_the_input_is_refused_even_with_force(tmp_path, pairs, command):
    before = pairs.read_bytes()
    link = tmp_path / "link.jsonl"
    link.symlink_to(pairs)  # another name for the same file
    for out in (pairs, link):
        result = run(command, pairs, *writer_args(command, tmp_path), "--out", out, "--force")
        assert result.exit_code == 2 and "would overwrite the input" in result.output, result.output
    assert pairs.read_bytes() == before


@pytest.mark.parametrize("command", ["clean", "score"])
def test_existing_output_needs_force(tmp_path, pairs, command):
    out = tmp_path / "out.jsonl"
    out.write_text("keep me\n")
    result = run(command, pairs, *writer_args(command, tmp_path), "--out", out)
    assert result.exit_code == 2 and f"{out} exists; pass --force to overwrite it" in result.output
    assert out.read_text() == "keep me\n"


def test_clean_checks_its_output_before_any_work(tmp_path, pairs):
    out = tmp_path / "out.jsonl"
    out.write_text("keep me\n")
    # The missing benchmark would fail later; the output is refused first.
    result = run("clean", pairs, "--out", out, "--benchmark", tmp_path / "missing.jsonl")
    assert result.exit_code == 2 and "exists; pass --force" in result.output


def test_force_replaces_an_existing_output(tmp_path, pairs, tiny_model):
    clean_out, score_out = tmp_path / "clean.jsonl", tmp_path / "scores.jsonl"
    clean_out.write_text("old\n")
    score_out.write_text("old\n")
    assert run("clean", pairs, "--out", clean_out, "--force").exit_code == 0
    assert clean_out.read_bytes() == pairs.read_bytes()
    result = run("score", pairs, "--model", tiny_model, "--out", score_out, "--force")
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["line"] for line in open(score_out)] == list(range(1, 7))


@pytest.mark.parametrize("command", ["clean", "score", "split"])
def test_force_is_documented(command):
    assert "--force" in run(command, "--help").output


@pytest.mark.parametrize("command", ["validate", "clean", "split"])
def test_empty_file_exits_2_alike_and_writes_nothing(tmp_path, command):
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    args = ["--out", tmp_path / "out.jsonl"] if command == "clean" else []
    result = run(command, empty, *args)
    assert result.exit_code == 2
    assert f"{empty}: no valid preference pairs (the file is empty)" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl"]


def test_clean_of_only_malformed_records_exits_2(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", ["{oops", "[1]"])
    result = run("clean", bad, "--out", tmp_path / "out.jsonl")
    assert result.exit_code == 2 and "no valid preference pairs; all 2 record(s) are malformed" in result.output
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("command", ["validate", "clean", "split", "score"])
def test_file_errors_name_the_file_without_a_line(tmp_path, command):
    missing = tmp_path / "d" / "nope.jsonl"
    args = ["--out", tmp_path / "out.jsonl"] if command in ("clean", "score") else []
    if command == "score":
        args += ["--model", tmp_path / "no-model"]  # the pairs are read before the model loads
    result = run(command, missing, *args)
    assert result.exit_code == 2 and f"{missing}: cannot open: No such file or directory" in result.output
    assert ":0:" not in result.output


def test_record_error_wording():
    assert str(RecordError("p.jsonl", 0, "cannot open")) == "p.jsonl: cannot open"
    assert str(RecordError("p.jsonl", 3, "not valid JSON")) == "p.jsonl:3: not valid JSON"


def test_json_error_gives_the_files_line_and_the_column_in_it(tmp_path):
    missing_comma = '{"prompt": "x", "chosen": "y" "rejected": "z"}'
    unclosed = '{"prompt": "x", "chosen": "y", "rejected": "z"'
    path = write_jsonl(tmp_path / "malformed.jsonl", [json.dumps(r) for r in ROWS] + [missing_comma, unclosed])
    stopped = run("split", path)
    assert stopped.exit_code == 2
    assert f"{path}:7: not valid JSON: Expecting ',' delimiter at column 31" in stopped.output
    skipped = json.loads(run("split", path, "--skip-bad", "--json").output)["skipped"]
    assert skipped == [
        {"line": 7, "reason": "not valid JSON: Expecting ',' delimiter at column 31"},
        {"line": 8, "reason": f"not valid JSON: Expecting ',' delimiter at column {len(unclosed) + 1}"}]


def test_utf8_bom_is_read_by_every_reader(tmp_path, pairs):
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(codecs.BOM_UTF8 + pairs.read_bytes())
    bench = tmp_path / "bench.jsonl"
    bench.write_bytes(codecs.BOM_UTF8 + json.dumps({"text": "nothing like the pairs"}).encode() + b"\n")

    training = read_pairs(bom)  # the reader training uses
    assert len(training.pairs) == 6 and training.bad == []
    report = json.loads(run("validate", bom, "--benchmark", bench, "--min-pairs", 1, "--json").output)
    assert report["total_pairs"] == 6 and report["bad_records"] == []
    cleaned = run("clean", bom, "--out", tmp_path / "clean.jsonl")
    assert cleaned.exit_code == 0 and "6 records read, 6 kept" in cleaned.output, cleaned.output
    split = json.loads(run("split", bom, "--json").output)
    assert split["skipped"] == [] and split["train"]["pairs"] + split["validation"]["pairs"] == 6


def test_split_help_describes_outputs_and_fraction_range():
    text = one_line(run("split", "--help").output)
    assert "--train-out FILE Where the training pairs go." in text
    assert "--val-out FILE Where the validation pairs go." in text
    assert "between 0 and 1 (both excluded)" in text
