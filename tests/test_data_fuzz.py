"""Robustness: 10,000 random and malformed records never raise, and every rejected record is
reported with its line. The generator knows which records it broke, so the report is checked
against that, not against the parser's own opinion."""
import json
import random

from hypothesis import given, settings, strategies as st

from conftest import write_jsonl
from mlx_dpo.data.clean import clean_pairs
from mlx_dpo.data.quality import validate_dpo_pairs
from mlx_dpo.data.split import split_pairs

ODD = ["é", "ß", "ﬁ", "Ｓ", "\u0301", "\u200b", "\u202e", "\u2028", "\u0000", "😀", "👩‍💻", "中文", "עברית", "\t", "\\",
       '"', "\ufeff", "\U0010ffff"]


def odd_text(rng, max_words=12):
    words = []
    for _ in range(rng.randint(1, max_words)):
        word = "".join(rng.choice(ODD) if rng.random() < 0.3 else rng.choice("abcxyz")
                       for _ in range(rng.randint(1, 6)))
        words.append(word)
    return "w " + " ".join(words)  # "w" keeps every text non-blank


def good_record(rng, i):
    kind = rng.randrange(4)
    if kind == 0:
        return {"prompt": odd_text(rng), "chosen": f"c{i} " + odd_text(rng), "rejected": f"r{i} " + odd_text(rng)}
    if kind == 1:
        return {"prompt": [{"role": "system", "content": odd_text(rng)}, {"role": "user", "content": odd_text(rng)}],
                "chosen": [{"role": "assistant", "content": f"c{i} " + odd_text(rng)}],
                "rejected": [{"role": "assistant", "content": f"r{i}"}]}
    weird = rng.choice([float("nan"), float("inf"), "9", True, None, [1], {"a": 1}, 10 ** 400, -3, 4.5])
    return {"prompt": odd_text(rng), "chosen": f"c{i}", "rejected": f"r{i}",
            "score_chosen": weird, "score_rejected": rng.choice([1, 2.5, "x", float("-inf")]), "meta": {"n": i}}


def bad_line(rng, i) -> bytes:
    kind = rng.randrange(12)
    valid = json.dumps(good_record(rng, i))
    if kind == 0:
        return valid[: rng.randrange(1, len(valid) - 1)].encode()         # truncated JSON
    if kind == 1:
        return b"\xff\xfe" + bytes(rng.randrange(256) for _ in range(20)).replace(b"\n", b"")  # not UTF-8
    if kind == 2:
        return json.dumps(rng.choice([[1, 2], 3, "text", None, True])).encode()
    if kind == 3:
        rec = good_record(rng, i)
        del rec[rng.choice(["prompt", "chosen", "rejected"])]
        return json.dumps(rec).encode()
    if kind == 4:
        return json.dumps({"prompt": "p", "chosen": rng.choice([1, None, {"x": 1}, 2.5]), "rejected": "r"}).encode()
    if kind == 5:
        return json.dumps({"prompt": [{"role": "user", "content": "q"}],
                           "chosen": [{"role": rng.choice(["user", "bot", None]), "content": "a"}],
                           "rejected": [{"role": "assistant", "content": "b"}]}).encode()
    if kind == 6:
        return json.dumps({"prompt": "p", "chosen": rng.choice(["", "  ", "\n"]), "rejected": "r"}).encode()
    if kind == 7:
        return json.dumps({"prompt": odd_text(rng), "chosen": "same", "rejected": "same"}).encode()
    if kind == 8:
        return b'{"prompt": "\\ud800", "chosen": "a", "rejected": "b"}'      # lone surrogate
    if kind == 9:
        return b"[" * 50000                                                  # nesting past the recursion limit
    if kind == 10:
        return b'{"prompt": "p", "chosen": "a", "rejected": "b", "n": ' + b"9" * 5000 + b"}"  # huge int literal
    return json.dumps({"prompt": 12, "chosen": "a", "rejected": "b"}).encode()


def test_ten_thousand_random_and_malformed_records(tmp_path):
    rng = random.Random(1234)
    lines, bad, good = [], set(), 0
    for i in range(10_000):
        if rng.random() < 0.02:
            lines.append(rng.choice([b"", b"   "]))
            continue
        if rng.random() < 0.4:
            lines.append(bad_line(rng, i))
            bad.add(len(lines))
        else:
            record = good_record(rng, i)
            if i % 4000 == 1:
                record = {"prompt": "p", "chosen": "huge " + "é" * 1_000_000, "rejected": f"r{i}"}
            lines.append(json.dumps(record, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass"))
            good += 1
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(b"\n".join(lines))
    bench = write_jsonl(tmp_path / "bench.jsonl", [{"text": "w " + " ".join(ODD * 3)}])

    report = validate_dpo_pairs(path, benchmarks=[str(bench)], ngram=3)
    assert report.total_pairs == good
    assert {e.line for e in report.bad_records} == bad
    assert all(str(e).startswith(f"{path}:{e.line}: ") and e.reason for e in report.bad_records)
    assert 0.0 <= report.decontamination <= 1.0 and set(report.gates) >= {"pairs", "preference_gap"}
    json.dumps(report.to_dict())  # the --json report can always be written

    cleaned = clean_pairs(path, tmp_path / "clean.jsonl")
    assert {e.line for e in cleaned.malformed} == bad and cleaned.kept <= good
    split = split_pairs(path, 0.2, on_bad="skip")
    assert split.train_pairs + split.val_pairs == good and {e.line for e in split.skipped} == bad


@settings(max_examples=80, deadline=None)
@given(st.lists(st.binary(max_size=200), min_size=1, max_size=20))
def test_arbitrary_bytes_never_raise(tmp_path_factory, blobs):
    path = tmp_path_factory.mktemp("fuzz") / "bytes.jsonl"
    path.write_bytes(b"\n".join(blobs))
    nonblank = sum(1 for line in path.read_bytes().split(b"\n") if line.strip())
    try:
        report = validate_dpo_pairs(path, benchmarks=[])
    except Exception as err:  # only the documented "nothing usable" error may escape
        assert "no valid preference pairs" in str(err)
        return
    assert report.total_pairs + len(report.bad_records) == nonblank
