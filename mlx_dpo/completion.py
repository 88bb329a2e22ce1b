"""Logits at completion positions only: the DPO hot path without the wasted work.

The plain path runs the LM head and a vocabulary-wide log-softmax at every position of the
(2B, T) batch, prompt and padding included, although only completion tokens count. Here the
transformer body runs as usual, the hidden states of completion positions are gathered into
a (2B, C) grid, and only those reach the head: C is the longest completion, not T.

With `shared=True` the prompt also runs once per pair instead of twice: each pair is one row,
[left-padded prompt | chosen inputs | rejected inputs], and one pass of the body serves both
completions. The rejected inputs take the positions right after the prompt (the model's RoPE is
restarted there) and attend to the prompt and to themselves only; pads are never attended
(cpu_attention.SharedPromptMask). RoPE scores depend only on position differences, so the
left-padding shift changes nothing.

A `Plan` is built on the host from the numpy batch (cheap index arithmetic) and feeds
`completion_logits`; its `targets` and `weights` replace the batch's targets and mask.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import numpy as np

from . import cpu_kernels
from .cpu_attention import SharedPromptMask
from .data.batching import Batch
from .head_logps import head_logps
from .logprobs import token_logps

PAD_MULTIPLE = 16  # grid widths are rounded up: fewer distinct shapes, fewer mx.compile traces


@dataclass
class Plan:
    """Index arrays for one batch; shapes in the field comments (N = 2B rows)."""
    inputs: Optional[np.ndarray]  # packed: (N, T) int32, the batch's inputs
    flat_index: Optional[np.ndarray]  # packed: (N, C) int32 into the flattened (N*T) hidden states
    targets: np.ndarray  # (N, C) int32 completion tokens
    weights: np.ndarray  # (N, C) float32, 1 on real completion tokens
    prompts: Optional[np.ndarray] = None  # shared: (B, P) int32, left-padded
    left_pad: Optional[np.ndarray] = None  # shared: (B,) int32 pads before each prompt
    continuation: Optional[np.ndarray] = None  # shared: (N, C-1) int32 completion inputs

    @property
    def shared(self) -> bool:
        return self.prompts is not None

    def arrays(self) -> tuple:
        """The plan as MLX arrays, in `completion_logits`'s argument order."""
        if self.shared:
            parts = (self.prompts, self.left_pad, self.continuation)
        else:
            parts = (self.inputs, self.flat_index)
        return tuple(mx.array(p) for p in parts)


def _round_up(n: int) -> int:
    return max(-(-n // PAD_MULTIPLE) * PAD_MULTIPLE, PAD_MULTIPLE)


def _spans(mask: np.ndarray) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """(first target index, count) of each row's completion; None unless every row's
    completion is one contiguous run (what collate makes)."""
    on = mask > 0
    counts = on.sum(axis=1)
    starts = on.argmax(axis=1)
    cols = np.arange(mask.shape[1])[None, :]
    contiguous = (on == ((cols >= starts[:, None]) & (cols < (starts + counts)[:, None]))).all()
    if not contiguous or (counts == 0).any():
        return None
    return starts, counts


def packed_plan(batch: Batch) -> Optional[Plan]:
    spans = _spans(batch.mask)
    if spans is None:
        return None
    starts, counts = spans
    n, t = batch.mask.shape
    width = _round_up(int(counts.max()))
    cols = np.arange(width)[None, :]
    valid = cols < counts[:, None]
    pos = np.minimum(np.where(valid, starts[:, None] + cols, starts[:, None]), t - 1)
    rows = np.arange(n)[:, None]
    return Plan(batch.inputs, (rows * t + pos).astype(np.int32), batch.targets[rows, pos].astype(np.int32),
                valid.astype(np.float32))


def shared_plan(batch: Batch) -> Optional[Plan]:
    """None when the chosen and rejected rows of a pair do not start with the same prompt."""
    spans = _spans(batch.mask)
    if spans is None:
        return None
    starts, counts = spans
    b = batch.num_pairs
    plen = starts + 1  # target t is token t+1: the first completion target sits at len(prompt)-1
    if not (plen[:b] == plen[b:]).all():
        return None
    for r in range(b):
        if not np.array_equal(batch.inputs[r, :plen[r]], batch.inputs[r + b, :plen[r]]):
            return None
    width = _round_up(int(counts.max()))
    cols = np.arange(width)[None, :]
    valid = cols < counts[:, None]
    src = np.minimum(starts[:, None] + cols, batch.targets.shape[1] - 1)
    targets = np.where(valid, batch.targets[np.arange(2 * b)[:, None], src], 0).astype(np.int32)
    p_width = _round_up(int(plen[:b].max()))
    prompts = np.zeros((b, p_width), dtype=np.int32)
    for r in range(b):
        prompts[r, p_width - plen[r]:] = batch.inputs[r, :plen[r]]
    # The last completion token is never an input: it is only predicted.
    return Plan(None, None, targets, valid.astype(np.float32), prompts,
                (p_width - plen[:b]).astype(np.int32), targets[:, :-1].copy())


def make_plan(batch: Batch, shared: bool) -> Optional[Plan]:
    return (shared_plan(batch) if shared else None) or packed_plan(batch)


# -- MLX side ---------------------------------------------------------------------------------
def split_model(model):
    """(body, head): body(inputs, cache) -> hidden states, head(hidden) -> logits; None for an
    architecture whose top is not the plain `model.model` + LM head that this relies on."""
    body = getattr(model, "model", None)
    if body is None or not callable(body):
        return None
    if getattr(model, "lm_head", None) is not None:
        return body, model.lm_head
    embed = getattr(body, "embed_tokens", None)
    if embed is not None and hasattr(embed, "as_linear"):
        return body, embed.as_linear
    return None


def has_plain_top(model) -> bool:
    """Whether model(x) is head(body(x)) for split_model's parts, checked once on a few tokens.
    Some architectures transform the logits after the head (Granite divides them, Gemma 2
    soft-caps them, Cohere scales them): the completion-only path would silently skip that, so
    such a model takes the full-logits path."""
    parts = split_model(model)
    if parts is None:
        return False
    body, head = parts
    training = model.training
    model.eval()  # no dropout in the comparison
    try:
        tokens = mx.array([[0, 1, 2]])
        whole, split = model(tokens), head(body(tokens))
        return whole.shape == split.shape and bool(
            mx.allclose(whole.astype(mx.float32), split.astype(mx.float32), rtol=1e-5, atol=1e-5))
    finally:
        model.train(training)


def head_weight(model) -> Optional[mx.array]:
    """The (V, D) matrix of a head that is a plain matmul, logits = hidden @ W.T (an unquantized,
    bias-free `lm_head`, or tied embeddings); None for any other head."""
    import mlx.nn as nn

    lm_head = getattr(model, "lm_head", None)
    if lm_head is not None:
        return lm_head.weight if type(lm_head) is nn.Linear and "bias" not in lm_head else None
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    return embed.weight if type(embed) is nn.Embedding else None


def completion_hidden(model, shared: bool, arrays: tuple) -> mx.array:
    """Hidden states (N, C, D) at the positions that predict the plan's targets; `arrays` is
    `plan.arrays()` and `shared` is `plan.shared`."""
    body, _ = split_model(model)
    return _shared_hidden(body, *arrays) if shared else _gathered_hidden(body, *arrays)


def completion_logits(model, shared: bool, arrays: tuple) -> mx.array:
    """Logits (N, C, V) at the positions that predict the plan's targets."""
    return split_model(model)[1](completion_hidden(model, shared, arrays))


def completion_logps(model, shared: bool, arrays: tuple, targets: mx.array) -> mx.array:
    """log p(target) (N, C) at the plan's completion positions: through head_logps.py's
    vocabulary chunks when the head is a plain matmul (the logits never exist whole), else
    from the logits."""
    hidden = completion_hidden(model, shared, arrays)
    weight = head_weight(model)
    if weight is not None:
        return head_logps(hidden, weight, targets)
    return token_logps(split_model(model)[1](hidden), targets)


def _gathered_hidden(body, inputs: mx.array, flat_index: mx.array) -> mx.array:
    hidden = body(inputs)
    return hidden.reshape(-1, hidden.shape[-1])[flat_index]


def _shared_hidden(body, prompts: mx.array, left_pad: mx.array, continuation: mx.array) -> mx.array:
    """One row per pair, [prompt | chosen inputs | rejected inputs], in a single pass of the body:
    each weight takes part in one larger matmul instead of a prompt one and a continuation one,
    and no key or value is copied between them."""
    b, p = prompts.shape
    split = p + continuation.shape[1]  # the rejected inputs start here; their positions at p
    inputs = mx.concatenate([prompts, continuation[:b], continuation[b:]], axis=1)
    cache = _MaskCache(SharedPromptMask(p, split, left_pad), _RestartOffset(split, p))
    _make_rope_restartable(body)
    hidden = body(inputs, cache=[cache] * len(body.layers))
    # The prompt's last token predicts the first token of both completions.
    chosen = hidden[:, p - 1:split]
    rejected = mx.concatenate([hidden[:, p - 1:p], hidden[:, split:]], axis=1)
    return mx.concatenate([chosen, rejected], axis=0)


def _attention_modules(body) -> Optional[list]:
    """Each layer's attention module, when every one applies RoPE through a `rope` attribute
    given `cache.offset` (what _RestartableRope relies on); None otherwise."""
    out = []
    for layer in getattr(body, "layers", None) or []:
        attn = getattr(layer, "self_attn", None)
        if attn is None or not callable(getattr(attn, "rope", None)):
            return None
        out.append(attn)
    return out or None


def can_share_prompt(model) -> bool:
    parts = split_model(model)
    return parts is not None and _attention_modules(parts[0]) is not None


class _RestartOffset(int):
    """The shared-prompt row's `cache.offset`: 0, and where RoPE positions restart (column
    `split` gets position `restart`). It travels with the cache, so a block that
    gradient checkpointing recomputes in the backward gets the same positions."""

    def __new__(cls, split: int, restart: int):
        offset = super().__new__(cls, 0)
        offset.split, offset.restart = split, restart
        return offset


class _RestartableRope:
    """The model's RoPE; given a _RestartOffset, positions restart at its column. Any other
    offset goes straight through, so it can stay on the model."""

    def __init__(self, rope):
        self.rope = rope

    def __call__(self, x: mx.array, offset=0) -> mx.array:
        if not isinstance(offset, _RestartOffset):
            return self.rope(x, offset=offset)
        restarting = getattr(self.rope, "restarting", None)  # cpu_layers.NativeRoPE: one pass, no slices
        out = restarting(x, 0, offset.split, offset.restart) if restarting else None
        if out is not None:
            return out
        head = self.rope(x[..., :offset.split, :], offset=0)
        tail = self.rope(x[..., offset.split:, :], offset=offset.restart)
        return mx.concatenate([head, tail], axis=-2)


def _make_rope_restartable(body) -> None:
    # An instance attribute shadows the module's child without touching its parameter tree.
    for attn in _attention_modules(body):
        if not isinstance(vars(attn).get("rope"), _RestartableRope):
            object.__setattr__(attn, "rope", _RestartableRope(attn.rope))


class _MaskCache:
    """Enough of mlx-lm's KV-cache interface to hand every layer the shared-prompt mask: keys and
    values pass through (nothing is cached; the graph stays whole for the backward)."""

    def __init__(self, mask: SharedPromptMask, offset: _RestartOffset):
        self.mask, self.offset = mask, offset

    def update_and_fetch(self, keys, values):
        return keys, values

    def make_mask(self, n: int, return_array: bool = False, window_size=None):
        if window_size is not None:
            from .errors import UserError
            raise UserError("training.share_prompt does not support models with sliding-window attention; "
                            "set training.share_prompt: false for this model")
        # cpu_attention takes the mask symbolically; any other attention gets it as an array.
        return self.mask if cpu_kernels.attention_block() is not None else self.mask.array(n)
