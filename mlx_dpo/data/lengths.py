"""Length statistics of prompts and completions, and the share training would truncate.

With a tokenizer, lengths are counted by the trainer's own encoder (mlx_dpo.data.tokenize:
chat template, EOS, the prompt/completion boundary), so "would be truncated" means exactly
what training does at max_prompt_length / max_response_length. Without one, lengths are in
characters and nothing can be said about truncation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .records import Pair, completion_text

FIELDS = ("prompt", "chosen", "rejected")


@dataclass
class LengthStats:
    unit: str                                  # "tokens" or "characters"
    max_prompt: Optional[int] = None           # limits, known only with a tokenizer
    max_response: Optional[int] = None
    tokenizer: Optional[str] = None
    values: dict = field(default_factory=lambda: {k: [] for k in FIELDS})
    truncated: int = 0                         # pairs with a prompt or a completion over its limit
    prompt_truncated: int = 0
    response_truncated: int = 0

    def add(self, prompt: int, chosen: int, rejected: int) -> None:
        self.values["prompt"].append(prompt)
        self.values["chosen"].append(chosen)
        self.values["rejected"].append(rejected)
        if self.max_prompt is not None:
            long_prompt = prompt > self.max_prompt
            long_response = max(chosen, rejected) > self.max_response
            self.prompt_truncated += long_prompt
            self.response_truncated += long_response
            self.truncated += long_prompt or long_response

    @property
    def count(self) -> int:
        return len(self.values["prompt"])

    def summary(self) -> dict:
        out = {"unit": self.unit, "tokenizer": self.tokenizer}
        for key, values in self.values.items():
            arr = np.asarray(values, dtype=np.int64)
            out[key] = ({"mean": round(float(arr.mean()), 1), "median": int(np.median(arr)),
                         "p95": int(np.percentile(arr, 95)), "max": int(arr.max())}
                        if len(arr) else None)
        if self.max_prompt is not None and self.count:
            out["limits"] = {"max_prompt_length": self.max_prompt, "max_response_length": self.max_response}
            out["truncated_share"] = self.truncated / self.count
            out["prompt_truncated_share"] = self.prompt_truncated / self.count
            out["response_truncated_share"] = self.response_truncated / self.count
        return out


class CharLengths:
    def __init__(self):
        self.stats = LengthStats("characters")

    def add(self, pair: Pair) -> None:
        p, c, r = pair.prompt, pair.chosen, pair.rejected
        if isinstance(p, str):
            self.stats.add(len(p), len(c), len(r))
        else:
            self.stats.add(len(completion_text(p)), len(completion_text(c)), len(completion_text(r)))


class TokenLengths:
    """Token lengths through the trainer's PairEncoder, with limits lifted to see full lengths."""

    def __init__(self, tokenizer, max_prompt: int, max_response: int, chat_template: str = "auto",
                 name: Optional[str] = None):
        from .tokenize import PairEncoder

        unlimited = 1 << 62
        self.encoder = PairEncoder(tokenizer, unlimited, unlimited, chat_template)
        self.stats = LengthStats("tokens", max_prompt, max_response, name)

    def add(self, pair: Pair) -> None:
        encoded = self.encoder.encode(pair)
        self.stats.add(len(encoded.prompt), len(encoded.chosen), len(encoded.rejected))


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The tokenizer mlx-lm would load for `path` (a local folder or a Hugging Face id)."""
    from mlx_lm.utils import load_tokenizer as _load

    from ..errors import UserError

    try:
        return _load(path, {"trust_remote_code": trust_remote_code})
    except Exception as err:  # missing files, no network for a hub id, bad tokenizer.json
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"cannot load a tokenizer from {path!r}: {first_line[:200]}") from None
