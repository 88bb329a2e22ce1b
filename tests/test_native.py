"""mlx-dpo's C++ kernels (mlx_dpo/native.py, mlx_dpo/csrc/): they build on a Linux machine with a
compiler, compute the masked softmax that MLX ops compute, and a machine without them falls back
with a reason instead of failing."""
from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest

import mlx.core as mx

from mlx_dpo import native
from mlx_dpo.cpu_attention import CausalMask

B, H, Q, K, OFFSET = 3, 4, 24, 48, 20
LEFT_PAD = [0, 7, 30]  # row 2's pads outnumber some queries' positions: those see only themselves
# The kernels' own tests need a machine that can build them (Linux with g++, as CI's); there they
# must build. The fallback test at the end runs everywhere.
needs_build = pytest.mark.skipif(sys.platform != "linux" or shutil.which("g++") is None,
                                 reason="the C++ kernels build on Linux with g++ only")


def _kernels():
    module = native.kernels()
    assert module is not None, native.status()
    return module


def _scores():
    return mx.random.normal((B, H, Q, K), key=mx.random.key(1)) * 6.0


def _reference(scores, pads, offset):
    keep = np.broadcast_to(np.array(CausalMask(offset, mx.array(pads, dtype=mx.int32)).keep(0, Q, K)), (B, H, Q, K))
    s = np.where(keep, np.array(scores, dtype=np.float64), -np.inf)
    top = s.max(axis=-1, keepdims=True)
    weights = np.exp(s - top)
    return keep, weights, top, weights.sum(axis=-1, keepdims=True)


@needs_build
def test_causal_softmax_equals_the_masked_softmax():
    scores = _scores()
    weights, top, total = _kernels().causal_softmax(scores, mx.array(LEFT_PAD, dtype=mx.int32), OFFSET)
    keep, weights_ref, top_ref, total_ref = _reference(scores, LEFT_PAD, OFFSET)
    assert (np.array(weights)[~keep] == 0).all()  # masked keys: exactly 0, never computed
    np.testing.assert_allclose(np.array(weights), weights_ref, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(np.array(top), top_ref, rtol=0, atol=0)
    np.testing.assert_allclose(np.array(total), total_ref, rtol=2e-6)
    # a query inside its row's padding sees only itself: one weight of exactly 1
    inside = np.array(weights)[2, :, 30 - OFFSET - 1]
    assert (inside.sum(axis=-1) == 1.0).all() and (inside[:, 30 - 1] == 1.0).all()


@needs_build
def test_causal_softmax_grad_is_the_scores_gradient_on_the_visible_keys_only():
    scores = _scores()
    pads = mx.array(LEFT_PAD, dtype=mx.int32)
    keep, weights_ref, _, _ = _reference(scores, LEFT_PAD, OFFSET)
    weights = mx.array(weights_ref.astype(np.float32))
    d_weights = mx.random.normal((B, H, Q, K), key=mx.random.key(2))
    row_dot = mx.random.normal((B, H, Q, 1), key=mx.random.key(3))
    d_scores = np.array(_kernels().causal_softmax_grad(weights, d_weights, row_dot, pads, OFFSET))
    expected = np.array(weights) * (np.array(d_weights) - np.array(row_dot))
    np.testing.assert_allclose(d_scores, expected, rtol=1e-6, atol=1e-7)
    assert (d_scores[~keep] == 0).all()


@needs_build
def test_kernels_donate_buffers_only_when_free_and_never_change_their_inputs():
    scores = _scores()
    kept = np.array(scores)
    weights, _, _ = _kernels().causal_softmax(scores, mx.zeros((B,), dtype=mx.int32), OFFSET)
    mx.eval(weights)
    np.testing.assert_array_equal(np.array(scores), kept)  # still referenced here: not overwritten


@needs_build
def test_the_build_is_cached_and_reused():
    _kernels()
    first = native.build(quiet=True)
    stamp = first.stat().st_mtime_ns
    assert native.build(quiet=True) == first and first.stat().st_mtime_ns == stamp


def test_switched_off_or_failing_builds_fall_back_with_a_reason(monkeypatch, tmp_path):
    saved = dict(native._state)
    try:
        native._state.clear()
        monkeypatch.setenv("MLX_DPO_NATIVE", "0")
        assert native.kernels() is None and "MLX_DPO_NATIVE=0" in native.status()

        native._state.clear()
        monkeypatch.setenv("MLX_DPO_NATIVE", "1")
        monkeypatch.setenv("MLX_DPO_NATIVE_DIR", str(tmp_path))
        monkeypatch.setenv("CXX", "false")  # a compiler that always fails
        assert native.kernels() is None
        assert "build failed" in native.status() and "MLX ops" in native.status()
        log = next(tmp_path.glob("*/build.log"))
        assert log.read_text().startswith("false ")
    finally:
        native._state.clear()
        native._state.update(saved)
