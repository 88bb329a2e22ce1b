"""Preference records: read JSONL, check the schema, report bad lines with file:line.

Two forms are accepted, as TRL accepts them:
  standard        {"prompt": str, "chosen": str, "rejected": str}
  conversational  {"prompt": [{"role", "content"}, ...], "chosen": [{"role": "assistant", ...}],
                   "rejected": [{"role": "assistant", ...}]}
Any other keys (scores, ids, sources) are kept in `extra` and ignored by training.
"""
from __future__ import annotations

import codecs
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Union

from ..errors import UserError

Text = Union[str, list]  # a string, or a list of chat messages
ROLES = ("system", "user", "assistant", "tool")


class RecordError(UserError):
    """A malformed record; `str()` reads `file:line: reason`, or `file: reason` for line 0 (the
    file as a whole: missing, empty). `kind` is one of io, utf8, json, schema, empty, identical,
    for tools that treat some kinds differently."""

    def __init__(self, path: str, line: int, reason: str, kind: str = "schema"):
        super().__init__(f"{path}:{line}: {reason}" if line else f"{path}: {reason}")
        self.path, self.line, self.reason, self.kind = path, line, reason, kind


@dataclass
class Pair:
    prompt: Text
    chosen: Text
    rejected: Text
    line: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


@dataclass
class ReadResult:
    pairs: list[Pair]
    bad: list[RecordError]  # skipped records (only with on_bad="skip")
    path: str


def read_pairs(path: str | Path, on_bad: str = "error") -> ReadResult:
    """Read every record; raise the first RecordError, or with on_bad="skip" collect them."""
    pairs, bad = [], []
    for err_or_pair in iter_records(path):
        if isinstance(err_or_pair, RecordError):
            if on_bad != "skip":
                raise err_or_pair
            bad.append(err_or_pair)
        else:
            pairs.append(err_or_pair)
    if not pairs:
        raise no_valid_pairs(path, bad)
    return ReadResult(pairs, bad, str(path))


def no_valid_pairs(path, bad: list) -> RecordError:
    """The error for a file without one valid pair, worded alike by every data command;
    `bad` holds the malformed records that were read."""
    detail = f"; all {len(bad)} record(s) are malformed, first: {bad[0]}" if bad else " (the file is empty)"
    return RecordError(str(path), 0, f"no valid preference pairs{detail}")


def iter_records(path: str | Path) -> Iterator[Union[Pair, RecordError]]:
    """Yield a Pair or a RecordError per non-blank line; never raises for bad content."""
    name = str(path)
    try:
        handle = open(path, "rb")
    except OSError as err:
        raise RecordError(name, 0, f"cannot open: {err.strerror or err}", "io") from None
    with handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)  # files saved on Windows often start with one
            if not raw.strip():
                continue
            try:
                yield parse_record(raw, name, number)
            except RecordError as err:
                yield err


def parse_record(raw: bytes, path: str = "<record>", line: int = 0) -> Pair:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RecordError(path, line, f"not valid UTF-8 (byte {err.start})", "utf8") from None
    try:
        # Without its line break the text is one line, so json's column is the column in the file's line.
        obj = json.loads(text.rstrip("\r\n"))
    except json.JSONDecodeError as err:
        raise RecordError(path, line, f"not valid JSON: {err.msg} at column {err.colno}", "json") from None
    except (RecursionError, ValueError) as err:
        raise RecordError(path, line, f"not valid JSON: {str(err)[:120]}", "json") from None
    if not isinstance(obj, dict):
        raise RecordError(path, line, f"expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in obj]
    if missing:
        raise RecordError(path, line, f"missing field(s) {', '.join(missing)}; "
                                      "each record needs prompt, chosen and rejected")
    reason = _schema_problem(obj)
    if reason:
        raise RecordError(path, line, reason)
    if not completion_text(obj["chosen"]).strip() or not completion_text(obj["rejected"]).strip():
        raise RecordError(path, line, "empty completion: chosen and rejected must both hold text", "empty")
    if obj["chosen"] == obj["rejected"]:
        raise RecordError(path, line, "chosen is identical to rejected: the pair carries no preference",
                          "identical")
    extra = {k: v for k, v in obj.items() if k not in ("prompt", "chosen", "rejected")}
    return Pair(obj["prompt"], obj["chosen"], obj["rejected"], line, extra)


def _schema_problem(obj: dict) -> str | None:
    prompt = obj["prompt"]
    if isinstance(prompt, str):
        for key in ("chosen", "rejected"):
            if not isinstance(obj[key], str):
                return f"field {key!r} must be a string when prompt is a string, got {_kind(obj[key])}"
    elif isinstance(prompt, list):
        problem = _messages_problem("prompt", prompt, allow_empty=False)
        for key in ("chosen", "rejected"):
            problem = problem or _messages_problem(key, obj[key], allow_empty=False, assistant=True)
        if problem:
            return problem
    else:
        return f"field 'prompt' must be a string or a list of chat messages, got {_kind(prompt)}"
    for key in ("prompt", "chosen", "rejected"):
        if not _valid_unicode(obj[key]):
            return f"field {key!r} holds text that is not valid Unicode (a lone surrogate)"
    return None


def _messages_problem(key: str, messages, allow_empty: bool, assistant: bool = False) -> str | None:
    if not isinstance(messages, list):
        return f"field {key!r} must be a list of chat messages, got {_kind(messages)}"
    if not messages and not allow_empty:
        return f"field {key!r} is an empty message list"
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("content"), str) \
                or msg.get("role") not in ROLES:
            return (f"field {key!r} message {i} must be {{\"role\": one of {'/'.join(ROLES)}, "
                    f"\"content\": string}}")
        if assistant and msg["role"] != "assistant":
            return f"field {key!r} message {i} must have role 'assistant', got {msg['role']!r}"
    return None


def completion_text(value: Text) -> str:
    """The text of a completion: the string, or its messages' contents joined."""
    if isinstance(value, str):
        return value
    return "\n".join(m["content"] for m in value)


def prompt_text(value: Text) -> str:
    return completion_text(value)


def _valid_unicode(value: Text) -> bool:
    try:
        (value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)).encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _kind(value) -> str:
    return "null" if value is None else type(value).__name__
