"""Frozen panels (csrc/frozen_gemm.cpp, compute.frozen_panels): LoRA's frozen products on weights
packed once for OpenBLAS's micro-kernel give the products MLX's addmm gives, take the panels
where they belong to the weight given, and fall back to plain OpenBLAS where they do not."""
from __future__ import annotations

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn

from mlx_dpo import cpu_kernels, cpu_lora, hardware, native
from test_cpu_lora import _Host, _loss_and_grads, _pair  # tests/ is on sys.path (no package)
from test_native import needs_build

pytestmark = needs_build


@pytest.fixture
def kernels():
    module = native.kernels()
    assert module is not None, native.status()
    # Debian's OpenBLAS, which the setup installs, exports its cores' kernels: they must be found
    assert module.frozen_kernels(), "OpenBLAS's sgemm micro-kernel and copy routines were not found"
    with hardware.openblas_threads(1):  # as inside MLX's CPU streams
        yield module


def _counted(kernels, fn):
    """fn()'s value, evaluated, and how many products ran on panels and fell back while it ran."""
    panel_before, fallback_before = kernels.frozen_counts()
    value = fn()
    mx.eval(value)
    panel_after, fallback_after = kernels.frozen_counts()
    return value, panel_after - panel_before, fallback_after - fallback_before


# (outputs, inputs, tokens): odd sizes, tails of every block (depth 384, rows 192, tokens 768
# per block in the kernel), one token, none
SHAPES = [(37, 45, 5), (200, 390, 1), (576, 1536, 800), (1536, 576, 13), (64, 64, 0)]


@pytest.mark.parametrize("out_dim,in_dim,tokens", SHAPES)
def test_products_on_panels_equal_addmm(kernels, out_dim, in_dim, tokens):
    keys = mx.random.split(mx.random.key(out_dim + tokens), 5)
    w = mx.random.normal((out_dim, in_dim), key=keys[0])
    x, dy = mx.random.normal((tokens, in_dim), key=keys[1]), mx.random.normal((tokens, out_dim), key=keys[2])
    c_y, c_x = mx.random.normal((tokens, out_dim), key=keys[3]), mx.random.normal((tokens, in_dim), key=keys[4])
    forward, backward = kernels.pack_frozen(w, True), kernels.pack_frozen(w, False)
    mx.eval(forward, backward)
    y, on_panels, fell_back = _counted(kernels, lambda: kernels.frozen_addmm(c_y, x, w, forward, True))
    d_x, on_panels_back, fell_back_back = _counted(kernels, lambda: kernels.frozen_addmm(c_x, dy, w, backward, False))
    np.testing.assert_allclose(np.array(y), np.array(mx.addmm(c_y, x, w.T)), rtol=2e-5, atol=2e-4)
    np.testing.assert_allclose(np.array(d_x), np.array(mx.addmm(c_x, dy, w)), rtol=2e-5, atol=2e-4)
    assert y.shape == (tokens, out_dim) and d_x.shape == (tokens, in_dim)
    products = 1 if tokens else 0  # no tokens: no product to run
    assert (on_panels, fell_back, on_panels_back, fell_back_back) == (products, 0, products, 0)


def test_panels_of_another_weight_or_more_threads_fall_back(kernels):
    keys = mx.random.split(mx.random.key(7), 4)
    w, other = mx.random.normal((48, 40), key=keys[0]), mx.random.normal((48, 40), key=keys[1])
    x, c = mx.random.normal((9, 40), key=keys[2]), mx.random.normal((9, 48), key=keys[3])
    panels = kernels.pack_frozen(w, True)
    mx.eval(panels)
    y, on_panels, fell_back = _counted(kernels, lambda: kernels.frozen_addmm(c, x, other, panels, True))
    np.testing.assert_allclose(np.array(y), np.array(c + x @ other.T), rtol=2e-5, atol=2e-4)
    assert (on_panels, fell_back) == (0, 1)  # made from w's buffer: not used for `other`
    with hardware.openblas_threads(2):  # OpenBLAS would split the product itself
        y, on_panels, fell_back = _counted(kernels, lambda: kernels.frozen_addmm(c, x, w, panels, True))
    np.testing.assert_allclose(np.array(y), np.array(c + x @ w.T), rtol=2e-5, atol=2e-4)
    assert (on_panels, fell_back) == (0, 1)
    backward_panels = kernels.pack_frozen(w, False)
    with pytest.raises(ValueError, match="another weight shape or product"):
        kernels.frozen_addmm(c, x, w, backward_panels, True)


def test_lora_layer_on_panels_equals_mlx_lm(kernels):
    ours, theirs = _pair(bias=False)
    size = cpu_lora.pack_frozen_weights(nn.Sequential(ours))
    assert size == ours.frozen_panels.nbytes >= 2 * ours.linear.weight.nbytes  # two layouts, rows padded to 16
    x = mx.random.normal((2, 7, 24), key=mx.random.key(2))
    weights = mx.random.normal((2, 7, 40), key=mx.random.key(3))
    with cpu_kernels.installed(_Host()):
        (value, (grads, d_x)), on_panels, fell_back = _counted(kernels, lambda: _loss_and_grads(ours, x, weights))
    assert (on_panels, fell_back) == (2, 0)  # the forward's product and the input gradient's
    their_value, (their_grads, their_d_x) = _loss_and_grads(theirs, x, weights)
    np.testing.assert_allclose(float(value), float(their_value), rtol=1e-5)
    np.testing.assert_allclose(np.array(d_x), np.array(their_d_x), rtol=1e-4, atol=1e-5)
    for name in ("lora_a", "lora_b"):
        np.testing.assert_allclose(np.array(grads[name]), np.array(their_grads[name]), rtol=1e-4, atol=1e-5)


def test_compiled_two_stream_step_on_panels_equals_the_step_without(make_config, kernels):
    from mlx.utils import tree_flatten

    from mlx_dpo.data.batching import collate
    from mlx_dpo.engines.mlx_engine import MLXEngine
    from test_perf_exactness import _pairs

    batch = collate(_pairs(5, n=4), pad_id=2)
    settings = {"compute.compile": True, "compute.cpu_streams": 2}
    on = MLXEngine(make_config(**settings, **{"compute.frozen_panels": True}))
    off = MLXEngine(make_config(**settings))
    assert any(note.startswith("frozen panels: ") and "packed once" in note for note in on.notes), on.notes
    assert not any(note.startswith("frozen panels") for note in off.notes)
    for _ in range(2):  # the second call runs the cached trace
        results = []
        for engine in (on, off):
            stats, on_panels, fell_back = _counted(kernels, lambda: engine.forward_backward(batch, 8))
            results.append((stats, {k: np.array(v) for k, v in tree_flatten(engine._grads)}, on_panels, fell_back))
            engine._grads = None
        (s_on, g_on, panels_on, fallback_on), (s_off, g_off, panels_off, _) = results
        assert panels_on > 0 and fallback_on == 0 and panels_off == 0
        for key in s_off:
            assert s_on[key] == pytest.approx(s_off[key], rel=1e-5, abs=1e-5), key
        for name in g_off:
            np.testing.assert_allclose(g_on[name], g_off[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_no_panels_where_the_kernels_disagree_with_mlx(make_config, kernels, monkeypatch):
    """An OpenBLAS core whose routines fail the start-up check gets no panels, and the run says so."""
    from mlx_dpo.engines.mlx_engine import MLXEngine

    monkeypatch.setattr(cpu_lora, "_checked", {"panels_agree": False})
    ours, _ = _pair(bias=False)
    assert cpu_lora.pack_frozen_weights(nn.Sequential(ours)) == 0 and not hasattr(ours, "frozen_panels")
    engine = MLXEngine(make_config(**{"compute.frozen_panels": True}))
    assert any(note.startswith("frozen panels: not available") for note in engine.notes), engine.notes
