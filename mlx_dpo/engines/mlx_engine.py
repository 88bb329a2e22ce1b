"""The MLX engine: Metal on Apple silicon, the CPU elsewhere."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from .. import cpu_kernels
from ..config import Config
from ..data.batching import Batch
from ..distributed.exchange import sum_over_ranks
from ..hardware import fit_cpu_cache, keep_cpu_buffers
from ..logprobs import position_kl, sequence_logps, token_logps
from ..losses import LOSSES
from ..models import Models, export_model, load_models, load_trainable, reference_forward, save_adapters
from ..preference_gap import pair_gaps
from .cpu_streams import CpuStreams, alternating_leaves
from .mlx_fast import FastPath, UpdateStep, added, merge_optimizer_state


class MLXEngine:
    def __init__(self, cfg: Config, device_kind: str = "cpu", models: Models | None = None):
        self.cfg = cfg
        keep_cpu_buffers()
        self.models = models or load_models(cfg, device_kind)
        self.tokenizer = self.models.tokenizer
        self.notes = [f"engine: mlx {mx.__version__} on {mx.default_device()}"] + self.models.notes
        opt_cfg = cfg.optimization
        # bias_correction=True: the AdamW of PyTorch/TRL, so both engines take the same step.
        self.optimizer = optim.AdamW(learning_rate=cfg.training.learning_rate,
                                     betas=[opt_cfg.adam_beta1, opt_cfg.adam_beta2],
                                     eps=opt_cfg.adam_epsilon, weight_decay=opt_cfg.weight_decay,
                                     bias_correction=True)
        self.optimizer.init(self.models.policy.trainable_parameters())
        self.loss = LOSSES[cfg.training.loss_type]
        self._grad_fn = nn.value_and_grad(self.models.policy, self._loss_terms)
        self._grads = None
        # The CPU streams' gradient parts go to the optimizer apart (its fused kernels add them as
        # they read them) only for one micro-batch per step: accumulating, they would hold one
        # gradient tree more between micro-batches than their sum does.
        self._parts_apart = cfg.training.gradient_accumulation_steps == 1
        self.group = None  # an mx.distributed group when training on several ranks
        self.fast = FastPath(self)  # the hot path (engines/mlx_fast.py); None plan = plain path
        self.notes.append(self.fast.describe())
        self.cpu_streams = CpuStreams(cfg.compute.cpu_streams)
        self.notes.append(self.cpu_streams.describe())
        self._update = UpdateStep(self.optimizer, self.models.policy, cfg.optimization.max_grad_norm,
                                  cfg.compute.compile, self.cpu_streams.streams)

    # -- the differentiated function ------------------------------------------------------
    def _policy_logps(self, logits, targets, mask):
        return self._reduce_logps(token_logps(logits, targets), mask)

    def _reduce_logps(self, token_lps, mask):
        """Per-sequence log-probs (N,) from per-token ones (N, T): the completion's sum, or its
        mean for length-normalised losses."""
        logps = (token_lps * mask).sum(axis=-1)
        if self.loss.length_normalized:
            logps = logps / mx.maximum(mask.sum(axis=-1), 1)
        return logps

    def _loss_terms(self, inputs, targets, mask, ref_logps, scale):
        total, aux = self._dpo_terms(self.models.policy(inputs), targets, mask, ref_logps)
        return total * scale, aux

    def _dpo_terms(self, logits, targets, mask, ref_logps):
        """sum(losses) and (losses, chosen_rewards, rejected_rewards, policy logps)."""
        return self._dpo_terms_from_logps(self._policy_logps(logits, targets, mask), ref_logps)

    def _dpo_terms_from_logps(self, logps, ref_logps):
        b = logps.shape[0] // 2
        t = self.cfg.training
        losses, cr, rr = self.loss.fn(logps[:b], logps[b:], ref_logps[:b], ref_logps[b:],
                                      t.beta, t.label_smoothing, xp=mx)
        return losses.sum(), (losses, cr, rr, logps)

    def _reference_logps(self, inputs, targets, mask):
        return self._policy_logps(reference_forward(self.models, inputs), targets, mask)

    # -- engine interface -----------------------------------------------------------------
    def seed(self, value: int) -> None:
        mx.random.seed(value)

    def kernels(self):
        """Context for every forward this engine runs: the fast CPU kernels where they apply."""
        c = self.cfg.compute
        return cpu_kernels.installed(self.models.policy, c.fast_cpu_math, c.attention_block,
                                     c.recompute_activations, c.recompute_attention)

    def forward_backward(self, batch: Batch, global_pairs: int) -> dict[str, float]:
        with self.kernels():
            return self._forward_backward(batch, global_pairs)

    def _forward_backward(self, batch: Batch, global_pairs: int) -> dict[str, float]:
        parts = self.cpu_streams.split(batch)
        with self.cpu_streams.running(parts):
            built = self.cpu_streams.built(parts, lambda part: self._part_grads(part, global_pairs))
            grads = [part_grads for part_grads, _ in built]
            stats = _summed([part_stats for _, part_stats in built])
            if not self._parts_apart:
                grads = [added(grads)]
            self._grads = _accumulated(self._grads, grads)
            mx.eval(alternating_leaves(self._grads), stats)
        return {k: float(v) for k, v in stats.items()}

    def _part_grads(self, batch: Batch, global_pairs: int):
        """(grads, summed statistics) of one batch, on the current stream; nothing evaluated."""
        plan = self.fast.plan(batch)
        if plan is not None:
            grads, aux = self.fast.forward_backward(plan, batch.ref_logps, 1.0 / global_pairs)
        else:
            inputs, targets, mask = (mx.array(batch.inputs), mx.array(batch.targets), mx.array(batch.mask))
            ref_logps = self._reference_logps(inputs, targets, mask)
            (_, aux), grads = self._grad_fn(inputs, targets, mask, ref_logps, 1.0 / global_pairs)
        return grads, _sums(*aux, batch)

    def apply_update(self, learning_rate: float, skip: bool = False) -> tuple[float, bool]:
        grads, self._grads = self._grads, None
        if skip:
            return float("nan"), False
        if self.group is not None:  # few large all-sums, not one per tensor (distributed/exchange.py)
            grads = [sum_over_ranks(added(grads), self.group)]
        self.optimizer.learning_rate = mx.array(learning_rate, dtype=mx.float32)
        # One evaluation for norm, clip and step: a non-finite norm is refused inside the graph.
        norm, ok = self._update(grads)
        mx.eval(norm, ok, self.models.policy.trainable_parameters(), self.optimizer.state)
        del grads
        fit_cpu_cache()  # MLX's CPU buffer cache follows the largest step's working set
        return float(norm), bool(ok)

    def evaluate(self, batch: Batch) -> dict[str, float]:
        with self.kernels():
            return self._evaluate(batch)

    def _evaluate(self, batch: Batch) -> dict[str, float]:
        policy = self.models.policy
        policy.eval()
        try:
            parts = self.cpu_streams.split(batch)  # on the CPU, pairs over the streams as in training
            with self.cpu_streams.running(parts):
                stats = _summed(self.cpu_streams.built(parts, self._eval_sums))
                mx.eval(stats)
        finally:
            policy.train()
        return {k: float(v) for k, v in stats.items()}

    def _eval_sums(self, batch: Batch) -> dict[str, mx.array]:
        """Summed statistics of one batch (nothing evaluated): DPO terms, KL, preference gap."""
        inputs, targets, mask = (mx.array(batch.inputs), mx.array(batch.targets), mx.array(batch.mask))
        plan = self.fast.plan(batch)
        if plan is not None:  # completion positions only
            token_lps, ref_token_lps, kl = self.fast.eval_terms(plan, _padded_hidden(batch.ref_hidden, plan))
            mask = mx.array(plan.weights)
        else:
            ref_logits, logits = reference_forward(self.models, inputs), self.models.policy(inputs)
            token_lps, ref_token_lps = token_logps(logits, targets), token_logps(ref_logits, targets)
            kl = position_kl(logits, ref_logits)
        logps, ref_logps = self._reduce_logps(token_lps, mask), self._reduce_logps(ref_token_lps, mask)
        _, aux = self._dpo_terms_from_logps(logps, ref_logps)
        stats = _sums(*aux, batch)
        stats["kl_sum"] = (kl * mask).sum()
        stats["kl_tokens"] = mask.sum()
        stats["gap_sum"] = pair_gaps(aux[1], aux[2], mx).sum()
        return stats

    def reference_hidden(self, batch: Batch) -> Optional[list[np.ndarray]]:
        """The reference's hidden states at each row's completion positions, float32 arrays of
        (completion length, D) in the batch's row order, for evaluation's cache (refcache.py);
        None where evaluation would not use them (the full-logits path, or a head that is not a
        plain matmul). The pairs go over the CPU streams as `evaluate` splits them, so the values
        are the ones a live evaluation of this batch computes."""
        if not self.fast.hidden_cacheable:
            return None
        parts = self.cpu_streams.split(batch)
        plans = [self.fast.plan(part) for _, part in parts]
        if any(plan is None for plan in plans):
            return None
        with self.kernels(), self.cpu_streams.running(parts):
            plan_of = iter(plans)  # built() calls in the parts' order
            hidden = self.cpu_streams.built(parts, lambda part: self.fast.reference_hidden(next(plan_of)))
            mx.eval(hidden)
        rows: list = [[], []]  # chosen rows, rejected rows, over the parts in order
        for h, (_, part) in zip(hidden, parts):
            h = np.array(h.astype(mx.float32))
            counts = part.mask.sum(axis=1).astype(int)
            for r in range(h.shape[0]):
                rows[r >= part.num_pairs].append(h[r, :counts[r]])
        return rows[0] + rows[1]

    def reference_sums(self, batch: Batch) -> mx.array:
        """Summed completion log-probs of the reference, (2B,): what refcache.py stores. On the CPU
        the pairs are split over the CPU streams as in training, each part's chosen rows first."""
        parts = self.cpu_streams.split(batch)
        with self.kernels(), self.cpu_streams.running(parts):
            sums = self.cpu_streams.built(parts, self._reference_sums)
            mx.eval(sums)
        if len(sums) == 1:
            return sums[0]
        halves = [(s[:part.num_pairs], s[part.num_pairs:]) for s, (_, part) in zip(sums, parts)]
        return mx.concatenate([h[0] for h in halves] + [h[1] for h in halves])

    def _reference_sums(self, batch: Batch) -> mx.array:
        plan = self.fast.plan(batch)
        if plan is not None:
            return self.fast.reference_sums(plan)
        inputs, targets, mask = (mx.array(batch.inputs), mx.array(batch.targets), mx.array(batch.mask))
        return sequence_logps(reference_forward(self.models, inputs), targets, mask)

    def save_state(self, folder: Path) -> None:
        save_adapters(self.models, folder)
        state = dict(tree_flatten(self.optimizer.state))
        mx.save_safetensors(str(folder / "optimizer.safetensors"), state)

    def load_state(self, folder: Path) -> None:
        load_trainable(self.models.policy, folder)
        state = mx.load(str(folder / "optimizer.safetensors"))
        merge_optimizer_state(self.optimizer, state)
        mx.eval(self.optimizer.state)

    def export(self, folder: Path) -> None:
        export_model(self.models, folder, self.cfg.policy_path)

    def all_reduce_sum(self, values: np.ndarray) -> np.ndarray:
        if self.group is None:
            return values
        out = mx.distributed.all_sum(mx.array(values.astype(np.float32)), group=self.group)
        return np.array(out, dtype=np.float64)

    def peak_memory_gb(self) -> float:
        return mx.get_peak_memory() / 2**30


def _accumulated(held: Optional[list], new: list) -> list:
    """Gradient parts (trees that add up to the gradient) after adding `new` to `held`, part by
    part; a count that changes between micro-batches folds them into one."""
    if held is None:
        return new
    if len(held) == len(new):
        return [tree_map(mx.add, a, b) for a, b in zip(held, new)]
    return [added(held + new)]


def _summed(parts: list[dict]) -> dict:
    """The CPU streams' statistics added key by key."""
    return {key: sum(part[key] for part in parts) for key in parts[0]}


def _sums(losses, chosen_r, rejected_r, logps, batch: Batch) -> dict:
    b = losses.shape[0]
    return {
        "loss": losses.sum(),
        "rewards/chosen": chosen_r.sum(),
        "rewards/rejected": rejected_r.sum(),
        "rewards/margins": (chosen_r - rejected_r).sum(),
        "rewards/accuracies": (chosen_r > rejected_r).astype(mx.float32).sum(),
        "logps/chosen": logps[:b].sum(),
        "logps/rejected": logps[b:].sum(),
        "pairs": mx.array(float(batch.num_pairs)),
        "tokens": mx.array(float(batch.num_tokens)),
    }


def _padded_hidden(rows: Optional[list], plan) -> Optional[mx.array]:
    """Cached per-row hidden states (Batch.ref_hidden) as the (N, C, D) array the plan's
    completion positions take; padding positions are zeros, which the mask leaves out."""
    if rows is None:
        return None
    out = np.zeros((len(rows), plan.targets.shape[1], rows[0].shape[1]), dtype=np.float32)
    for r, h in enumerate(rows):
        out[r, :len(h)] = h
    return mx.array(out)
