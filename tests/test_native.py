"""mlx-dpo's C++ kernels (mlx_dpo/native.py, mlx_dpo/csrc/): they build on a Linux machine with a
compiler, compute what MLX ops compute (the masked softmax, RMSNorm, SwiGLU, RoPE, and their
gradients), and a machine without them falls back
with a reason instead of failing."""
from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections import defaultdict

import numpy as np
import pytest

import mlx.core as mx

from mlx_dpo import blas_kernels, native
from mlx_dpo.cpu_attention import NO_SPLIT, CausalMask
from mlx_dpo.cpu_layers import NO_RESTART

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


def _grads(fn, primals, cotangents):
    return mx.vjp(fn, primals, cotangents)


@needs_build
def test_rms_norm_and_its_gradient_equal_mlx_fast_rms_norm():
    x = mx.random.normal((2, 37, 96), key=mx.random.key(4)) * 3.0
    weight = mx.random.normal((96,), key=mx.random.key(5))
    d_y = mx.random.normal(x.shape, key=mx.random.key(6))
    (y_ref,), (dx_ref, dw_ref) = _grads(lambda x, w: mx.fast.rms_norm(x, w, 1e-5), [x, weight], [d_y])
    y, inv = _kernels().rms_norm(x, weight, 1e-5)
    assert inv.shape == (2, 37, 1)
    np.testing.assert_allclose(np.array(y), np.array(y_ref), rtol=1e-5, atol=1e-6)
    dx, dw = _kernels().rms_norm_grad(x, weight, inv, d_y)
    np.testing.assert_allclose(np.array(dx), np.array(dx_ref), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.array(dw), np.array(dw_ref), rtol=1e-5, atol=1e-5)


@needs_build
def test_swiglu_and_its_gradient_equal_the_formula():
    gate = mx.random.normal((5, 70, 48), key=mx.random.key(7)) * 6.0  # both signs, saturated sigmoids
    up = mx.random.normal(gate.shape, key=mx.random.key(8))
    d_out = mx.random.normal(gate.shape, key=mx.random.key(9))
    (ref,), (dg_ref, du_ref) = _grads(lambda g, u: g * mx.sigmoid(g) * u, [gate, up], [d_out])
    np.testing.assert_allclose(np.array(_kernels().swiglu(gate, up)), np.array(ref), rtol=2e-6, atol=1e-6)
    d_gate, d_up = _kernels().swiglu_grad(gate, up, d_out)
    np.testing.assert_allclose(np.array(d_gate), np.array(dg_ref), rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(np.array(d_up), np.array(du_ref), rtol=2e-6, atol=1e-6)


def _rope_ref(x, offset):
    return mx.fast.rope(x, x.shape[-1], traditional=False, base=10000.0, scale=0.5, offset=offset)


@needs_build
@pytest.mark.parametrize("offset", [0, 17])
def test_rope_equals_mlx_fast_rope_and_its_backward_writes_the_projection_layout(offset):
    # (batch, heads, positions, size) as a transposed view of (batch, positions, heads, size), as
    # the model makes it
    x = mx.random.normal((2, 30, 3, 16), key=mx.random.key(10)).transpose(0, 2, 1, 3)
    cotangent = mx.random.normal(x.shape, key=mx.random.key(11))
    (ref,), (grad_ref,) = _grads(lambda x: _rope_ref(x, offset), [x], [cotangent])
    out = _kernels().rope(x, 10000.0, 0.5, offset, NO_RESTART, 0, False, False)
    np.testing.assert_allclose(np.array(out), np.array(ref), rtol=1e-5, atol=2e-5)
    grad = _kernels().rope(cotangent, 10000.0, 0.5, offset, NO_RESTART, 0, True, True)
    assert grad.shape == (2, 30, 3, 16)  # seq_major: (batch, positions, heads, size)
    np.testing.assert_allclose(np.array(grad.transpose(0, 2, 1, 3)), np.array(grad_ref), rtol=1e-5, atol=2e-5)


@needs_build
def test_rope_restarts_positions_at_the_split():
    x = mx.random.normal((1, 2, 40, 8), key=mx.random.key(12))
    expected = mx.concatenate([_rope_ref(x[:, :, :25], 0), _rope_ref(x[:, :, 25:], 9)], axis=2)
    out = _kernels().rope(x, 10000.0, 0.5, 0, 25, 9, False, False)
    np.testing.assert_allclose(np.array(out), np.array(expected), rtol=1e-5, atol=2e-5)


@needs_build
def test_row_softmax_is_the_shifted_exp_its_maximum_and_sum_over_whole_rows():
    x = mx.random.normal((7, 3000), key=mx.random.key(16)) * 8.0
    shifted_exp, top, total = _kernels().row_softmax(x)
    xs = np.array(x, dtype=np.float64)
    top_ref = xs.max(axis=-1, keepdims=True)
    np.testing.assert_array_equal(np.array(top), top_ref)
    np.testing.assert_allclose(np.array(shifted_exp), np.exp(xs - top_ref), rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(np.array(total), np.exp(xs - top_ref).sum(axis=-1, keepdims=True), rtol=1e-5)


@needs_build
@pytest.mark.parametrize("bias_correction", [True, False])
def test_adamw_is_mlx_adamw_bit_for_bit_and_keeps_everything_when_not_ok(bias_correction):
    import mlx.optimizers as optim

    from mlx_dpo.engines.mlx_fast import _adamw_scalars

    opt = optim.AdamW(learning_rate=3e-4, betas=[0.9, 0.99], eps=1e-8, weight_decay=0.05,
                      bias_correction=bias_correction)
    weight = mx.random.normal((5, 301), key=mx.random.key(17))
    opt.init({"w": weight})
    opt.state["step"] = opt.state["step"] + 3
    g, m, v = (mx.random.normal(weight.shape, key=mx.random.key(18 + i)) for i in range(3))
    m, v = m * 0.1, v.abs() * 0.01
    state = {"m": m, "v": v}
    expected = opt.apply_single(g * mx.array(0.7), weight, state)
    lr, corrections = _adamw_scalars(opt)
    args = (g, weight, m, v, lr, *corrections, mx.array(0.7))
    consts = (0.9, 1 - 0.9, 0.99, 1 - 0.99, 1e-8, 0.05)
    out = _kernels().adamw(*args, mx.array(True), *consts)
    for ours, theirs in zip(out, (expected, state["m"], state["v"])):
        np.testing.assert_array_equal(np.array(ours), np.array(theirs))
    kept = _kernels().adamw(*args, mx.array(False), *consts)
    for ours, before in zip(kept, (weight, m, v)):
        np.testing.assert_array_equal(np.array(ours), np.array(before))
    # in two parts (two CPU streams' gradients): added as mx.add adds them, so the same bits
    part = mx.random.normal(weight.shape, key=mx.random.key(22))
    two = _kernels().adamw(g - part, *args[1:], mx.array(True), *consts, gradient2=part)
    state = {"m": m, "v": v}
    expected = opt.apply_single(((g - part) + part) * mx.array(0.7), weight, state)
    for ours, theirs in zip(two, (expected, state["m"], state["v"])):
        np.testing.assert_array_equal(np.array(ours), np.array(theirs))


@needs_build
def test_sum_of_squares_is_the_float64_sum():
    x = mx.random.normal((1000, 777), key=mx.random.key(21)) * 3.0
    expected = (np.array(x, dtype=np.float64) ** 2).sum()
    np.testing.assert_allclose(_kernels().sum_of_squares(x).item(), expected, rtol=1e-7)
    y = mx.random.normal((1000, 777), key=mx.random.key(23))
    both = np.array(x - y, dtype=np.float32) + np.array(y)  # in float32, as the kernel adds them
    np.testing.assert_allclose(_kernels().sum_of_squares(x - y, y).item(), (both.astype(np.float64) ** 2).sum(),
                               rtol=1e-7)
    with pytest.raises(ValueError, match="one shape"):
        _kernels().sum_of_squares(x, y[:10])


def _masked_attention(q, k, v, keep):
    group = q.shape[1] // k.shape[1]
    k, v = mx.repeat(k, group, axis=1), mx.repeat(v, group, axis=1)
    return mx.softmax(mx.where(keep, q @ k.swapaxes(-1, -2), -mx.inf), axis=-1) @ v



@needs_build
@pytest.mark.parametrize("shape,offset,pads,shared", [
    ((2, 6, 2, 37, 37, 64), 0, [0, 5], None),         # grouped heads, a padded row
    ((1, 9, 3, 50, 90, 64), 40, [3], None),           # keys before the queries (an offset)
    ((2, 4, 4, 20, 33, 32), 13, [0, 30], None),       # queries inside the padding see only themselves
    ((1, 2, 1, 9, 9, 128), 0, [0], None),
    ((2, 9, 3, 70, 70, 64), 0, [0, 6], (20, 45)),     # [prompt | chosen | rejected] rows
    ((1, 4, 2, 41, 41, 32), 0, [2], (10, 25)),
    # more keys than the backward takes per pass (kKeyChunk, 512): spans cross the chunks' edges
    ((1, 2, 1, 600, 1100, 64), 500, [7], None),
    ((1, 3, 1, 1100, 1100, 32), 0, [5], (300, 700)),
])
def test_causal_attention_and_its_gradients_equal_the_masked_softmax(shape, offset, pads, shared):
    from mlx_dpo.cpu_attention import SharedPromptMask

    b, heads, kv_heads, t, s, d = shape
    keys = [mx.random.key(i) for i in range(22, 26)]
    q = mx.random.normal((b, heads, t, d), key=keys[0])
    k, v = (mx.random.normal((b, kv_heads, s, d), key=key) for key in keys[1:3])
    d_out = mx.random.normal(q.shape, key=keys[3])
    left_pad = mx.array(pads, dtype=mx.int32)
    if shared:
        keep, (prompt, split) = SharedPromptMask(*shared, left_pad).array(t), shared
    else:
        keep, prompt, split = CausalMask(offset, left_pad).keep(0, t, s), NO_SPLIT, NO_SPLIT
    (expected,), grads = mx.vjp(lambda q, k, v: _masked_attention(q, k, v, keep), [q, k, v], [d_out])
    out, top, total = _kernels().causal_attention(q, k, v, left_pad, offset, prompt, split)
    assert top.shape == total.shape == (b, heads, t, 1)
    np.testing.assert_allclose(np.array(out), np.array(expected), atol=2e-5)
    ours = _kernels().causal_attention_grad(q, k, v, out, top, total, d_out, left_pad, offset, prompt, split)
    for name, a, e in zip("qkv", ours, grads):
        scale = float(mx.abs(e).max())
        np.testing.assert_allclose(np.array(a), np.array(e), atol=1e-5 * max(scale, 1.0), err_msg=f"d_{name}")


@needs_build
def test_layer_kernels_leave_referenced_inputs_unchanged():
    x = mx.random.normal((4, 64), key=mx.random.key(13))
    up = mx.random.normal((4, 64), key=mx.random.key(14))
    d = mx.random.normal((4, 64), key=mx.random.key(15))
    kept = [np.array(a) for a in (x, up, d)]
    k = _kernels()
    mx.eval(k.rms_norm(x, mx.ones((64,)), 1e-5), k.swiglu(x, up), k.swiglu_grad(x, up, d))
    for array, before in zip((x, up, d), kept):
        np.testing.assert_array_equal(np.array(array), before)


@needs_build
def test_kernels_read_strided_views_as_their_values():
    """Transposes and broadcasts reach the primitives as views: read by value, not by buffer."""
    k = _kernels()
    gate = mx.random.normal((48, 30), key=mx.random.key(40)).T  # (30, 48), column-major
    up = mx.broadcast_to(mx.random.normal((1, 48), key=mx.random.key(41)), (30, 48))
    np.testing.assert_allclose(np.array(k.swiglu(gate, up)), np.array(k.swiglu(mx.array(np.array(gate)),
                                                                                mx.array(np.array(up)))))
    np.testing.assert_allclose(k.sum_of_squares(gate).item(), float((np.array(gate, dtype=np.float64) ** 2).sum()),
                               rtol=1e-6)
    x = mx.random.normal((64, 5), key=mx.random.key(42)).T
    y, _ = k.rms_norm(x, mx.ones((64,)), 1e-5)
    np.testing.assert_allclose(np.array(y), np.array(mx.fast.rms_norm(x, mx.ones((64,)), 1e-5)), rtol=1e-5, atol=1e-6)


@needs_build
def test_layer_kernels_reject_bad_shapes_and_dtypes():
    k = _kernels()
    with pytest.raises(ValueError, match="weight must be"):
        k.rms_norm(mx.zeros((2, 8)), mx.ones((4,)), 1e-5)
    with pytest.raises(ValueError, match="one shape"):
        k.swiglu(mx.zeros((2, 8)), mx.zeros((2, 4)))
    with pytest.raises(ValueError, match="head size"):
        k.causal_attention(mx.zeros((1, 2, 4, 48)), mx.zeros((1, 1, 4, 48)), mx.zeros((1, 1, 4, 48)),
                           mx.zeros((1,), dtype=mx.int32), 0, NO_SPLIT, NO_SPLIT)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        k.causal_attention(mx.zeros((1, 3, 4, 64)), mx.zeros((1, 2, 4, 64)), mx.zeros((1, 2, 4, 64)),
                           mx.zeros((1,), dtype=mx.int32), 0, NO_SPLIT, NO_SPLIT)
    with pytest.raises(ValueError, match="float32"):
        k.rope(mx.zeros((1, 1, 2, 4), dtype=mx.float16), 10000.0, 1.0, 0, NO_RESTART, 0, False, False)


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


@needs_build
@pytest.mark.parametrize("streams", [1, 2])
def test_guarded_update_takes_the_same_steps_through_the_fused_adamw(monkeypatch, streams):
    """With two CPU streams' gradient parts the fused kernels add them as they read them; the
    plain path adds them first: the steps must agree either way."""
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten

    from mlx_dpo.engines import mlx_fast

    def train(fused: bool):
        if not fused:
            monkeypatch.setattr(mlx_fast, "_fused_adamw", lambda optimizer: None)
        assert (mlx_fast._fused_adamw(optim.AdamW(1e-3)) is not None) == fused
        mx.random.seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 8))
        opt = optim.AdamW(learning_rate=1e-3, weight_decay=0.01, bias_correction=True)
        opt.init(model.trainable_parameters())
        norms = []
        for i in range(3):
            x = mx.random.normal((4, 16), key=mx.random.key(i))
            parts = [nn.value_and_grad(model, lambda x: model(x).square().sum())(x[mx.array(rows)])[1]
                     for rows in np.array_split(np.arange(4), streams)]
            if i == 2:  # a non-finite gradient: refused, nothing moves
                grads = parts[-1]
                parts[-1] = {**grads, "layers": [{**grads["layers"][0], "bias": grads["layers"][0]["bias"] * mx.inf},
                                                 grads["layers"][1]]}
            norm, ok = mlx_fast.guarded_update(opt, model, parts, max_norm=1.0)  # clipping: norms are > 1
            mx.eval(model.parameters(), opt.state)
            norms.append((norm.item(), ok.item()))
        return dict(tree_flatten(model.parameters())), norms, opt.state["step"].item()

    fused, fused_norms, fused_step = train(True)
    plain, plain_norms, plain_step = train(False)
    assert [ok for _, ok in fused_norms] == [True, True, False] and fused_step == plain_step == 2
    np.testing.assert_allclose([n for n, _ in fused_norms[:2]], [n for n, _ in plain_norms[:2]], rtol=1e-6)
    for name, weight in fused.items():
        np.testing.assert_allclose(np.array(weight), np.array(plain[name]), rtol=1e-6, atol=1e-7, err_msg=name)


@needs_build
@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 instruction-set flags")
@pytest.mark.parametrize("flags", ["-mno-avx512f", "-mno-avx512f -mno-avx2 -mno-fma"], ids=["avx2-tiles", "plain-c++"])
def test_builds_without_avx512_compute_the_same_attention_and_lora(flags, monkeypatch, tmp_path):
    """x86 machines without AVX-512 compile the attention's register tiles in AVX2 (csrc/simd.h),
    and machines with neither the kernels' plain C++ tiles: build them so here (extra compiler flags
    through MLX_DPO_NATIVE_CXXFLAGS) and check them against the masked softmax and LoRA's formulas."""
    monkeypatch.setenv("MLX_DPO_NATIVE_DIR", str(tmp_path))
    monkeypatch.setenv("MLX_DPO_NATIVE_CXXFLAGS", flags)
    portable = native._import(native.build(quiet=True))
    avx2 = {"avx2", "fma"} <= blas_kernels.cpu_flags() and "-mno-avx2" not in flags
    assert portable.vector_tiles == ("AVX2" if avx2 else "plain C++")  # the tiles the build was meant to take
    b, heads, kv_heads, t, d = 2, 4, 2, 37, 64
    keys = [mx.random.key(i) for i in range(30, 34)]
    q = mx.random.normal((b, heads, t, d), key=keys[0])
    k, v = (mx.random.normal((b, kv_heads, t, d), key=key) for key in keys[1:3])
    d_out = mx.random.normal(q.shape, key=keys[3])
    left_pad = mx.array([0, 5], dtype=mx.int32)
    keep = CausalMask(0, left_pad).keep(0, t, t)
    (expected,), grads = mx.vjp(lambda q, k, v: _masked_attention(q, k, v, keep), [q, k, v], [d_out])
    out, top, total = portable.causal_attention(q, k, v, left_pad, 0, NO_SPLIT, NO_SPLIT)
    np.testing.assert_allclose(np.array(out), np.array(expected), atol=2e-5)
    ours = portable.causal_attention_grad(q, k, v, out, top, total, d_out, left_pad, 0, NO_SPLIT, NO_SPLIT)
    for a, e in zip(ours, grads):
        np.testing.assert_allclose(np.array(a), np.array(e), atol=1e-5 * max(float(mx.abs(e).max()), 1.0))
    for rank in (8, 32):  # and the LoRA kernels' plain loops
        _check_lora(portable, rank)


def _check_lora(kernels, rank, tokens=13, inputs=40, outputs=24):
    """lora_low and lora_grad against their formulas on MLX ops: token counts and widths that
    leave partial row blocks and vector tails."""
    keys = [mx.random.key(i) for i in range(40, 44)]
    x, d_y = mx.random.normal((tokens, inputs), key=keys[0]), mx.random.normal((tokens, outputs), key=keys[1])
    a, b = mx.random.normal((inputs, rank), key=keys[2]), mx.random.normal((rank, outputs), key=keys[3])
    scale = mx.array([1.5])
    low, d_low = (x @ a) * 1.5, (d_y @ b.T) * 1.5
    np.testing.assert_allclose(np.array(kernels.lora_low(x, a, b, scale)), np.array(low @ b), rtol=1e-5, atol=1e-4)
    for ours, expected in zip(kernels.lora_grad(d_y, x, a, b, scale), (d_low @ a.T, x.T @ d_low, low.T @ d_y)):
        np.testing.assert_allclose(np.array(ours), np.array(expected), rtol=1e-5, atol=1e-4)


@needs_build
@pytest.mark.parametrize("rank", [4, 8, 16, 32, 64])
def test_lora_kernels_equal_their_formulas(rank):
    _check_lora(_kernels(), rank)
    _check_lora(_kernels(), rank, tokens=1, inputs=16, outputs=17)


@needs_build
def test_lora_kernels_reject_other_ranks_and_shapes():
    kernels = _kernels()
    x, scale = mx.ones((9, 32)), mx.array([0.5])
    with pytest.raises(ValueError, match="rank"):
        kernels.lora_low(x, mx.ones((32, 6)), mx.ones((6, 48)), scale)
    with pytest.raises(ValueError, match="x \\(tokens, in\\)"):
        kernels.lora_low(x, mx.ones((31, 8)), mx.ones((8, 48)), scale)
    with pytest.raises(ValueError, match="d_y"):
        kernels.lora_grad(mx.ones((9, 47)), x, mx.ones((32, 8)), mx.ones((8, 48)), scale)


@needs_build
def test_adamw_updates_weight_and_moments_in_place_when_nothing_else_holds_them():
    """A multi-output primitive's inputs are donated (common.h's `readable` drops the other
    outputs' copies of the input list): no new buffers for the three outputs."""
    n = 4_000_000  # 16 MB each
    g, p, m, v = (mx.random.normal((n,), key=mx.random.key(30 + i)) for i in range(4))
    mx.eval(g, p, m, v)
    one = mx.array(1.0)
    held = p  # a second owner: the kernel must not overwrite it
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    p, m, v = _kernels().adamw(g, p, m, v, mx.array(1e-3), mx.array(1e-3), one, one, mx.array(True),
                               0.9, 0.1, 0.999, 0.001, 1e-8, 0.0)
    mx.eval(p, m, v)
    assert mx.get_peak_memory() - before == pytest.approx(4 * n, rel=0.01)  # only the held weight is copied
    assert not np.array_equal(np.array(p), np.array(held))


def test_a_new_build_removes_only_stale_builds_of_this_module(tmp_path):
    def folder(name, files, age_days, used_age_days=None):
        path = tmp_path / name
        path.mkdir()
        for file in files:
            (path / file).touch()
        if used_age_days is not None:
            (path / "used").touch()
            stamp = time.time() - used_age_days * 86400
            os.utime(path / "used", (stamp, stamp))
        stamp = time.time() - age_days * 86400
        os.utime(path, (stamp, stamp))
        return path

    library = "_native.cpython-311-x86_64-linux-gnu.so"
    stale = folder("0123456789abcdef", [".lock", library], age_days=90, used_age_days=40)
    old_unmarked = folder("fedcba9876543210", [".lock", "build.log"], age_days=40)  # a build from before `used`
    in_use = folder("00112233445566aa", [".lock", library], age_days=90, used_age_days=1)
    new = folder("aabbccddeeff0011", [".lock", library], age_days=90, used_age_days=90)
    not_ours = folder("notes", ["todo.txt"], age_days=400)
    hex_but_not_a_build = folder("1111222233334444", ["data.bin"], age_days=400)

    native._prune_stale_builds(tmp_path, keep=new)

    assert not stale.exists() and not old_unmarked.exists()
    assert in_use.exists() and new.exists() and not_ours.exists() and hex_but_not_a_build.exists()


@needs_build
def test_loading_a_cached_build_records_its_use():
    _kernels()
    build_dir = native.build(quiet=True).parent
    used = build_dir / "used"
    os.utime(used, (0, 0))
    native.build(quiet=True)
    assert used.stat().st_mtime > time.time() - 60


@needs_build
def test_every_omp_simd_loop_of_the_kernels_vectorises(tmp_path):
    """Each `#pragma omp simd` loop that the compiler reports on (loops of templates that a build
    does not instantiate, such as the plain tiles where the vector tiles exist, have no report) is
    vectorised with the module's flags. Without -fno-trapping-math GCC left loops with float
    selects scalar on machines without AVX-512 (SwiGLU ran ~10x slower) and nothing failed."""
    failed = []
    for source in native._sources():
        lines = source.read_text().splitlines()
        loops = [i + 2 for i, line in enumerate(lines) if line.strip() == "#pragma omp simd"
                 or line.strip().startswith("#pragma omp simd ")]
        if not loops:
            continue
        flags = [f for f in native._flags() if f != "-shared"] + ["-c", "-fopt-info-vec-all"]
        done = subprocess.run(native.compile_command([source], tmp_path / "kernel.o", flags),
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        report = defaultdict(set)  # line -> what GCC said of a loop there
        for m in re.finditer(re.escape(source.name) + r":(\d+):\d+: (optimized: loop vectorized|missed: couldn't vectorize loop)",
                             done.stderr):
            report[int(m.group(1))].add(m.group(2).split(":")[0])
        for loop in loops:  # GCC names the loop's line or its body's first
            said = report[loop] | report[loop + 1]
            if "missed" in said and "optimized" not in said:
                failed.append(f"{source.name}:{loop}: {lines[loop - 1].strip()}")
    assert not failed, failed
