"""cpu_layers: a model's RMSNorm, RoPE and SwiGLU take the C++ kernels inside mlx-dpo's CPU passes,
give the numbers and gradients that MLX's ops give, and are MLX's own everywhere else."""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_dpo import cpu_kernels, cpu_layers, native
from mlx_dpo.completion import _RestartableRope, _RestartOffset

from test_native import needs_build  # tests/ is on sys.path (no package)


class _Spy:
    """native.kernels()'s module, recording which kernels are asked for."""

    def __init__(self, module):
        self.module, self.used = module, set()

    def __getattr__(self, name):
        self.used.add(name)
        return getattr(self.module, name)


@pytest.fixture
def spy(monkeypatch):
    module = native.kernels()
    assert module is not None, native.status()
    recorder = _Spy(module)
    monkeypatch.setattr(native, "kernels", lambda: recorder)
    return recorder


def _model(tiny_model):
    model = mlx_lm.load(str(tiny_model))[0]
    assert cpu_layers.use_native_layers(model) == 2 * 2 + 1 + 2  # two norms a layer, the last one, a RoPE a layer
    return model


def _loss_and_grads(model, tokens):
    def loss(params):
        model.update(params)
        return model(tokens).astype(mx.float32).square().mean()

    value, grads = mx.value_and_grad(loss)(model.trainable_parameters())
    return value, dict(tree_flatten(grads))


def test_only_plain_norms_and_ropes_change_class():
    class OwnRoPE(nn.RoPE):
        pass

    model = nn.Sequential(nn.RMSNorm(8), OwnRoPE(8), nn.RoPE(8), nn.LayerNorm(8))
    assert cpu_layers.use_native_layers(model) == 2
    assert [type(m).__name__ for m in model.layers] == ["NativeRMSNorm", "OwnRoPE", "NativeRoPE", "LayerNorm"]


@needs_build
def test_a_model_step_uses_the_kernels_and_matches_mlx_ops(tiny_model, spy, monkeypatch):
    model = _model(tiny_model)
    tokens = mx.array([[5, 9, 14, 3, 22, 7, 11, 2]])
    with cpu_kernels.installed(model):
        value, grads = _loss_and_grads(model, tokens)
        mx.eval(value, grads)
    assert {"rms_norm", "rms_norm_grad", "rope", "swiglu", "swiglu_grad"} <= spy.used

    monkeypatch.setattr(native, "kernels", lambda: None)  # the same step on MLX ops alone
    with cpu_kernels.installed(model):
        value_ref, grads_ref = _loss_and_grads(model, tokens)
    np.testing.assert_allclose(value.item(), value_ref.item(), rtol=1e-5)
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads.items():  # norm weights included: their gradient comes from the kernel
        np.testing.assert_allclose(np.array(grad), np.array(grads_ref[name]), rtol=2e-4, atol=2e-6, err_msg=name)


@needs_build
def test_outside_mlx_dpo_passes_the_layers_are_mlx_s_own(tiny_model, spy):
    model = _model(tiny_model)
    plain = mlx_lm.load(str(tiny_model))[0]
    tokens = mx.array([[5, 9, 14, 3]])
    np.testing.assert_array_equal(np.array(model(tokens)), np.array(plain(tokens)))
    assert not spy.used


@needs_build
def test_shared_prompt_rope_restarts_in_one_pass(spy):
    rope = nn.RoPE(16, base=10000.0)
    native_rope = nn.RoPE(16, base=10000.0)
    cpu_layers.use_native_layers(native_rope)
    x = mx.random.normal((2, 30, 3, 16), key=mx.random.key(0)).transpose(0, 2, 1, 3)
    cotangent = mx.random.normal(x.shape, key=mx.random.key(1))
    offset = _RestartOffset(20, 12)  # columns 20.. get positions 12..

    def run(module):
        with cpu_kernels.installed(nn.Linear(1, 1)):
            return mx.vjp(lambda x: _RestartableRope(module)(x, offset=offset), [x], [cotangent])

    (out, ), (grad, ) = run(native_rope)
    assert spy.used == {"rope"}
    (out_ref, ), (grad_ref, ) = run(rope)
    np.testing.assert_allclose(np.array(out), np.array(out_ref), rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(np.array(grad), np.array(grad_ref), rtol=1e-5, atol=2e-5)
