"""`data split`: deterministic by prompt hash, no prompt in both splits, raw lines copied."""
import json

import pytest
from click.testing import CliRunner

from conftest import write_jsonl
from mlx_dpo.cli import main
from mlx_dpo.data.records import RecordError
from mlx_dpo.data.split import split_pairs
from mlx_dpo.errors import UserError


def rows(n_prompts, per_prompt=3):
    return [{"prompt": f"prompt {p}", "chosen": f"good {p}.{k}", "rejected": f"bad {p}.{k}", "id": f"{p}.{k}"}
            for p in range(n_prompts) for k in range(per_prompt)]


def read(path):
    return [json.loads(line) for line in open(path)]


def test_no_prompt_in_both_and_every_pair_somewhere(tmp_path):
    source = write_jsonl(tmp_path / "pairs.jsonl", rows(300))
    result = split_pairs(source, 0.2, seed=1)
    train, val = read(result.train_path), read(result.val_path)
    assert {r["prompt"] for r in train}.isdisjoint({r["prompt"] for r in val})
    assert sorted(r["id"] for r in train + val) == sorted(r["id"] for r in rows(300))
    assert (result.train_pairs, result.val_pairs) == (len(train), len(val))
    assert result.train_prompts + result.val_prompts == 300
    # 300 prompts, p = 0.2: the validation share is binomial, sd = sqrt(300 * 0.2 * 0.8) = 6.9 prompts.
    assert 0.12 < result.val_prompts / 300 < 0.28


def test_same_seed_same_files_other_seed_other_split(tmp_path):
    source = write_jsonl(tmp_path / "pairs.jsonl", rows(100))
    a = split_pairs(source, 0.3, seed=7, train_out=tmp_path / "a_t.jsonl", val_out=tmp_path / "a_v.jsonl")
    b = split_pairs(source, 0.3, seed=7, train_out=tmp_path / "b_t.jsonl", val_out=tmp_path / "b_v.jsonl")
    c = split_pairs(source, 0.3, seed=8, train_out=tmp_path / "c_t.jsonl", val_out=tmp_path / "c_v.jsonl")
    assert open(a.val_path, "rb").read() == open(b.val_path, "rb").read()
    assert open(a.val_path, "rb").read() != open(c.val_path, "rb").read()


def test_adding_data_keeps_old_prompts_where_they_were(tmp_path):
    small = split_pairs(write_jsonl(tmp_path / "s.jsonl", rows(50)), 0.2, seed=3)
    big = split_pairs(write_jsonl(tmp_path / "b.jsonl", rows(150)), 0.2, seed=3)
    old_val = {r["prompt"] for r in read(small.val_path)}
    assert old_val == {r["prompt"] for r in read(big.val_path) if int(r["prompt"].split()[1]) < 50}


def test_lines_are_copied_byte_for_byte(tmp_path):
    line = '{"rejected": "b",  "prompt": "p \\u00e9", "chosen": "a", "meta": {"k": [1, 2]}}'
    source = tmp_path / "pairs.jsonl"
    source.write_text(line + "\n\n" + line.replace("p \\u00e9", "q"))  # blank line, no final newline
    result = split_pairs(source, 0.5, seed=0)
    copied = open(result.train_path).read() + open(result.val_path).read()
    assert sorted(copied.splitlines()) == sorted([line, line.replace("p \\u00e9", "q")])


def test_bad_records_stop_or_are_skipped(tmp_path):
    source = write_jsonl(tmp_path / "pairs.jsonl", [json.dumps(r) for r in rows(5)] + ["{nope"])
    with pytest.raises(RecordError, match=r"pairs\.jsonl:16: not valid JSON"):
        split_pairs(source, 0.2)
    assert not (tmp_path / "pairs_train.jsonl").exists()  # nothing half-written
    result = split_pairs(source, 0.2, on_bad="skip")
    assert [e.line for e in result.skipped] == [16] and result.train_pairs + result.val_pairs == 15


def test_outputs_are_protected(tmp_path):
    source = write_jsonl(tmp_path / "pairs.jsonl", rows(5))
    split_pairs(source, 0.2)
    with pytest.raises(UserError, match="exists; pass --force"):
        split_pairs(source, 0.2)
    split_pairs(source, 0.2, overwrite=True)
    with pytest.raises(UserError, match="overwrite the input"):
        split_pairs(source, 0.2, train_out=source, overwrite=True)
    with pytest.raises(UserError, match="between 0 and 1"):
        split_pairs(source, 1.0)


def test_cli_reports_counts(tmp_path):
    source = write_jsonl(tmp_path / "pairs.jsonl", rows(40, per_prompt=2))
    result = CliRunner().invoke(main, ["data", "split", str(source), "--val-fraction", "0.25", "--seed", "2",
                                       "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["train"]["pairs"] + report["validation"]["pairs"] == 80
    assert report["validation"]["pairs"] == 2 * report["validation"]["prompts"]
    again = CliRunner().invoke(main, ["data", "split", str(source)])
    assert again.exit_code == 2 and "exists; pass --force" in again.output
    text = CliRunner().invoke(main, ["data", "split", str(source), "--force", "--seed", "2",
                                     "--val-fraction", "0.25"]).output
    assert f"validation: {report['validation']['pairs']} pairs" in text
