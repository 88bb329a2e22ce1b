"""head_logps.py: target log-probs from hidden states in vocabulary chunks equal the log-softmax
of the whole logits, with their gradients, and never hold the logits whole."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_dpo import cpu_kernels, head_logps
from mlx_dpo.completion import completion_logits, completion_logps, head_weight, shared_plan
from mlx_dpo.data.batching import collate
from mlx_dpo.logprobs import position_kl, token_logps
from test_cpu_kernels import _peak_in_arrays
from test_perf_exactness import _pairs


def _reference(hidden, weight, targets):
    logits = hidden @ weight.T
    return mx.take_along_axis(logits, targets[:, None], axis=-1).squeeze(-1) - mx.logsumexp(logits, axis=-1)


@contextlib.contextmanager
def _fast_math(on: bool = True):
    """As inside mlx-dpo's CPU kernels (cpu_kernels.active()), without a model to install them in."""
    token = cpu_kernels._ACTIVE.set(on)
    try:
        yield
    finally:
        cpu_kernels._ACTIVE.reset(token)


def _large_head(seed: int):
    """(hidden (128, 64), weight (65536, 64), targets (128,)), evaluated: 8 chunks by default."""
    keys = mx.random.split(mx.random.key(seed), 3)
    hidden = mx.random.normal((128, 64), key=keys[0])
    weight = mx.random.normal((65536, 64), key=keys[1]) * 0.1
    targets = mx.random.randint(0, 65536, (128,), key=keys[2])
    mx.eval(hidden, weight, targets)
    return hidden, weight, targets


def use_chunks(monkeypatch, chunk_bytes: int, min_chunk: int = head_logps.MIN_CHUNK) -> None:
    """Other chunk sizes for one test, with fresh compiled functions: mx.compile keeps a trace per
    input shape, and a trace made with other chunks would be reused."""
    monkeypatch.setattr(head_logps, "CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(head_logps, "MIN_CHUNK", min_chunk)
    for name in ("_head_logps", "_head_eval"):
        monkeypatch.setattr(head_logps, f"_compiled{name}", mx.compile(getattr(head_logps, name)))


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 256 words for 96 rows: several chunks and a shorter last one at vocab 2000."""
    use_chunks(monkeypatch, 96 * 256 * 4, min_chunk=64)
    assert [stop - first for first, stop in head_logps._chunks(96, 2000)] == [256] * 7 + [208]


@pytest.mark.parametrize("fast_math", [False, True])
def test_values_and_gradients_equal_the_whole_logits(small_chunks, fast_math):
    rows, dim, vocab = 96, 48, 2000
    hidden = mx.random.normal((rows, dim), key=mx.random.key(0))
    weight = mx.random.normal((vocab, dim), key=mx.random.key(1)) * 0.3
    targets = mx.random.randint(0, vocab, (rows,), key=mx.random.key(2))
    weights = mx.random.normal((rows,), key=mx.random.key(3))  # a cotangent that is not all ones

    def loss(fn):
        return lambda h, w: (fn(h, w, targets) * weights).sum()

    with _fast_math(fast_math):
        got, got_grads = mx.value_and_grad(loss(head_logps.head_logps), argnums=(0, 1))(hidden, weight)
        values = head_logps.head_logps(hidden, weight, targets)
    want, want_grads = mx.value_and_grad(loss(_reference), argnums=(0, 1))(hidden, weight)
    np.testing.assert_allclose(np.array(values), np.array(_reference(hidden, weight, targets)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(np.array(g), np.array(w), rtol=1e-4, atol=1e-6)
    assert float(mx.abs(got_grads[1]).max()) > 1e-3


def test_half_precision_weights_give_float32_logps_and_their_own_gradient_dtype(small_chunks):
    hidden = mx.random.normal((96, 32), key=mx.random.key(4)).astype(mx.bfloat16)
    weight = (mx.random.normal((2000, 32), key=mx.random.key(5)) * 0.3).astype(mx.bfloat16)
    targets = mx.random.randint(0, 2000, (96,), key=mx.random.key(6))
    got = head_logps.head_logps(hidden, weight, targets)
    assert got.dtype == mx.float32
    want = token_logps((hidden @ weight.T)[None], targets[None])[0]
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-3, atol=1e-3)
    grads = mx.grad(lambda h, w: head_logps.head_logps(h, w, targets).sum(), argnums=(0, 1))(hidden, weight)
    assert [g.dtype for g in grads] == [mx.bfloat16, mx.bfloat16]


def test_the_logits_never_exist_whole():
    # The compiled gradient of the whole-logits head peaks at four logits-sized arrays
    # (test_cpu_kernels); in chunks only the kept exp is logits-sized (2.0 measured; 3.0 when the
    # chunks are not chained with mx.depends).
    hidden, weight, targets = _large_head(7)
    rows, vocab = targets.size, weight.shape[0]
    assert len(head_logps._chunks(rows, vocab)) == 8
    with _fast_math():
        for fn, limit in ((head_logps.head_logps, 2.5), (lambda h, w, t: cpu_kernels._target_logps(h @ w.T, t)[0], 9)):
            step = mx.compile(mx.grad(lambda h: fn(h, weight, targets).sum()))
            arrays = _peak_in_arrays(lambda: step(hidden), rows * vocab * 4)
            assert arrays < limit, f"peak of {arrays:.2f} logits-sized arrays"
            limit = arrays
    assert limit > 3.5  # the whole-logits head, measured the same way, holds more


@pytest.fixture(scope="module")
def model(tiny_model):
    import mlx_lm

    m, _ = mlx_lm.load(str(tiny_model))
    m.set_dtype(mx.float32)
    return m


def test_completion_logps_equal_the_logits_path_for_tied_and_separate_heads(model, small_chunks, monkeypatch):
    plan = shared_plan(collate(_pairs(11), pad_id=2))
    targets = mx.array(plan.targets)
    assert head_weight(model) is model.model.embed_tokens.weight  # the tiny model ties its embeddings

    def both():
        with cpu_kernels.installed(model):
            return (completion_logps(model, True, plan.arrays(), targets),
                    token_logps(completion_logits(model, True, plan.arrays()), targets))

    use_chunks(monkeypatch, targets.size * 64 * 4, min_chunk=64)  # several chunks
    got, want = both()
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-5)

    vocab, dim = model.model.embed_tokens.weight.shape
    model.lm_head = nn.Linear(dim, vocab, bias=False)
    try:
        assert head_weight(model) is model.lm_head.weight
        got, want = both()
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-5)
        model.lm_head = nn.QuantizedLinear.from_linear(nn.Linear(dim, vocab, bias=False), group_size=32, bits=8)
        assert head_weight(model) is None  # quantized heads take the logits path
        got, want = both()
        np.testing.assert_array_equal(np.array(got), np.array(want))
    finally:
        del model.lm_head
    assert "lm_head" not in dict(tree_flatten(model.parameters()))


def test_eager_calls_fuse_their_exp():
    # The reference pass runs outside the compiled step: inside mlx-dpo's CPU kernels the head is
    # compiled on its own, so the fast exp's ops fuse instead of each writing a chunk-sized array
    # (2.0 logits-sized arrays at the peak measured, 2.9 uncompiled).
    hidden, weight, targets = _large_head(10)
    with _fast_math():
        arrays = _peak_in_arrays(lambda: head_logps.head_logps(hidden, weight, targets),
                                 targets.size * weight.shape[0] * 4)
    assert arrays < 2.4, f"peak of {arrays:.2f} logits-sized arrays"


@pytest.mark.parametrize("fast_math", [False, True])
def test_head_eval_equals_the_whole_logits(small_chunks, fast_math):
    rows, dim, vocab = 96, 48, 2000
    keys = mx.random.split(mx.random.key(13), 4)
    hidden_p = mx.random.normal((rows, dim), key=keys[0])
    hidden_q = hidden_p + 0.3 * mx.random.normal((rows, dim), key=keys[1])
    weight_p = mx.random.normal((vocab, dim), key=keys[2]) * 0.3
    weight_q = weight_p + 0.1 * mx.random.normal((vocab, dim), key=keys[3])
    targets = mx.random.randint(0, vocab, (rows,), key=mx.random.key(14))
    with _fast_math(fast_math):
        got = head_logps.head_eval(hidden_p, weight_p, hidden_q, weight_q, targets)
    logits_p, logits_q = (hidden_p @ weight_p.T)[None], (hidden_q @ weight_q.T)[None]
    want = (token_logps(logits_p, targets[None])[0], token_logps(logits_q, targets[None])[0],
            position_kl(logits_p, logits_q)[0])
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.array(g), np.array(w), rtol=1e-5, atol=2e-5)
    assert float(want[2].min()) > 0.05  # the two heads really differ



def test_chunk_bounds_do_not_follow_every_batch_length():
    # The bounds are constants of compiled kernels, which MLX's CPU backend builds with g++ for
    # each new value: batches of other lengths must reuse a few widths, near the byte budget.
    vocab = 49152
    widths = {}
    for rows in range(16, 8192 + 1, 16):
        chunks = head_logps._chunks(rows, vocab)
        assert chunks[0][0] == 0 and chunks[-1][1] == vocab
        assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
        widths[rows] = chunks[0][1] - chunks[0][0]
    assert len(set(widths.values())) <= 8
    for rows, width in widths.items():
        logits = 4 * rows * width
        if width > head_logps.MIN_CHUNK:
            assert head_logps.CHUNK_BYTES / 2**0.5 <= logits <= head_logps.CHUNK_BYTES * 2**0.5
        assert width % 32 == 0  # whole lanes for the row maxima and sums
