"""The MLX engine's hot path: completion-only logits, optional shared prompt, cached reference
log-probs, `mx.compile`, and an optimizer step that needs no host round-trip.

MLXEngine keeps the interface and the plain path; it hands a batch here whenever a `Plan`
can be made (completions are contiguous runs, the model's top is a plain body + LM head).
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_map_with_path

from .. import native
from ..completion import (Plan, can_share_prompt, completion_hidden, completion_logits, completion_logps,
                          has_plain_top, head_weight, make_plan)
from ..data.batching import Batch
from ..head_logps import head_eval
from ..logprobs import position_kl, token_logps
from ..models import adapters_disabled
from .cpu_streams import on_stream


class FastPath:
    """Differentiated DPO terms from a Plan. `engine` supplies models, config and `_dpo_terms`."""

    def __init__(self, engine):
        self.engine = engine
        cfg = engine.cfg
        policy = engine.models.policy
        models = [policy] + ([engine.models.reference] if engine.models.reference is not None else [])
        self.enabled = all(has_plain_top(m) for m in models)
        self.shared = cfg.training.share_prompt and self.enabled and all(can_share_prompt(m) for m in models)
        self.compile = cfg.compute.compile
        self._grad = nn.value_and_grad(policy, self._loss)
        self._compiled: dict = {}
        self._state = [policy.state, mx.random.state]
        if engine.models.reference is not None:
            self._state.insert(1, engine.models.reference.state)

    def describe(self) -> str:
        if not self.enabled:
            return "hot path: full logits (model top not recognised, or it transforms the logits after the head)"
        parts = ["completion-only logits", "shared prompt" if self.shared else "prompt per sequence",
                 "mx.compile" if self.compile else "eager"]
        return "hot path: " + ", ".join(parts)

    def plan(self, batch: Batch) -> Optional[Plan]:
        return make_plan(batch, self.shared) if self.enabled else None

    # -- differentiated function --------------------------------------------------------------
    def _reference(self, fn, *args) -> mx.array:
        """fn(reference model, *args) without gradients: the separate reference, or the policy
        with its adapters off."""
        models = self.engine.models
        if models.reference is not None:
            return mx.stop_gradient(fn(models.reference, *args))
        with adapters_disabled(models.policy):
            return mx.stop_gradient(fn(models.policy, *args))

    def _loss(self, shared, arrays, targets, weights, ref_logps, scale):
        reduce = self.engine._reduce_logps
        if ref_logps is None:  # live reference
            ref_logps = reduce(self._reference(completion_logps, shared, arrays, targets), weights)
        logps = reduce(completion_logps(self.engine.models.policy, shared, arrays, targets), weights)
        total, aux = self.engine._dpo_terms_from_logps(logps, ref_logps)
        return total * scale, aux

    def _step_fn(self, plan: Plan, cached: bool):
        """One function per (shared, cached, stream) variant; mx.compile retraces per new shape.
        A trace keeps the stream it was made on, so each CPU stream (cpu_streams.py) has its own."""
        stream = mx.default_stream(mx.default_device())
        key = (plan.shared, cached, str(stream))  # Stream's hash is per object: key on its name
        shared = plan.shared
        if key not in self._compiled:
            def step(*args):
                *arrays, targets, weights, ref, scale = args
                (_, aux), grads = self._grad(shared, tuple(arrays), targets, weights,
                                             ref if cached else None, scale)
                return grads, aux

            self._compiled[key] = (mx.compile(step, inputs=self._state, outputs=self._state)
                                   if self.compile else step)
        return self._compiled[key]

    def forward_backward(self, plan: Plan, ref_logps: Optional[np.ndarray], scale: float):
        """(grads, aux) of sum(losses) * scale; aux as MLXEngine._dpo_terms returns it."""
        cached = ref_logps is not None
        ref = mx.array(ref_logps, dtype=mx.float32) if cached else mx.array(0.0)
        if cached and self.engine.loss.length_normalized:
            ref = ref / mx.maximum(mx.array(plan.weights).sum(axis=-1), 1)
        fn = self._step_fn(plan, cached)
        return fn(*plan.arrays(), mx.array(plan.targets), mx.array(plan.weights), ref,
                  mx.array(scale, dtype=mx.float32))

    def _head_weights(self) -> tuple:
        models = self.engine.models
        reference = models.reference if models.reference is not None else models.policy  # adapters off
        return head_weight(models.policy), head_weight(reference)

    @property
    def hidden_cacheable(self) -> bool:
        """Whether evaluation takes nothing of the reference but its hidden states at the completion
        positions (and its head's weight): both heads plain matmuls, on the completion-only path."""
        return self.enabled and all(w is not None for w in self._head_weights())

    def reference_hidden(self, plan: Plan) -> mx.array:
        """The reference's hidden states (N, C, D) at the plan's completion positions."""
        return self._reference(completion_hidden, plan.shared, plan.arrays())

    def eval_terms(self, plan: Plan, ref_hidden: Optional[mx.array] = None) -> tuple[mx.array, mx.array, mx.array]:
        """(policy log-probs, reference log-probs, KL(policy || reference)), each (N, C) at the
        plan's completion positions, for evaluation: through head_logps.py's chunks when both heads
        are plain matmuls (from `ref_hidden`, the reference's hidden states, when they are given:
        KL and log-probs need nothing else of the reference but its head), else from the two
        models' logits."""
        models, arrays, targets = self.engine.models, plan.arrays(), mx.array(plan.targets)
        weights = self._head_weights()
        if all(w is not None for w in weights):
            hidden = completion_hidden(models.policy, plan.shared, arrays)
            # cached hidden states come back as float32: in the model's dtype they are the same values
            ref_hidden = self.reference_hidden(plan) if ref_hidden is None else ref_hidden.astype(hidden.dtype)
            return head_eval(hidden, weights[0], ref_hidden, weights[1], targets)
        logits = completion_logits(models.policy, plan.shared, arrays)
        ref_logits = self._reference(completion_logits, plan.shared, arrays)
        return token_logps(logits, targets), token_logps(ref_logits, targets), position_kl(logits, ref_logits)

    def reference_sums(self, plan: Plan) -> mx.array:
        """Summed completion log-probs of the reference, (N,): what the cache stores."""
        per_token = self._reference(completion_logps, plan.shared, plan.arrays(), mx.array(plan.targets))
        return (per_token * mx.array(plan.weights)).sum(axis=-1)


def guarded_update(optimizer, model, parts: Sequence, max_norm: float, lanes: Sequence = ()):
    """Clip and step lazily; a non-finite norm leaves weights and optimizer state as they were.

    `parts` are gradient trees that add up to the gradient: one per CPU stream that made them
    (MLXEngine keeps them apart). The fused AdamW and norm kernels add two parts as they read
    them, which saves a pass that writes the sum; where some tensor cannot take them (not float32)
    the parts are added first.

    The finiteness test is an `mx.where` inside the graph (inside the fused kernel on the CPU), so
    the step needs no host round-trip before the update and costs no extra peak memory: the fused
    AdamW writes the new weights and moments into the old ones' buffers when nothing else holds
    them, and MLX's ops keep old and new side by side either way. The arithmetic is MLX's own
    (`clip_grad_norm`'s normaliser, `optimizer.apply_single` per tensor, as `Optimizer.update`
    does it; on the CPU, native.py's one-pass AdamW, which gives the same bits); with `lanes` (CPU streams) the tensors are spread over them by size, so the
    elementwise passes over a full fine-tune's weights run on every core.
    """
    kernels = _fused_adamw(optimizer)
    weights = dict(tree_flatten(model.trainable_parameters()))
    all_fused = kernels is not None and all(g.dtype == weights[path].dtype == mx.float32
                                            for path, g in tree_flatten(parts[0]))
    grads, second = _two_parts(parts) if all_fused else (added(parts), None)
    place = _placement(grads, lanes)
    second_of = dict(tree_flatten(second)) if second is not None else {}
    squares = []
    for path, g in tree_flatten(grads):
        with on_stream(place[path]):
            fused = kernels and g.dtype == mx.float32
            squares.append(kernels.sum_of_squares(g, second_of.get(path)) if fused else g.square().sum())
    norm = mx.sqrt(sum(squares))
    normalizer = mx.minimum(max_norm / (norm + 1e-6), 1.0) if max_norm > 0 else None
    ok = mx.isfinite(norm)
    old_step = optimizer.state["step"]
    optimizer.state["step"] = old_step + 1
    if kernels:
        lr, corrections = _adamw_scalars(optimizer)

    def step_one(path, g, p, state):
        with on_stream(place[path]):
            if kernels and g.dtype == p.dtype == mx.float32:  # the same arithmetic in one pass
                b1, b2 = optimizer.betas
                new_p, state["m"], state["v"] = kernels.adamw(
                    g, p, state["m"], state["v"], lr, *corrections, mx.array(1.0) if normalizer is None else normalizer,
                    ok, b1, 1 - b1, b2, 1 - b2, optimizer.eps, optimizer.weight_decay, second_of.get(path))
                return new_p
            old_m, old_v = state["m"], state["v"]
            if normalizer is not None:
                g = (g * normalizer).astype(g.dtype)
            new_p = optimizer.apply_single(g, p, state)  # writes state["m"], state["v"]
            state["m"], state["v"] = mx.where(ok, state["m"], old_m), mx.where(ok, state["v"], old_v)
            return mx.where(ok, new_p, p)

    model.update(tree_map_with_path(step_one, grads, model.trainable_parameters(), optimizer.state))
    optimizer.state["step"] = mx.where(ok, optimizer.state["step"], old_step)
    return norm, ok


def added(parts: Sequence):
    """One gradient tree: the parts' sum."""
    return functools.reduce(lambda a, b: tree_map(mx.add, a, b), parts)


def _two_parts(parts: Sequence) -> tuple:
    """(first, second or None): the parts as the fused kernels take them, a third onwards added to
    the second."""
    return parts[0], (added(parts[1:]) if len(parts) > 1 else None)


def _fused_adamw(optimizer):
    """native.py's kernels where they can take AdamW's step: MLX's AdamW on the CPU. Its arithmetic
    is MLX's, bit for bit (tests/test_native.py), in one pass over each weight instead of MLX's
    compiled kernels' ~10 ns per parameter (docs/benchmarks.md, session 11)."""
    if type(optimizer) is not optim.AdamW or mx.default_device() != mx.cpu:
        return None
    return native.kernels()


def _adamw_scalars(optimizer) -> tuple[mx.array, tuple[mx.array, mx.array]]:
    """(lr, (c1, c2)) for the fused AdamW, by the ops MLX's `Adam.apply_single` uses (float32 weights)."""
    lr = optimizer.learning_rate.astype(mx.float32)
    if not optimizer.bias_correction:
        return lr, (lr, mx.array(1.0))
    b1, b2 = optimizer.betas
    step = optimizer.step
    return lr, ((lr / (1 - b1**step)).astype(mx.float32), mx.rsqrt(1 - b2**step).astype(mx.float32))


def _placement(grads, lanes: Sequence) -> dict:
    """Tensor path -> stream (None: the default one), largest tensors first onto the least loaded."""
    flat = tree_flatten(grads)
    if len(lanes) < 2:
        return {path: None for path, _ in flat}
    load = [0] * len(lanes)
    place = {}
    for path, g in sorted(flat, key=lambda item: -item[1].size):
        lane = load.index(min(load))
        place[path] = lanes[lane]
        load[lane] += g.size
    return place


def merge_optimizer_state(optimizer, flat: dict) -> None:
    """Write saved optimizer leaves ("a.0.b" -> array) into the live state tree, in place.

    Replacing the tree with `tree_unflatten(flat)` loses the empty containers a flat file
    cannot hold (e.g. full fine-tuning's `layer_types: []`), and AdamW's tree_map over
    gradients and state then fails with a KeyError; it would also drop the dict a compiled
    update holds on to.
    """
    for path, value in flat.items():
        node = optimizer.state
        *parents, leaf = path.split(".")
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if isinstance(node, list):
            node[int(leaf)] = value
        else:
            node[leaf] = value


class UpdateStep:
    """guarded_update, under mx.compile when compute.compile is on: AdamW's elementwise ops
    fuse into few passes over the weights (for full fine-tuning, 135M parameters times ~15
    ops otherwise: a fifth of the step, measured on SmolLM2-135M)."""

    def __init__(self, optimizer, model, max_norm: float, compile: bool, lanes: Sequence = ()):
        self.optimizer, self.model, self.max_norm, self.compile = optimizer, model, max_norm, compile
        self.lanes = lanes
        self._fn, self._state = None, None

    def __call__(self, parts: Sequence):
        """The step on the gradient that `parts` (trees, e.g. one per CPU stream) add up to."""
        if not self.compile:
            return guarded_update(self.optimizer, self.model, parts, self.max_norm, self.lanes)
        if self._state is not self.optimizer.state:  # load_state replaces the dict: retrace
            self._state = self.optimizer.state
            state = [self.model.state, self.optimizer.state]
            self._fn = mx.compile(lambda g: guarded_update(self.optimizer, self.model, g, self.max_norm, self.lanes),
                                  inputs=state, outputs=state)
        return self._fn(parts)
