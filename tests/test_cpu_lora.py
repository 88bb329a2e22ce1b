"""The addmm LoRA layer (mlx_dpo/cpu_lora.py) computes what mlx-lm's LoRALinear computes, values
and gradients, keeps its parameters, and steps aside outside mlx-dpo's CPU fast path."""
from __future__ import annotations

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.tuner.lora import LoRALinear

from mlx_dpo import cpu_kernels, cpu_lora, native
from test_native import needs_build  # tests/ is on sys.path (no package)


def _pair(bias: bool, dropout: float = 0.0):
    """An mlx-lm LoRALinear with a non-zero B, and a copy turned into the addmm class. Seeded: the
    layer draws its weights from the global generator, and with weights that depended on which tests
    ran before, the loss (a sum with cancellation) once came out 2.7e-5 apart, relative."""
    mx.random.seed(0)
    theirs = LoRALinear(24, 40, r=4, scale=3.0, bias=bias, dropout=dropout)
    theirs.lora_b = mx.random.normal((4, 40), key=mx.random.key(1)) * 0.1
    ours = LoRALinear(24, 40, r=4, scale=3.0, bias=bias, dropout=dropout)
    ours.update(theirs.parameters())
    ours.freeze()
    ours.unfreeze(keys=["lora_a", "lora_b"])
    theirs.freeze()
    theirs.unfreeze(keys=["lora_a", "lora_b"])
    holder = nn.Sequential(ours)
    assert cpu_lora.use_addmm(holder) == 1
    assert type(ours) is cpu_lora.AddmmLoRALinear
    return ours, theirs


def _loss_and_grads(layer, x, weights):
    def loss(params, x):
        layer.update(params)
        return (layer(x) * weights).sum()

    return mx.value_and_grad(loss, argnums=(0, 1))(layer.trainable_parameters(), x)


class _Host(nn.Module):
    """Stands in for a model: `installed` looks for fast functions in its module and finds none,
    which leaves the LoRA switch alone."""


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kernels", [pytest.param("c++", marks=needs_build), "addmm"])
def test_addmm_lora_equals_mlx_lm_values_and_gradients(bias, kernels, monkeypatch):
    """Through mlx-dpo's C++ LoRA kernels (on a machine that builds them, where they must build),
    and through mx.addmm (their fallback, MLX_DPO_NATIVE_LORA=0)."""
    if kernels == "addmm":
        monkeypatch.setenv("MLX_DPO_NATIVE_LORA", "0")
    else:
        assert native.kernels() is not None, native.status()
    used = []
    find = cpu_lora._lora_kernels
    monkeypatch.setattr(cpu_lora, "_lora_kernels", lambda a: used.append(find(a)) or used[-1])
    ours, theirs = _pair(bias)
    x = mx.random.normal((2, 7, 24), key=mx.random.key(2))
    weights = mx.random.normal((2, 7, 40), key=mx.random.key(3))
    calls = []
    original = cpu_lora._lora_linear
    cpu_lora._lora_linear = lambda *a: calls.append(1) or original(*a)
    try:
        with cpu_kernels.installed(_Host()):
            value, (grads, d_x) = _loss_and_grads(ours, x, weights)
    finally:
        cpu_lora._lora_linear = original
    assert calls, "the fused path did not run inside installed()"
    assert used and all((k is not None) == (kernels == "c++") for k in used), used
    their_value, (their_grads, their_d_x) = _loss_and_grads(theirs, x, weights)
    np.testing.assert_allclose(float(value), float(their_value), rtol=1e-5)
    np.testing.assert_allclose(np.array(d_x), np.array(their_d_x), rtol=1e-4, atol=1e-5)
    for (name, g), (_, h) in zip(tree_flatten(grads), tree_flatten(their_grads)):
        np.testing.assert_allclose(np.array(g), np.array(h), rtol=1e-4, atol=1e-5, err_msg=name)
        assert float(mx.abs(h).max()) > 1e-2, name  # real gradients, not zeros
    assert sorted(k for k, _ in tree_flatten(ours.parameters())) == \
        sorted(k for k, _ in tree_flatten(theirs.parameters()))


def test_zeroed_scale_gives_the_base_linear():
    ours, _ = _pair(bias=False)
    x = mx.random.normal((5, 24), key=mx.random.key(4))
    ours.scale = 0.0
    with cpu_kernels.installed(_Host()):
        out = ours(x)
    np.testing.assert_allclose(np.array(out), np.array(x @ ours.linear.weight.T), rtol=1e-5, atol=1e-6)


def test_outside_the_fast_path_and_with_dropout_mlx_lm_runs(monkeypatch):
    fused = []
    monkeypatch.setattr(cpu_lora, "_lora_linear", lambda *a: fused.append(1))
    ours, theirs = _pair(bias=False)
    x = mx.random.normal((5, 24), key=mx.random.key(5))
    np.testing.assert_allclose(np.array(ours(x)), np.array(theirs(x)), rtol=1e-6)  # not installed
    dropping, _ = _pair(bias=False, dropout=0.5)
    with cpu_kernels.installed(_Host()):
        dropping.train()
        dropping(x)
        ours.linear.weight = ours.linear.weight.astype(mx.float16)  # half precision base
        ours(x)
    assert not fused
