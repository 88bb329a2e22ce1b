"""The PyTorch engine: the CUDA fallback (and a CPU twin of the MLX engine for parity tests).

It speaks the same Engine protocol as MLXEngine and computes the same things the same way:
completion log-probs as target logit minus log-partition in float32, the losses from
mlx_dpo/losses.py (with `xp=torch`), global-norm clipping, and AdamW with bias correction
and decoupled weight decay. Checkpoints use mlx-lm's tensor names, so either engine resumes
the other's run (adapters.safetensors, optimizer.safetensors with `<name>.m` / `<name>.v`).
"""
from __future__ import annotations

import contextlib
import json
import math
import resource
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from ..config import Config
from ..data.batching import Batch
from ..distributed.sync import sync_run_state
from ..hardware import openblas_threads
from ..losses import LOSSES
from ..preference_gap import pair_gaps
from . import torch_dist
from .torch_models import TorchModels, adapters_disabled, load_torch_models, trainable


class TorchEngine:
    def __init__(self, cfg: Config, device_kind: str = "cuda", models: TorchModels | None = None):
        self.cfg = cfg
        self.group = torch_dist.setup_group(cfg, device_kind)
        self.device = self.group.device
        torch.manual_seed(cfg.training.seed)  # LoRA dropout masks
        self.models = models or load_torch_models(cfg, self.device)
        self.tokenizer = self.models.tokenizer
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        self.notes = [f"engine: torch {torch.__version__} on {self.device} ({name})"] + self.models.notes
        if self.group.active:
            self.notes.append(f"data parallel: rank {self.group.rank} of {self.group.world} (torchrun)")
        self.params = trainable(self.models.policy)
        o = cfg.optimization
        # PyTorch's AdamW is the update MLXEngine makes (bias correction, decoupled decay).
        self.optimizer = torch.optim.AdamW([p for _, p in self.params], lr=cfg.training.learning_rate,
                                           betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_epsilon,
                                           weight_decay=o.weight_decay)
        self.loss = LOSSES[cfg.training.loss_type]
        self._autocast = self.models.autocast

    @property
    def ranks(self):
        """The trainer's view of the torchrun group: equal shares per GPU."""
        from ..trainer import Ranks

        return Ranks(self.group.rank, [1.0] * self.group.world)

    def seed(self, value: int) -> None:
        """LoRA dropout draws from torch's global RNG; the trainer reseeds it every step."""
        torch.manual_seed(value)

    # -- forward passes -------------------------------------------------------------------
    def _logits(self, model, inputs: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self._autocast):
            return model(input_ids=inputs, use_cache=False).logits

    def _reference_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if self.models.reference is not None:
                return self._logits(self.models.reference, inputs)
            with adapters_disabled(self.models.policy):
                return self._logits(self.models.policy, inputs)

    def _logps(self, logits, targets, mask):
        logps = sequence_logps(logits, targets, mask)
        if self.loss.length_normalized:
            logps = logps / mask.sum(-1).clamp(min=1)
        return logps

    def _dpo_terms(self, logits, targets, mask, ref_logps):
        logps = self._logps(logits, targets, mask)
        b = logps.shape[0] // 2
        t = self.cfg.training
        losses, cr, rr = self.loss.fn(logps[:b], logps[b:], ref_logps[:b], ref_logps[b:],
                                      t.beta, t.label_smoothing, xp=torch)
        return losses, cr, rr, logps

    def _tensors(self, batch: Batch):
        as_t = lambda a, dt: torch.as_tensor(a, dtype=dt, device=self.device)  # noqa: E731
        return as_t(batch.inputs, torch.long), as_t(batch.targets, torch.long), as_t(batch.mask, torch.float32)

    # -- engine interface -----------------------------------------------------------------
    def _torch_threading(self):
        """On the CPU, torch's matmuls resolve to the OpenBLAS that hardware.py preloads for MLX,
        whose own thread pool then fights torch's OpenMP threads (steps measured ~3x slower on
        2 cores). One OpenBLAS thread under torch's parallelism, for torch's calls only."""
        return openblas_threads(1) if self.device.type == "cpu" else contextlib.nullcontext()

    def forward_backward(self, batch: Batch, global_pairs: int) -> dict[str, float]:
        with self._torch_threading():
            return self._forward_backward(batch, global_pairs)

    def _forward_backward(self, batch: Batch, global_pairs: int) -> dict[str, float]:
        inputs, targets, mask = self._tensors(batch)
        ref_logps = self._logps(self._reference_logits(inputs), targets, mask)
        logits = self._logits(self.models.policy, inputs)
        losses, cr, rr, logps = self._dpo_terms(logits, targets, mask, ref_logps)
        (losses.sum() / global_pairs).backward()  # .grad accumulates over micro-batches
        return _sums(losses.detach(), cr.detach(), rr.detach(), logps.detach(), batch)

    def apply_update(self, learning_rate: float, skip: bool = False) -> tuple[float, bool]:
        with self._torch_threading():
            return self._apply_update(learning_rate, skip)

    def _apply_update(self, learning_rate: float, skip: bool) -> tuple[float, bool]:
        params = [p for _, p in self.params]
        for p in params:  # MLX updates every trainable weight each step; so do we
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        try:
            if skip:
                return float("nan"), False
            if self.group.active:
                torch_dist.all_reduce_grads(params)
            max_norm = self.cfg.optimization.max_grad_norm
            if max_norm > 0:
                norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            else:
                norm = float(torch.sqrt(sum((p.grad.float() ** 2).sum() for p in params)))
            if not math.isfinite(norm):
                return norm, False
            for group in self.optimizer.param_groups:
                group["lr"] = learning_rate
            self.optimizer.step()
            return norm, True
        finally:
            self.optimizer.zero_grad(set_to_none=True)

    def evaluate(self, batch: Batch) -> dict[str, float]:
        with self._torch_threading():
            return self._evaluate(batch)

    def _evaluate(self, batch: Batch) -> dict[str, float]:
        inputs, targets, mask = self._tensors(batch)
        policy = self.models.policy
        policy.eval()
        try:
            with torch.no_grad():
                ref_logits = self._reference_logits(inputs)
                logits = self._logits(policy, inputs)
                terms = self._dpo_terms(logits, targets, mask, self._logps(ref_logits, targets, mask))
                stats = _sums(*terms, batch)
                stats["kl_sum"] = float(token_kl(logits, ref_logits, mask).sum())
                stats["kl_tokens"] = float(mask.sum())
                stats["gap_sum"] = float(pair_gaps(terms[1], terms[2], torch).sum())
        finally:
            policy.train()
        return stats

    # -- state ----------------------------------------------------------------------------
    def trainable_arrays(self) -> dict[str, np.ndarray]:
        return {n: p.detach().float().cpu().numpy() for n, p in self.params}

    def save_state(self, folder: Path) -> None:
        save_file(self.trainable_arrays(), str(folder / "adapters.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps(self.models.adapter_config, indent=2))
        save_file(self._optimizer_arrays(), str(folder / "optimizer.safetensors"))

    def _optimizer_arrays(self) -> dict[str, np.ndarray]:
        """The optimizer state in MLX's layout: step, learning_rate, <name>.m, <name>.v."""
        out = {"step": np.array(0, dtype=np.uint64),
               "learning_rate": np.array(self.optimizer.param_groups[0]["lr"], dtype=np.float32)}
        for name, p in self.params:
            state = self.optimizer.state.get(p)
            if state:
                out["step"] = np.array(int(state["step"]), dtype=np.uint64)
                out[f"{name}.m"] = state["exp_avg"].float().cpu().numpy()
                out[f"{name}.v"] = state["exp_avg_sq"].float().cpu().numpy()
        return out

    def load_state(self, folder: Path) -> None:
        weights = load_file(str(folder / "adapters.safetensors"))
        with torch.no_grad():
            for name, p in self.params:
                if name in weights:
                    p.copy_(torch.from_numpy(weights[name]))
        saved = load_file(str(folder / "optimizer.safetensors"))
        step = float(saved["step"])
        self.optimizer.state.clear()
        for name, p in self.params:
            if f"{name}.m" in saved:
                self.optimizer.state[p] = {
                    "step": torch.tensor(step, dtype=torch.float32),
                    "exp_avg": torch.from_numpy(saved[f"{name}.m"]).to(p.device, p.dtype),
                    "exp_avg_sq": torch.from_numpy(saved[f"{name}.v"]).to(p.device, p.dtype)}

    # -- a torchrun group's one starting point --------------------------------------------
    def join_run(self, trainer) -> Optional[str]:
        """Under torchrun, every rank starts from rank 0's weights, optimizer state and RunState
        (its checkpoint after --resume), and a rollback restores rank 0's checkpoint on every rank:
        logging.output_dir need not be on a disk the ranks share. Alone, nothing happens. The line
        to print says where this rank starts."""
        if not self.group.active:
            return None

        def restore(folder: Optional[Path]) -> None:
            if self.group.rank == 0:
                self.load_state(folder)
            self.sync_from_rank0(trainer.state)

        trainer.restore = restore
        self.sync_from_rank0(trainer.state)
        return (f"rank {self.group.rank} of {self.group.world}: starting from rank 0's weights, optimizer state and "
                f"data position (step {trainer.state.step})")

    def sync_from_rank0(self, state) -> None:
        """This rank's trainable weights, AdamW moments and step, and `state` become rank 0's."""
        step = 0.0
        moments = []
        for _, p in self.params:
            held = self.optimizer.state.get(p)
            if held:
                step = float(held["step"])
            else:  # no step taken here yet: AdamW's own starting state, for rank 0's to overwrite
                held = self.optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                                  "exp_avg_sq": torch.zeros_like(p)}
            moments += [held["exp_avg"], held["exp_avg_sq"]]
        torch_dist.broadcast_from_rank0([p.data for _, p in self.params] + moments)
        step = float(self.all_reduce_sum(np.array([step if self.group.rank == 0 else 0.0]))[0])
        for _, p in self.params:
            self.optimizer.state[p]["step"] = torch.tensor(step, dtype=torch.float32)
        sync_run_state(state, self.all_reduce_sum, self.group.rank)

    def export(self, folder: Path) -> None:
        """LoRA: adapters loadable by `mlx_lm.load(base, adapter_path=folder)`. Full: a
        Hugging Face folder, which both transformers and mlx-lm load."""
        if self.models.adapter_config["fine_tune_type"] == "lora":
            save_file(self.trainable_arrays(), str(folder / "adapters.safetensors"))
            (folder / "adapter_config.json").write_text(json.dumps(self.models.adapter_config, indent=2))
            return
        self.models.policy.save_pretrained(folder, safe_serialization=True)
        self.tokenizer.save_pretrained(folder)  # mlx-lm's wrapper forwards to the HF tokenizer

    def all_reduce_sum(self, values: np.ndarray) -> np.ndarray:
        if not self.group.active:
            return values
        return torch_dist.all_reduce_array(values, self.device)

    def peak_memory_gb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        # The process's peak resident set: the CPU has no allocator statistics to ask.
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**30 if sys.platform == "darwin" else peak / 2**20

    def reset_peak_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed completion log-probs per sequence, (N,): as mlx_dpo.logprobs does it."""
    logits = logits.float()
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return ((picked - torch.logsumexp(logits, dim=-1)) * mask).sum(-1)


def token_kl(policy_logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Exact KL(policy || reference) over the vocabulary, summed over completion tokens, (N,)."""
    logp = torch.log_softmax(policy_logits.float(), dim=-1)
    logq = torch.log_softmax(ref_logits.float(), dim=-1)
    return ((logp.exp() * (logp - logq)).sum(-1) * mask).sum(-1)


def _sums(losses, chosen_r, rejected_r, logps, batch: Batch) -> dict[str, float]:
    b = losses.shape[0]
    sums = {"loss": losses.sum(), "rewards/chosen": chosen_r.sum(), "rewards/rejected": rejected_r.sum(),
            "rewards/margins": (chosen_r - rejected_r).sum(),
            "rewards/accuracies": (chosen_r > rejected_r).float().sum(),
            "logps/chosen": logps[:b].sum(), "logps/rejected": logps[b:].sum()}
    out = {k: float(v) for k, v in sums.items()}
    out.update(pairs=float(batch.num_pairs), tokens=float(batch.num_tokens))
    return out
