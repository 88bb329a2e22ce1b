"""Turn preference records into token ids: prompt | chosen completion | rejected completion.

Boundary: the prompt is rendered on its own (with the chat template's generation prompt when
one is used) and tokenized; each completion is tokenized separately and ends with EOS. Only
completion tokens count in log-probs, so this boundary is exact.

Truncation policy (docs/config.md): a completion longer than max_response_length keeps its
first tokens (its EOS is then cut); a prompt longer than max_prompt_length keeps its last
tokens (the part nearest the answer, including the template's assistant header). A completion
never ends up empty because max_response_length >= 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .records import Pair, Text


@dataclass
class EncodedPair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    truncated: bool = False
    line: int = 0
    ref_logps: Optional[tuple] = None  # (chosen, rejected) reference log-prob sums, when cached
    # (chosen, rejected) reference hidden states at the completion positions, float32 arrays of
    # (completion length, hidden size), when cached for evaluation (refcache.attach_eval_hidden)
    ref_hidden: Optional[tuple] = None

    @property
    def length(self) -> int:
        """Longest of the two full sequences: what a batch must pad to."""
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))


class PairEncoder:
    """Encodes pairs for one tokenizer and one set of length limits."""

    def __init__(self, tokenizer, max_prompt_length: int, max_response_length: int,
                 chat_template: str = "auto"):
        self.tok = tokenizer
        self.max_prompt = max_prompt_length
        self.max_response = max_response_length
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if chat_template == "on" and not has_template:
            from ..errors import UserError
            raise UserError("data.chat_template is 'on' but the tokenizer has no chat template")
        self.use_template = has_template and chat_template != "off"
        self.eos = tokenizer.eos_token_id

    def encode(self, pair: Pair) -> EncodedPair:
        messages = pair.prompt if isinstance(pair.prompt, list) else [{"role": "user", "content": pair.prompt}]
        if self.use_template:
            prompt_text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            prompt = self.tok.encode(prompt_text, add_special_tokens=False)
        elif isinstance(pair.prompt, list):
            prompt = self.tok.encode("\n".join(m["content"] for m in messages))
        else:
            prompt = self.tok.encode(pair.prompt)
        if not prompt:  # an empty prompt still needs one token to predict the first answer token
            prompt = [self.tok.bos_token_id if self.tok.bos_token_id is not None else self.eos]
        chosen = self._completion(messages, pair.chosen)
        rejected = self._completion(messages, pair.rejected)
        truncated = len(prompt) > self.max_prompt or max(len(chosen), len(rejected)) > self.max_response
        return EncodedPair(prompt[-self.max_prompt:], chosen[: self.max_response],
                           rejected[: self.max_response], truncated, pair.line)

    def _completion(self, messages: list, completion: Text) -> list[int]:
        turns = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
        if self.use_template:
            prefix = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            full = self.tok.apply_chat_template(messages + turns, tokenize=False)
            # Templates render the assistant turn after the generation prompt; when one does
            # not (it rewrites earlier turns), fall back to the raw text.
            text = full[len(prefix):] if full.startswith(prefix) else "\n".join(t["content"] for t in turns)
            text = text.rstrip()
        else:
            text = "\n".join(t["content"] for t in turns)
        ids = self.tok.encode(text, add_special_tokens=False)
        if not ids or ids[-1] != self.eos:
            ids.append(self.eos)
        return ids


@dataclass
class EncodedData:
    pairs: list[EncodedPair]
    truncated: int  # pairs cut to fit max_prompt_length / max_response_length


def encode_pairs(pairs: list[Pair], encoder: PairEncoder) -> EncodedData:
    encoded = [encoder.encode(p) for p in pairs]
    return EncodedData(encoded, sum(e.truncated for e in encoded))
