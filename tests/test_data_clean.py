"""`data clean`: what is removed, what is kept (byte for byte), and the conflict policies."""
import json

from click.testing import CliRunner

from conftest import write_jsonl
from mlx_dpo.cli import main
from mlx_dpo.data.clean import clean_pairs

LEAK = " ".join(f"word{i}" for i in range(20))


def pair(p, c, r, **extra):
    return json.dumps({"prompt": p, "chosen": c, "rejected": r, **extra})


LINES = [
    pair("p1", "A", "B", score_chosen=9),   # 1 kept (keep-first) / conflict
    pair("p2", "good", "bad"),             # 2 kept
    "{broken",                             # 3 malformed
    pair("p1", "B", "A"),                  # 4 contradicts line 1
    pair("p2", "good", "bad"),             # 5 exact duplicate of 2
    pair("p3", "same", "same"),            # 6 chosen == rejected
    pair("p4", "x " + LEAK, "y"),          # 7 contaminated (only with a benchmark)
    pair("p5", "fine", "poor"),            # 8 kept
]


def test_drop_policy_removes_everything_it_should(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", LINES)
    result = clean_pairs(source, tmp_path / "out.jsonl")
    assert open(tmp_path / "out.jsonl").read().splitlines() == [LINES[1], LINES[6], LINES[7]]
    assert result.to_dict()["removed"] == {"malformed": 1, "chosen_equals_rejected": 1, "duplicates": 1,
                                           "conflicts": 2, "contaminated": 0}
    assert (result.read, result.kept, result.duplicates, result.conflicts) == (8, 3, [5], [1, 4])


def test_keep_first_and_benchmarks(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", LINES)
    bench = write_jsonl(tmp_path / "bench.jsonl", [{"text": LEAK}])
    result = clean_pairs(source, tmp_path / "out.jsonl", conflicts="keep-first", benchmarks=[str(bench)])
    # Line 1 keeps its extra field and exact bytes.
    assert open(tmp_path / "out.jsonl").read().splitlines() == [LINES[0], LINES[1], LINES[7]]
    assert (result.conflicts, result.contaminated) == ([4], [7])


def test_clean_cli(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", LINES)
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(main, ["data", "clean", str(source), "--out", str(out), "--conflicts", "majority"])
    assert result.exit_code == 0, result.output
    assert "8 records read, 3 kept" in result.output and "removed      2 conflicts" in result.output
    assert open(out).read().splitlines() == [LINES[1], LINES[6], LINES[7]]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_cli_json_and_missing_input(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", LINES)
    result = CliRunner().invoke(main, ["data", "clean", str(source), "--out", str(tmp_path / "o.jsonl"), "--json"])
    report = json.loads(result.output)
    assert report["malformed"][0]["line"] == 3 and report["conflict_lines"] == [1, 4]
    missing = CliRunner().invoke(main, ["data", "clean", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")])
    assert missing.exit_code == 2 and "cannot open" in missing.output
