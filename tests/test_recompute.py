"""Recomputation in the backward (mlx_dpo/recompute.py and its users) gives the gradients of the
plain computation and actually frees memory under the evaluation width mlx-dpo sets on the CPU."""
from __future__ import annotations

import sys

import numpy as np
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models import activations
from mlx_lm.models.llama import MLP, ModelArgs
from mlx_lm.tuner.lora import LoRALinear

from mlx_dpo import cpu_attention, cpu_kernels, cpu_lora, recompute
from mlx_dpo.cpu_attention import CausalMask
from test_cpu_kernels import _peak_in_arrays

T, D, H = 256, 32, 512
swiglu = activations.swiglu  # what cpu_lora looks for in an MLP's module


def _assert_trees_close(ours, theirs, **tol):
    ours, theirs = dict(tree_flatten(ours)), dict(tree_flatten(theirs))
    assert ours.keys() == theirs.keys()
    for name in theirs:
        np.testing.assert_allclose(np.array(ours[name]), np.array(theirs[name]), err_msg=name, **tol)


# -- recompute.checkpoint ------------------------------------------------------------------------------

def _block(params, x):
    return x + nn.silu(x @ params["a"]) @ params["a"].T


def _stack_grads(layers: int, wrap):
    params = [{"a": mx.random.normal((D, H), key=mx.random.key(i)) * 0.1} for i in range(layers)]
    x = mx.random.normal((T, D), key=mx.random.key(99))
    mx.eval(params, x)

    def loss(params, x):
        for p in params:
            x = wrap(_block)(p, x)
        return x.sum()

    return lambda: mx.grad(loss)(params, x)


def test_checkpoint_gives_the_plain_gradients():
    _assert_trees_close(_stack_grads(4, recompute.checkpoint)(), _stack_grads(4, lambda f: f)(), rtol=1e-5, atol=1e-6)


def test_checkpoint_without_parameters():  # a block with nothing to train still passes gradients on
    x = mx.array([1.0, -2.0])
    grad = mx.grad(lambda x: recompute.checkpoint(lambda params, x: mx.sin(x))({}, x).sum())(x)
    np.testing.assert_allclose(np.array(grad), np.cos(np.array([1.0, -2.0])), rtol=1e-6)


def test_checkpointed_peak_does_not_grow_with_depth():
    # Each block's parameter gradient is made as the backward passes it, so recomputed activations
    # never pile up. mx.checkpoint's gradients may wait for the end of the backward, holding each
    # block's (T x H) inputs until then: ~2.7 such arrays more per block here.
    def growth(wrap):  # from 6 blocks to 24, less the 18 more (D x H) gradients themselves
        deeper = _peak_in_arrays(_stack_grads(24, wrap), T * H * 4) - _peak_in_arrays(_stack_grads(6, wrap), T * H * 4)
        return deeper - 18 * D / T

    assert growth(recompute.checkpoint) < 1.5
    assert growth(mx.checkpoint) > 20  # what the test would see without the ordering


# -- attention's softmax, recomputed in blocks -----------------------------------------------------

def _attention_chain(attend, layers=8, heads=2, d=8):
    q = mx.random.normal((1, heads, T, d), key=mx.random.key(1)) * 0.5
    mx.eval(q)

    def loss(q):
        x = q
        for _ in range(layers):
            x = x + 0.5 * attend(x, x, x, 0.3, CausalMask(0), T)
        return (x * mx.sin(mx.arange(d, dtype=mx.float32))).sum()

    grad = mx.compile(mx.grad(loss))  # as in training: the fast exp's steps fused, not each an array
    return lambda: grad(q)


def test_blocked_attention_recomputes_its_softmax_in_the_backward():
    blocked = _attention_chain(cpu_attention.blocked_attention)
    kept = _attention_chain(cpu_attention.kept_blocks_attention)
    np.testing.assert_allclose(np.array(blocked()), np.array(kept()), rtol=1e-4, atol=1e-3)  # entries up to ~6e3

    def growth(attend):  # from 2 layers to 8, in one layer's (heads x T x T) scores
        scores = 2 * T * T * 4
        return (_peak_in_arrays(_attention_chain(attend, 8), scores)
                - _peak_in_arrays(_attention_chain(attend, 2), scores))

    # Kept: each layer's softmax lives until the backward reaches it. Blocked: the backward's
    # recomputation waits for its cotangent, so no layer's scores outlive its own backward.
    assert growth(cpu_attention.kept_blocks_attention) > 5
    assert growth(cpu_attention.blocked_attention) < 1


def test_recompute_attention_takes_blocks_below_the_threshold(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_attention, "blocked_attention", lambda *a: calls.append(a[-1]) or a[0])
    monkeypatch.setattr(cpu_attention, "attention_block", lambda: 4)
    q = mx.zeros((1, 2, 8, 4))
    with cpu_kernels.installed(nn.Module(), recompute=True, recompute_attention=False):
        cpu_attention.attention(q, q, q, None, scale=1.0, mask="causal")
    assert calls == []
    with cpu_kernels.installed(nn.Module(), recompute=False, recompute_attention=True):
        cpu_attention.attention(q, q, q, None, scale=1.0, mask="causal")
    assert calls == [4]


# -- the SwiGLU product, recomputed for a LoRA down projection ----------------------------------------

def _lora_mlp(seed: int = 0, cls=MLP):
    mx.random.seed(seed)
    mlp = cls(ModelArgs(model_type="llama", hidden_size=D, num_hidden_layers=1, intermediate_size=H,
                        num_attention_heads=4, rms_norm_eps=1e-5, vocab_size=64))
    for name in ("gate_proj", "up_proj", "down_proj"):
        lora = LoRALinear.from_base(getattr(mlp, name), r=4, scale=2.0)
        lora.lora_b = mx.random.normal(lora.lora_b.shape, key=mx.random.key(seed + 7)) * 0.1  # a non-zero branch
        setattr(mlp, name, lora)
    mlp.freeze()
    mlp.unfreeze(keys=["lora_a", "lora_b"])
    return mlp


def _mlp_grads(mlps, x):
    def loss(params, x):
        for mlp, p in zip(mlps, params):
            mlp.update(p)
            x = x + mlp(x)
        return (x * mx.cos(mx.arange(D, dtype=mx.float32))).sum()

    return mx.value_and_grad(loss, argnums=(0, 1))([m.trainable_parameters() for m in mlps], x)


def test_recomputing_mlp_gives_mlx_lm_values_and_gradients():
    ours, theirs = _lora_mlp(), _lora_mlp()
    cpu_lora.use_addmm(ours)
    assert type(ours).__name__ == "RecomputingMLP"
    x = mx.random.normal((2, 9, D), key=mx.random.key(3))
    calls = []
    original = cpu_lora._swiglu_lora_down
    cpu_lora._swiglu_lora_down = lambda *a: calls.append(1) or original(*a)
    try:
        with cpu_kernels.installed(nn.Module(), recompute=True):
            value, grads = _mlp_grads([ours], x)
    finally:
        cpu_lora._swiglu_lora_down = original
    assert calls, "the recomputing path did not run"
    their_value, their_grads = _mlp_grads([theirs], x)
    np.testing.assert_allclose(float(value), float(their_value), rtol=1e-5)
    _assert_trees_close(grads, their_grads, rtol=1e-4, atol=1e-5)


def test_recomputing_mlp_frees_the_swiglu_product():
    mlps = [_lora_mlp(seed) for seed in range(8)]
    for mlp in mlps:
        cpu_lora.use_addmm(mlp)
    x = mx.random.normal((T, D), key=mx.random.key(3))

    def peak(recompute_on: bool) -> float:
        with cpu_kernels.installed(nn.Module(), recompute=recompute_on):
            return _peak_in_arrays(lambda: _mlp_grads(mlps, x), T * H * 4)

    # Kept: each of the 8 layers holds gate, up and their product until the backward.
    assert peak(False) - peak(True) > 6


class _SwappedMLP(MLP):
    """Claims SwiGLU but feeds it the other way round: not what the recomputing path computes."""

    def __call__(self, x):
        return self.down_proj(swiglu(self.up_proj(x), self.gate_proj(x)))


def test_only_mlps_that_compute_down_of_swiglu_are_recomputed():
    swapped = _lora_mlp(cls=_SwappedMLP)
    assert getattr(sys.modules[__name__], "swiglu") is activations.swiglu
    cpu_lora.use_addmm(swapped)
    assert type(swapped) is _SwappedMLP  # rejected by the check on three tokens

    class Plain(nn.Module):  # no LoRA projections
        def __init__(self):
            super().__init__()
            self.gate_proj = self.up_proj = self.down_proj = nn.Linear(4, 4)

    plain = Plain()
    cpu_lora.use_addmm(plain)
    assert type(plain) is Plain


def test_lora_on_some_layers_recomputes_only_those():
    # mlx-lm puts LoRA on the last N blocks: MLPs of one class, with and without it.
    model = nn.Module()
    model.layers = [MLP(ModelArgs(model_type="llama", hidden_size=D, num_hidden_layers=1, intermediate_size=H,
                                  num_attention_heads=4, rms_norm_eps=1e-5, vocab_size=64)), _lora_mlp()]
    cpu_lora.use_addmm(model)
    assert [type(m).__name__ for m in model.layers] == ["MLP", "RecomputingMLP"]


def test_engine_step_is_the_same_with_and_without_recomputation(make_config):
    from mlx_dpo.data.batching import collate
    from mlx_dpo.data.pipeline import prepare_data
    from mlx_dpo.engines.mlx_engine import MLXEngine

    engines = [MLXEngine(make_config(**{"compute.recompute_activations": flag, "compute.recompute_attention": flag,
                                        "compute.attention_block": 4}))
               for flag in (True, False)]
    assert any(type(m).__name__.startswith("Recomputing") for _, m in engines[0].models.policy.named_modules())
    pairs = prepare_data(engines[0].cfg, engines[0].tokenizer).train.pairs[:4]
    stats = [e.forward_backward(collate(pairs, 0), 4) for e in engines]
    np.testing.assert_allclose(stats[0]["loss"], stats[1]["loss"], rtol=1e-5)
    grads = [e._grads for e in engines]
    _assert_trees_close(grads[0], grads[1], rtol=1e-3, atol=1e-6)
