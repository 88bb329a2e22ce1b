"""The CPU attention (mlx_dpo/cpu_attention.py) computes what MLX's attention computes, values and
gradients, for every mask mlx-lm or the shared-prompt path hands it, in one block or many, and
only takes blocks where they pay."""
from __future__ import annotations

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_dpo import cpu_attention, cpu_kernels, native
from mlx_dpo.completion import completion_logits, shared_plan
from mlx_dpo.cpu_attention import CausalMask, SharedPromptMask
from mlx_dpo.data.batching import collate
from mlx_dpo.data.tokenize import EncodedPair
from mlx_dpo.logprobs import sequence_logps

B, HEADS, KV_HEADS, T, OFFSET, D = 3, 6, 2, 21, 9, 32  # grouped-query heads, keys longer than queries;
# a head size native.py's C++ attention takes, so that the native runs go through it
LEFT_PAD = [0, 4, 11]  # row 2's pads outnumber the offset: some of its queries see only themselves


@pytest.fixture(autouse=True, params=["native", "mlx-ops"])
def softmax_kernels(request, monkeypatch):
    """Every test runs twice: with native.py's C++ attention (where it builds) and on MLX ops alone."""
    if request.param == "mlx-ops":
        native.kernels()
        monkeypatch.setitem(native._state, "module", None)
    return request.param


def _qkv(offset: int = OFFSET):
    q = mx.random.normal((B, HEADS, T, D), key=mx.random.key(4))
    k = mx.random.normal((B, KV_HEADS, offset + T, D), key=mx.random.key(5))
    v = mx.random.normal((B, KV_HEADS, offset + T, D), key=mx.random.key(6))
    return q, k, v


def _value_and_grads(fn, q, k, v):
    weights = mx.sin(mx.arange(D, dtype=mx.float32))  # a loss that weighs every output differently
    return mx.value_and_grad(lambda *a: (fn(*a) * weights).sum(), argnums=(0, 1, 2))(q, k, v)


def _assert_same(ours, theirs, q, k, v):
    out_ours, out_theirs = ours(q, k, v), theirs(q, k, v)
    np.testing.assert_allclose(np.array(out_ours), np.array(out_theirs), atol=2e-6)
    (_, g_ours), (_, g_theirs) = _value_and_grads(ours, q, k, v), _value_and_grads(theirs, q, k, v)
    for a, b in zip(g_ours, g_theirs):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=2e-5)
    assert max(float(mx.abs(g).max()) for g in g_theirs) > 0.1  # real gradients, not zeros


def _mlx_attention(mask):
    return lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)


@pytest.mark.parametrize("mask_kind", ["none", "causal", "bool", "additive"])
def test_attention_equals_mlx_sdpa_for_mlx_lm_masks(mask_kind):
    q, k, v = _qkv()
    keep = CausalMask(OFFSET, mx.array(LEFT_PAD)).array(T)
    mask = {"none": None, "causal": "causal", "bool": keep,
            "additive": mx.where(keep, 0.0, -float("inf"))}[mask_kind]
    _assert_same(lambda *a: cpu_attention.attention(*a, None, scale=0.25, mask=mask), _mlx_attention(mask), q, k, v)


@pytest.mark.parametrize("blocks", ["blocked_attention", "kept_blocks_attention"])  # recomputed, kept softmax
@pytest.mark.parametrize("block", [1, 4, 8, T, 128])
@pytest.mark.parametrize("offset,padded", [(OFFSET, False), (OFFSET, True), (0, True), (0, False)])
def test_attention_in_blocks_equals_mlx_sdpa_for_any_block_size(blocks, block, offset, padded):
    q, k, v = _qkv(offset)
    mask = CausalMask(offset, mx.array(LEFT_PAD) if padded else None)
    attend = getattr(cpu_attention, blocks)
    _assert_same(lambda *a: attend(*a, 0.25, mask, block=block), _mlx_attention(mask.array(T)), q, k, v)


def test_blocked_attention_compiles_and_takes_the_padding_as_an_input():
    q, k, v = _qkv()

    def run(left_pad):
        return cpu_attention.blocked_attention(q, k, v, 0.25, CausalMask(OFFSET, left_pad), block=8)

    compiled = mx.compile(run)
    for pads in ([0, 4, 11], [3, 0, 7]):  # same shapes: the second call reuses the trace
        left_pad = mx.array(pads)
        np.testing.assert_allclose(np.array(compiled(left_pad)),
                                   np.array(_mlx_attention(CausalMask(OFFSET, left_pad).array(T))(q, k, v)), atol=2e-6)


def test_causal_mask_array_matches_its_definition():
    mask = CausalMask(2, mx.array([0, 3])).array(4)  # 4 queries, 6 keys
    assert mask.shape == (2, 1, 4, 6)
    for row, pad in enumerate([0, 3]):
        for i in range(4):
            for j in range(6):
                want = (pad <= j <= i + 2) or j == i + 2
                assert bool(mask[row, 0, i, j]) == want, (row, i, j)


def test_shared_prompt_path_with_many_blocks_equals_mlx_lm_attention(tiny_model, monkeypatch):
    """Log-probs and gradients of the shared-prompt hot path, with mlx-dpo's attention in blocks
    of 4 (symbolic masks), equal mlx-lm's own attention on materialised masks."""
    import mlx_lm

    model, _ = mlx_lm.load(str(tiny_model))
    model.set_dtype(mx.float32)
    rng = np.random.default_rng(7)

    def ids(lo, hi):
        return [int(i) for i in rng.integers(5, 40, int(rng.integers(lo, hi)))]

    plan = shared_plan(collate([EncodedPair(ids(3, 30), ids(5, 25), ids(5, 25)) for _ in range(4)], pad_id=2))
    monkeypatch.setattr(cpu_attention, "BLOCKED_FROM", 0)  # blocks at any length

    def loss(installed: bool):
        def fn():
            with cpu_kernels.installed(model, enabled=installed, attention_block=4):
                logits = completion_logits(model, plan.shared, plan.arrays())
            logps = sequence_logps(logits, mx.array(plan.targets), mx.array(plan.weights))
            return (logps * mx.arange(1, 9)).sum(), logps
        return nn.value_and_grad(model, lambda: fn()[0])(), fn()[1]

    ((_, g_ours), logps_ours), ((_, g_mlx), logps_mlx) = loss(True), loss(False)
    np.testing.assert_allclose(np.array(logps_ours), np.array(logps_mlx), rtol=1e-5, atol=1e-4)
    ours, theirs = dict(tree_flatten(g_ours)), dict(tree_flatten(g_mlx))
    for name in theirs:
        np.testing.assert_allclose(np.array(ours[name]), np.array(theirs[name]), rtol=1e-3, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("padded", [False, True])
def test_shared_prompt_attention_equals_mlx_sdpa_on_its_mask(padded):
    """[prompt | chosen | rejected] rows: the rejected queries see the prompt and their own keys."""
    t, prompt, split = 30, 8, 19
    q = mx.random.normal((B, HEADS, t, D), key=mx.random.key(7))
    k = mx.random.normal((B, KV_HEADS, t, D), key=mx.random.key(8))
    v = mx.random.normal((B, KV_HEADS, t, D), key=mx.random.key(9))
    mask = SharedPromptMask(prompt, split, mx.array([0, 3, 7] if padded else [0, 0, 0], dtype=mx.int32))
    _assert_same(lambda *a: cpu_attention.attention(*a, None, scale=0.25, mask=mask), _mlx_attention(mask.array(t)),
                 q, k, v)


def test_the_c_attention_takes_causal_masks_whole_where_built(softmax_kernels, monkeypatch):
    used = []
    monkeypatch.setattr(cpu_attention, "blocked_attention", lambda *a: used.append("blocked") or a[0])
    monkeypatch.setattr(cpu_attention, "kept_blocks_attention", lambda *a: used.append("kept") or a[0])
    monkeypatch.setattr(cpu_attention, "attention_block", lambda: 8)
    q, k, v = _qkv()
    cpu_attention.attention(q, k, v, None, scale=0.25, mask="causal")
    assert used == ([] if softmax_kernels == "native" else ["kept"])


def test_blocks_only_from_the_threshold(monkeypatch):
    monkeypatch.setattr(cpu_attention, "NATIVE_HEAD_SIZES", ())  # the blocks serve the head sizes C++ does not
    calls = []
    monkeypatch.setattr(cpu_attention, "blocked_attention", lambda *a: calls.append(a[-1]) or a[0])
    monkeypatch.setattr(cpu_attention, "attention_block", lambda: 8)
    q, k, v = _qkv()
    monkeypatch.setattr(cpu_attention, "BLOCKED_FROM", T * (OFFSET + T) + 1)
    cpu_attention.attention(q, k, v, None, scale=0.25, mask="causal")
    assert calls == []  # below: dense
    monkeypatch.setattr(cpu_attention, "BLOCKED_FROM", T * (OFFSET + T))
    cpu_attention.attention(q, k, v, None, scale=0.25, mask="causal")
    assert calls == [8]


def test_below_the_threshold_blocks_keep_their_softmax(monkeypatch):
    monkeypatch.setattr(cpu_attention, "NATIVE_HEAD_SIZES", ())
    kept = []
    monkeypatch.setattr(cpu_attention, "kept_blocks_attention", lambda *a: kept.append(a[-1]) or a[0])
    monkeypatch.setattr(cpu_attention, "attention_block", lambda: 8)
    monkeypatch.setattr(cpu_attention, "BLOCKED_FROM", T * (OFFSET + T) + 1)
    q, k, v = _qkv()
    cpu_attention.attention(q, k, v, None, scale=0.25, mask="causal")
    assert kept == [8]
