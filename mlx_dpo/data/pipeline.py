"""From the config's data section to encoded pairs, with a report of what was skipped or cut."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..config import Config
from .records import ReadResult, read_pairs
from .tokenize import EncodedData, PairEncoder, encode_pairs


@dataclass
class PreparedData:
    train: EncodedData
    val: Optional[EncodedData]
    messages: list[str]  # one line per file: pairs read, skipped, truncated


def make_encoder(cfg: Config, tokenizer) -> PairEncoder:
    d = cfg.data
    return PairEncoder(tokenizer, d.max_prompt_length, d.max_response_length, d.chat_template)


@dataclass
class RawData:
    """Records read and schema-checked: done before any model loads, so a bad line fails fast."""
    train: ReadResult
    val: Optional[ReadResult]


def read_data(cfg: Config) -> RawData:
    val = read_pairs(cfg.data.validation_file, cfg.data.on_bad_record) if cfg.data.validation_file else None
    return RawData(read_pairs(cfg.data.train_file, cfg.data.on_bad_record), val)


def prepare_data(cfg: Config, tokenizer, raw: Optional[RawData] = None) -> PreparedData:
    raw = raw or read_data(cfg)
    encoder = make_encoder(cfg, tokenizer)
    messages = []

    def encode(result: ReadResult, limit: int = 0) -> EncodedData:
        pairs = result.pairs[:limit] if limit else result.pairs
        data = encode_pairs(pairs, encoder)
        line = f"{result.path}: {len(pairs)} pairs"
        if result.bad:
            first = result.bad[0]
            line += f", {len(result.bad)} bad records skipped (first: line {first.line}: {first.reason})"
        line += f", {data.truncated} truncated to fit max_prompt_length/max_response_length"
        messages.append(line)
        return data

    train = encode(raw.train)
    val = encode(raw.val, cfg.data.max_eval_pairs) if raw.val else None
    return PreparedData(train, val, messages)
