"""From the config's data section to encoded pairs, with a report of what was skipped or cut."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..config import Config
from .records import read_pairs
from .tokenize import EncodedData, PairEncoder, encode_pairs


@dataclass
class PreparedData:
    train: EncodedData
    val: Optional[EncodedData]
    messages: list[str]  # one line per file: pairs read, skipped, truncated


def make_encoder(cfg: Config, tokenizer) -> PairEncoder:
    d = cfg.data
    return PairEncoder(tokenizer, d.max_prompt_length, d.max_response_length, d.chat_template)


def prepare_data(cfg: Config, tokenizer) -> PreparedData:
    encoder = make_encoder(cfg, tokenizer)
    messages = []

    def load(path: str, limit: int = 0) -> EncodedData:
        result = read_pairs(path, cfg.data.on_bad_record)
        pairs = result.pairs[:limit] if limit else result.pairs
        data = encode_pairs(pairs, encoder)
        line = f"{path}: {len(pairs)} pairs"
        if result.bad:
            first = result.bad[0]
            line += f", {len(result.bad)} bad records skipped (first: line {first.line}: {first.reason})"
        line += f", {data.truncated} truncated to fit max_prompt_length/max_response_length"
        messages.append(line)
        return data

    train = load(cfg.data.train_file)
    val = load(cfg.data.validation_file, cfg.data.max_eval_pairs) if cfg.data.validation_file else None
    return PreparedData(train, val, messages)
