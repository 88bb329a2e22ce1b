"""The engine interface the trainer loop speaks: numpy batches in, Python floats out.

Metric results are *sums* over the pairs of a batch (keys in SUM_KEYS); the trainer adds them
over micro-batches and ranks and divides by the pair count, so every average is per example.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterable, Protocol

import numpy as np

from ..data.batching import Batch

# Per-pair sums returned by forward_backward / evaluate (evaluate adds EVAL_KEYS).
SUM_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "logps/chosen", "logps/rejected", "pairs", "tokens")
KL_KEYS = ("kl_sum", "kl_tokens")
# gap_sum: sum over pairs of preference_gap.pair_gaps(chosen_rewards, rejected_rewards, xp).
EVAL_KEYS = (*KL_KEYS, "gap_sum")


class Engine(Protocol):
    tokenizer: object
    notes: list[str]  # what the engine actually uses (precision, checkpointing, device)

    def seed(self, value: int) -> None:
        """Reseed the engine's RNG (dropout): the trainer does it every step from
        (training.seed, step), so a resumed run draws the same numbers without saved RNG state."""

    def forward_backward(self, batch: Batch, global_pairs: int) -> dict[str, float]:
        """Add this micro-batch's gradient of sum(losses) / global_pairs to the accumulator."""

    def apply_update(self, learning_rate: float, skip: bool = False) -> tuple[float, bool]:
        """All-reduce, clip, and step; returns (grad_norm, applied). A non-finite gradient, or
        skip=True (the trainer saw a non-finite loss), is not applied. The accumulator is
        cleared either way."""

    def evaluate(self, batch: Batch) -> dict[str, float]:
        """Eval-mode sums, plus the exact token KL of policy from reference."""

    def save_state(self, folder: Path) -> None:
        """Trainable weights (adapters.safetensors + adapter_config.json) and optimizer state."""

    def load_state(self, folder: Path) -> None: ...

    def export(self, folder: Path) -> None:
        """The final model, loadable by mlx_lm.load."""

    def all_reduce_sum(self, values: np.ndarray) -> np.ndarray: ...

    def peak_memory_gb(self) -> float: ...


@contextlib.contextmanager
def scales_zeroed(lora_layers: Iterable):
    """Inside, every LoRA branch contributes nothing (scale 0): the policy acts as its own
    reference. Works for both engines' LoRA layers, which keep `scale` as a plain float."""
    layers = list(lora_layers)
    scales = [m.scale for m in layers]
    for m in layers:
        m.scale = 0.0
    try:
        yield
    finally:
        for m, s in zip(layers, scales):
            m.scale = s
