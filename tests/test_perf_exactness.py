"""The hot path computes what the plain path computes: completion-only logits, the shared
prompt, mx.compile and the sync-free update change speed, never the numbers."""
from __future__ import annotations

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from mlx_dpo import head_logps
from mlx_dpo.completion import completion_logits, head_weight, make_plan, packed_plan, shared_plan
from mlx_dpo.data.batching import collate
from mlx_dpo.data.tokenize import EncodedPair
from mlx_dpo.engines.mlx_engine import MLXEngine
from mlx_dpo.logprobs import sequence_logps


def _pairs(seed: int, n: int = 5) -> list[EncodedPair]:
    """Random ids with very different prompt and completion lengths (padding on both sides)."""
    rng = np.random.default_rng(seed)

    def ids(lo, hi):
        return [int(i) for i in rng.integers(5, 40, int(rng.integers(lo, hi)))]

    return [EncodedPair(ids(1, 30), ids(1, 25), ids(1, 25)) for _ in range(n)]


@pytest.fixture(scope="module")
def model(tiny_model):
    import mlx_lm

    m, _ = mlx_lm.load(str(tiny_model))
    m.set_dtype(mx.float32)
    return m


def _plain_logps(model, batch):
    return sequence_logps(model(mx.array(batch.inputs)), mx.array(batch.targets), mx.array(batch.mask))


def _plan_logps(model, plan):
    logits = completion_logits(model, plan.shared, plan.arrays())
    return sequence_logps(logits, mx.array(plan.targets), mx.array(plan.weights))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_packed_and_shared_logps_equal_the_full_logits_path(model, seed):
    batch = collate(_pairs(seed), pad_id=2)
    plain = np.array(_plain_logps(model, batch))
    packed = np.array(_plan_logps(model, packed_plan(batch)))
    shared = np.array(_plan_logps(model, shared_plan(batch)))
    np.testing.assert_allclose(packed, plain, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(shared, plain, rtol=1e-6, atol=1e-4)
    assert np.abs(plain).min() > 1.0  # real sums, not an empty mask


def test_shared_prompt_gradients_equal_the_unshared_path(model):
    batch = collate(_pairs(3), pad_id=2)
    plan = shared_plan(batch)

    def plain_loss():
        return (_plain_logps(model, batch) * mx.arange(1, 11)).sum()

    def shared_loss():
        return (_plan_logps(model, plan) * mx.arange(1, 11)).sum()

    _, g_plain = nn.value_and_grad(model, plain_loss)()
    _, g_shared = nn.value_and_grad(model, shared_loss)()
    plain, shared = dict(tree_flatten(g_plain)), dict(tree_flatten(g_shared))
    assert plain.keys() == shared.keys()
    for name in plain:
        np.testing.assert_allclose(np.array(shared[name]), np.array(plain[name]), rtol=1e-3, atol=1e-4,
                                   err_msg=name)
    assert max(float(mx.abs(g).max()) for g in plain.values()) > 1e-3


def test_plans_refuse_what_they_cannot_represent():
    batch = collate(_pairs(4, n=2), pad_id=2)
    batch.inputs[2, 0] += 1  # the rejected row's prompt no longer equals the chosen row's
    assert shared_plan(batch) is None
    assert make_plan(batch, shared=True) is not None  # falls back to the packed plan
    batch.mask[0, :] = 0
    batch.mask[0, [3, 5]] = 1  # not one contiguous completion
    assert packed_plan(batch) is None


def test_shared_prompt_forward_leaves_the_model_as_it_was(model):
    """The shared path wraps each attention's `rope` outside the parameter tree; the wrapper
    changes nothing for any other call."""
    tokens = mx.array([[5, 9, 12, 7, 30, 8, 11]])
    before, names = model(tokens), [k for k, _ in tree_flatten(model.parameters())]
    mx.eval(_plan_logps(model, shared_plan(collate(_pairs(6), pad_id=2))))
    assert [k for k, _ in tree_flatten(model.parameters())] == names
    np.testing.assert_array_equal(np.array(model(tokens)), np.array(before))


def test_a_model_that_transforms_its_logits_after_the_head_takes_the_full_logits_path(make_config):
    # Granite divides its logits, Gemma 2 soft-caps them, Cohere scales them: the hot path takes
    # the head's output as the logits, so such a model must not use it.
    from mlx_dpo import completion
    from mlx_dpo.engines.mlx_fast import FastPath

    engine = _engine(make_config)
    policy = engine.models.policy
    assert engine.fast.enabled and completion.has_plain_top(policy)
    plain_class = type(policy)
    policy.__class__ = type("ScaledLogits", (plain_class,), {
        "__call__": lambda self, inputs, cache=None: plain_class.__call__(self, inputs, cache=cache) / 8.0})
    try:
        assert not completion.has_plain_top(policy)
        fast = FastPath(engine)
        assert not fast.enabled and "transforms the logits" in fast.describe()
        assert policy.training  # the check leaves the mode as it found it
    finally:
        policy.__class__ = plain_class


def test_shared_prompt_needs_a_rope_attribute(make_config, monkeypatch):
    """A model whose attention applies RoPE some other way runs each sequence whole instead."""
    from mlx_dpo import completion

    engine = _engine(make_config, **{"training.share_prompt": True})
    assert engine.fast.shared and completion.can_share_prompt(engine.models.policy)
    monkeypatch.setattr(completion, "_attention_modules", lambda body: None)
    engine = _engine(make_config, **{"training.share_prompt": True})
    assert not engine.fast.shared
    assert engine.fast.plan(collate(_pairs(7), pad_id=2)).shared is False


def _engine(make_config, **overrides):
    return MLXEngine(make_config(**overrides))


def _step_results(engine, batch, global_pairs=8):
    stats = engine.forward_backward(batch, global_pairs)
    grads = {k: np.array(v) for k, v in tree_flatten(engine._grads)}
    engine._grads = None
    return stats, grads


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_compiled_shared_step_equals_plain_uncompiled_step(make_config, finetune):
    batch = collate(_pairs(5, n=4), pad_id=2)
    fast = _engine(make_config, **{"model.finetune": finetune, "compute.compile": True,
                                   "training.share_prompt": True})
    plain = _engine(make_config, **{"model.finetune": finetune, "compute.compile": False,
                                    "training.share_prompt": False})
    plain.fast.enabled = False  # the original full-logits path
    assert fast.fast.plan(batch).shared and plain.fast.plan(batch) is None
    for _ in range(2):  # the second call runs the cached trace
        s_fast, g_fast = _step_results(fast, batch)
        s_plain, g_plain = _step_results(plain, batch)
        for key in s_plain:
            assert s_fast[key] == pytest.approx(s_plain[key], rel=1e-5, abs=1e-4), key
        for name in g_plain:
            np.testing.assert_allclose(g_fast[name], g_plain[name], rtol=1e-3, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("chunks", ["one", "several"])
def test_evaluate_on_completion_positions_equals_full_logits(make_config, monkeypatch, chunks):
    batch = collate(_pairs(6, n=4), pad_id=2)
    fast, plain = _engine(make_config), _engine(make_config)
    plain.fast.enabled = False
    if chunks == "several":  # head_logps.head_eval over chunks of 32 words
        from test_head_logps import use_chunks

        use_chunks(monkeypatch, 1, min_chunk=32)
        assert len(head_logps._chunks(8, head_weight(fast.models.policy).shape[0])) > 2
    for engine in (fast, plain):  # move the policy off the reference so KL is not zero
        engine.forward_backward(batch, 4)
        engine.apply_update(1e-2)
    a, b = fast.evaluate(batch), plain.evaluate(batch)
    assert b["kl_sum"] > 1e-4
    for key in b:
        assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key


@pytest.mark.parametrize("overrides", [{}, {"model.finetune": "full", "compute.cpu_streams": 2}],
                         ids=["lora", "full-update-over-2-streams"])
def test_non_finite_gradient_leaves_weights_and_optimizer_untouched(make_config, overrides):
    engine = _engine(make_config, **overrides)
    assert len(engine._update.lanes) == overrides.get("compute.cpu_streams", len(engine._update.lanes))
    batch = collate(_pairs(7, n=4), pad_id=2)
    engine.forward_backward(batch, 4)
    engine.apply_update(1e-3)  # a real step first, so the optimizer state is not all zeros
    before = {k: np.array(v) for k, v in tree_flatten(engine.models.policy.trainable_parameters())}
    state = {k: np.array(v) for k, v in tree_flatten(engine.optimizer.state)}
    engine.forward_backward(batch, 4)
    engine._grads = tree_map(lambda g: g * float("nan"), engine._grads)
    norm, applied = engine.apply_update(1e-3)
    assert not applied and not np.isfinite(norm)
    after = dict(tree_flatten(engine.models.policy.trainable_parameters()))
    for k, v in before.items():
        np.testing.assert_array_equal(np.array(after[k]), v)
    for k, v in tree_flatten(engine.optimizer.state):
        np.testing.assert_array_equal(np.array(v), state[k])
    engine.forward_backward(batch, 4)
    assert engine.apply_update(1e-3)[1]  # and the next finite step applies


def test_compiled_update_equals_eager_update_and_survives_load_state(make_config, tmp_path):
    batch = collate(_pairs(8, n=4), pad_id=2)
    engines = [_engine(make_config, **{"model.finetune": "full", "compute.compile": flag}) for flag in (True, False)]
    for engine in engines:
        for _ in range(2):
            engine.forward_backward(batch, 4)
            engine.apply_update(1e-3)
    compiled, eager = (dict(tree_flatten(e.models.policy.trainable_parameters())) for e in engines)
    moved = 0.0
    for name, value in eager.items():
        np.testing.assert_allclose(np.array(compiled[name]), np.array(value), rtol=1e-4, atol=1e-6, err_msg=name)
    # load_state swaps the optimizer's state dict: the compiled update must follow it.
    (tmp_path / "ck").mkdir()
    engines[0].save_state(tmp_path / "ck")
    before = {k: np.array(v) for k, v in tree_flatten(engines[0].models.policy.trainable_parameters())}
    engines[0].load_state(tmp_path / "ck")
    engines[0].forward_backward(batch, 4)
    assert engines[0].apply_update(1e-3)[1]
    after = dict(tree_flatten(engines[0].models.policy.trainable_parameters()))
    moved = max(float(np.abs(np.array(after[k]) - v).max()) for k, v in before.items())
    assert moved > 1e-6
    assert int(np.array(engines[0].optimizer.state["step"])) == 3
