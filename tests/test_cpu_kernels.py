"""The CPU kernels (mlx_dpo/cpu_kernels.py) compute what mlx-lm and MLX compute, values and
gradients, and are only in place inside `installed`."""
from __future__ import annotations

import numpy as np
import pytest

import mlx.core as mx
from mlx_lm.models import activations, base, llama

from mlx_dpo import cpu_attention, cpu_kernels


def test_exp_is_as_accurate_as_mlx_exp_across_its_range():
    x = np.linspace(-87.0, 0.0, 200_001).astype(np.float32)
    want = np.exp(x.astype(np.float64))
    ours = np.array(mx.compile(cpu_kernels.fast_exp_nonpositive)(mx.array(x)), dtype=np.float64)
    theirs = np.array(mx.exp(mx.array(x)), dtype=np.float64)
    for low in (-80.0, -20.0, -1.0):  # float32 range reduction: the error grows with |x|, for both
        keep = x >= low
        ours_err = np.max(np.abs(ours - want)[keep] / want[keep])
        theirs_err = np.max(np.abs(theirs - want)[keep] / want[keep])
        assert ours_err <= 1.2 * theirs_err + 1e-7, (low, ours_err, theirs_err)
    assert np.max(np.abs(ours - want)[x >= -1] / want[x >= -1]) < 2e-7
    # Far below (and masked scores at -1e30) the result is exactly 0, never a denormal or NaN.
    tiny = np.array(cpu_kernels.fast_exp_nonpositive(mx.array([-88.0, -100.0, -1e30], dtype=mx.float32)))
    assert np.all(tiny == 0.0)
    assert np.isnan(np.array(cpu_kernels.fast_exp_nonpositive(mx.array([np.nan], dtype=mx.float32)))[0])


def test_exp_gradient_is_exp():
    x = -mx.abs(mx.random.normal((1000,), key=mx.random.key(1))) * 4
    grad = mx.grad(lambda v: (cpu_kernels.exp_nonpositive(v) * mx.arange(1000)).sum())(x)
    np.testing.assert_allclose(np.array(grad), np.array(mx.exp(x) * mx.arange(1000)), rtol=1e-6)


def _grads(fn, *args):
    weights = mx.random.normal(fn(*args).shape, key=mx.random.key(7))
    return mx.grad(lambda *a: (fn(*a) * weights).sum(), argnums=tuple(range(len(args))))(*args)


def test_swiglu_equals_mlx_lm_values_and_gradients():
    gate = mx.random.normal((3, 17, 64), key=mx.random.key(2)) * 12  # saturated both ways
    up = mx.random.normal((3, 17, 64), key=mx.random.key(3))
    np.testing.assert_allclose(np.array(cpu_kernels.swiglu(gate, up)), np.array(activations.swiglu(gate, up)),
                               rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(_grads(cpu_kernels.swiglu, gate, up), _grads(activations.swiglu, gate, up)):
        np.testing.assert_allclose(np.array(ours), np.array(theirs), rtol=1e-5, atol=1e-5)


def test_target_logps_equal_mlx_and_are_fast_only_inside_installed(tiny_model):
    import mlx_lm

    x = mx.random.normal((3, 5, 700), key=mx.random.key(8)) * 6
    targets = mx.random.randint(0, 700, (3, 5), key=mx.random.key(9))
    weights = mx.arange(15).reshape(3, 5) - 6.0  # cotangents of both signs

    def loss(a):
        return (cpu_kernels.target_logps(a, targets) * weights).sum()

    def native(a):
        log_softmax = a - mx.logsumexp(a, axis=-1, keepdims=True)
        return (mx.take_along_axis(log_softmax, targets[..., None], axis=-1).squeeze(-1) * weights).sum()

    with cpu_kernels.installed(mlx_lm.load(str(tiny_model))[0]):
        fast, fast_grad = mx.value_and_grad(loss)(x)
        # the log-partition output's own gradient (softmax) is right too
        lse_grad = mx.grad(lambda a: cpu_kernels._target_logps(a, targets)[1].sum())(x)
    native_value, native_grad = mx.value_and_grad(native)(x)
    np.testing.assert_allclose(float(fast), float(native_value), rtol=1e-6)
    np.testing.assert_allclose(np.array(fast_grad), np.array(native_grad), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.array(lse_grad), np.array(mx.softmax(x, axis=-1)), atol=1e-6)
    assert float(mx.abs(native_grad).max()) > 0.5
    assert not cpu_kernels._ACTIVE.get()
    outside, _ = mx.value_and_grad(loss)(x)  # MLX's own ops outside `installed`
    np.testing.assert_allclose(float(outside), float(native_value), rtol=1e-6)


def test_installed_swaps_the_model_module_only_inside_and_keeps_logits(tiny_model):
    import mlx_lm

    model, _ = mlx_lm.load(str(tiny_model))
    tokens = mx.array([[5, 9, 12, 7, 30, 8, 11]])
    outside = model(tokens)
    with cpu_kernels.installed(model):
        assert llama.swiglu is cpu_kernels.swiglu
        assert llama.scaled_dot_product_attention is cpu_attention.attention
        inside = model(tokens)
    assert llama.swiglu is activations.swiglu
    assert llama.scaled_dot_product_attention is base.scaled_dot_product_attention
    np.testing.assert_allclose(np.array(inside), np.array(outside), atol=1e-5)
    with cpu_kernels.installed(model, enabled=False):
        assert llama.swiglu is activations.swiglu


@pytest.mark.parametrize("n", [7, 24, 256, 1240, 49152])
def test_row_max_is_mlx_max_exactly(n):
    x = mx.random.normal((3, 5, n), key=mx.random.key(n)) * 50
    x = mx.where(mx.arange(n) % 3 == 0, -1e30, x)  # masked scores, as attention has them
    np.testing.assert_array_equal(np.array(cpu_kernels.row_max(x)), np.array(x.max(axis=-1, keepdims=True)))
    with_nan = mx.where(mx.arange(n) == n - 1, float("nan"), x)
    assert np.isnan(np.array(cpu_kernels.row_max(with_nan))).all()


@pytest.mark.parametrize("n", [7, 24, 48, 1240, 49152])  # no lanes, 8, 16, 8 and 32 lanes
def test_row_sum_is_the_sum_in_float64_to_float32_rounding(n):
    x = mx.random.uniform(shape=(3, 5, n), key=mx.random.key(n))  # softmax weights are in [0, 1]
    x = mx.where(mx.arange(n) % 3 == 0, 0.0, x)
    exact = np.array(x).astype(np.float64).sum(axis=-1, keepdims=True)
    np.testing.assert_allclose(np.array(cpu_kernels.row_sum(x)), exact, rtol=2e-6)
    assert cpu_kernels.row_sum(x).shape == (3, 5, 1)
    grad = mx.grad(lambda a: (cpu_kernels.row_sum(a) * mx.arange(15.0).reshape(3, 5, 1)).sum())(x)
    np.testing.assert_array_equal(np.array(grad), np.broadcast_to(np.arange(15.0).reshape(3, 5, 1), x.shape))


def test_target_logps_backward_keeps_one_vocabulary_array_not_the_logits():
    # The backward reuses the forward's exp(logits - max): the logits die with the forward and no
    # second exp runs. A compiled value-and-grad of the head peaked at five logits-sized arrays
    # when the backward recomputed the softmax from the logits; it is four now.
    n, vocab, width = 64, 8192, 32
    w = mx.random.normal((vocab, width), key=mx.random.key(1)) * 0.1
    x = mx.random.normal((n, width), key=mx.random.key(2))
    targets = mx.random.randint(0, vocab, (n,), key=mx.random.key(3))
    mx.eval(w, x, targets)
    step = mx.compile(mx.grad(lambda a: cpu_kernels._target_logps(a @ w.T, targets)[0].sum()))
    arrays = _peak_in_arrays(lambda: step(x), n * vocab * 4)
    assert arrays < 4.5, f"peak of {arrays:.2f} logits-sized arrays"


def test_eager_target_logps_fuse_their_exp(tiny_model):
    # Reference log-probs and evaluation run outside the compiled step; the fast exp's ops then
    # still fuse instead of each writing a vocabulary-wide array.
    import mlx_lm

    logits = mx.random.normal((64, 8192), key=mx.random.key(4))
    targets = mx.random.randint(0, 8192, (64,), key=mx.random.key(5))
    mx.eval(logits, targets)
    with cpu_kernels.installed(mlx_lm.load(str(tiny_model))[0]):
        arrays = _peak_in_arrays(lambda: cpu_kernels.target_logps(logits, targets), logits.nbytes)
    assert arrays < 3.5, f"peak of {arrays:.2f} logits-sized arrays"


def _peak_in_arrays(run, nbytes: int) -> float:
    """MLX's peak memory while evaluating run() (its second call: traces and caches warm), above
    what was alive before, in arrays of `nbytes`."""
    for _ in range(2):
        before = mx.get_active_memory()
        mx.reset_peak_memory()
        mx.eval(run())
    return (mx.get_peak_memory() - before) / nbytes
