"""The PyTorch engine's side of the stage-3 model checks: its models read for model_compare's verdicts.

Its LoRA layers keep mlx-lm's names (`<path>.linear.weight`, `lora_a`, `lora_b`), so the base
weights are named as the MLX engine names them and the verdicts read the same on both engines.
"""
from __future__ import annotations

import torch

from ..gates import Check
from ..model_compare import (architecture_verdict, base_name, equality_verdict, separate_reference_frozen,
                             shared_reference_frozen)
from ..models import ADAPTER_LEAVES
from .torch_models import LoRALinear, TorchModels, lora_layers


def _base_weights(model: torch.nn.Module) -> dict:
    """Parameters without adapters, named as in the model without LoRA wrappers (tied ones once)."""
    wrapped = {name for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    named = ((base_name(name, wrapped), p) for name, p in model.named_parameters())
    return {name: p for name, p in named if name is not None}


def reference_frozen(models: TorchModels) -> Check:
    if models.reference is not None:
        leaked = [n for n, p in models.reference.named_parameters() if p.requires_grad]
        return separate_reference_frozen(leaked, models.reference is models.policy or models.reference.training)
    base = [n for n, p in models.policy.named_parameters()
            if p.requires_grad and n.rsplit(".", 1)[-1] not in ADAPTER_LEAVES]
    return shared_reference_frozen(len(lora_layers(models.policy)), base)


@torch.no_grad()
def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    if not torch.is_floating_point(a):
        return float(torch.any(a != b.to(a.device)))
    return float((a.float() - b.to(a.device).float()).abs().max())


@torch.no_grad()
def _adapter_delta(models: TorchModels) -> float:
    """Largest |scale * A B| entry over all LoRA layers: what the adapters add to the weights."""
    return max((float((layer.scale * (layer.lora_a.float() @ layer.lora_b.float())).abs().max())
                for layer in lora_layers(models.policy)), default=0.0)


def policy_equals_reference(models: TorchModels) -> Check:
    return equality_verdict(models, _base_weights, _adapter_delta, _max_diff)


def architectures_match(models: TorchModels) -> Check:
    return architecture_verdict(models, _base_weights)
