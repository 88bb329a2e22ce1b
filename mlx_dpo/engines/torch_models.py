"""Models for the PyTorch engine: transformers checkpoints with mlx-lm-compatible LoRA.

The LoRA layer mirrors mlx-lm's `LoRALinear` exactly, so a checkpoint written by either engine
loads in the other: the frozen layer lives at `<path>.linear`, the adapters at `<path>.lora_a`
with shape (in, r) and `<path>.lora_b` with shape (r, out), and the output is
`linear(x) + scale * (dropout(x) @ lora_a) @ lora_b` (mlx-lm's `scale`, not alpha / r).
PEFT stores the transposed matrices under other names, hence this small module instead.
"""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..config import Config
from ..errors import UserError
from .base import scales_zeroed


class LoRALinear(nn.Module):
    def __init__(self, linear: nn.Linear, rank: int, scale: float, dropout: float,
                 generator: torch.Generator):
        super().__init__()
        self.linear = linear
        self.scale = scale
        self.dropout = nn.Dropout(dropout)
        out_dims, in_dims = linear.weight.shape
        bound = 1 / math.sqrt(in_dims)  # mlx-lm's initialisation: U(-1/sqrt(in), 1/sqrt(in)), B = 0
        a = torch.rand((in_dims, rank), generator=generator, dtype=torch.float32) * 2 * bound - bound
        self.lora_a = nn.Parameter(a.to(linear.weight.device))
        self.lora_b = nn.Parameter(torch.zeros((rank, out_dims), device=linear.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        if self.scale == 0.0:  # adapters disabled: the reference model, exactly
            return y
        if self.dropout.p > 0:
            x = self.dropout(x)
        z = (x.to(self.lora_a.dtype) @ self.lora_a) @ self.lora_b
        return y + (self.scale * z).to(y.dtype)


@dataclass
class TorchModels:
    policy: nn.Module
    reference: Optional[nn.Module]  # None: the policy with its adapters off
    tokenizer: object
    adapter_config: dict  # the same adapter_config.json the MLX engine writes
    notes: list[str]
    autocast: bool = False  # full fine-tuning under bfloat16 autocast (compute.fp16 on CUDA)


def load_torch_models(cfg: Config, device: torch.device) -> TorchModels:
    # mlx-lm's tokenizer loader, as the MLX engine uses: both engines encode data identically.
    from ..data.lengths import load_tokenizer

    half = _half_dtype(cfg, device)
    policy = _load(cfg.policy_path, cfg, device, half if cfg.model.finetune == "lora" else None)
    tokenizer = load_tokenizer(cfg.policy_path, cfg.model.trust_remote_code)
    autocast = cfg.model.finetune == "full" and half == torch.bfloat16
    notes = [_precision_note(half, cfg.model.finetune, autocast)]
    reference = None
    if cfg.model.finetune == "full" or cfg.reference_path != cfg.policy_path:
        reference = _load(cfg.reference_path, cfg, device, half)
        reference.requires_grad_(False)
        reference.eval()
    blocks = _blocks(policy)
    num_layers = len(blocks) if cfg.model.lora_layers < 0 else cfg.model.lora_layers
    adapter_config = {"fine_tune_type": cfg.model.finetune, "num_layers": num_layers}
    if cfg.model.finetune == "lora":
        policy.requires_grad_(False)
        adapter_config["lora_parameters"] = attach_lora(policy, blocks, num_layers, cfg)
    if cfg.compute.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    notes.append(f"gradient checkpointing: {'on' if cfg.compute.gradient_checkpointing else 'off'}")
    policy.train()
    return TorchModels(policy, reference, tokenizer, adapter_config, notes, autocast)


def _precision_note(half: Optional[torch.dtype], finetune: str, autocast: bool) -> str:
    if half is None:
        return "precision: float32"
    if finetune == "lora":
        return f"precision: {str(half).replace('torch.', '')} base weights, float32 adapters"
    if autocast:
        return "precision: float32 weights and optimizer state, bfloat16 autocast"
    return "precision: float32 (compute.fp16 ignored: no bfloat16 on this GPU, and float16 needs loss scaling)"


def _half_dtype(cfg: Config, device: torch.device) -> Optional[torch.dtype]:
    """compute.fp16 on CUDA: bfloat16 where the GPU has it (no loss scaling needed), else
    float16. The CPU stays float32, as with the MLX engine."""
    if not cfg.compute.fp16 or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _load(path: str, cfg: Config, device: torch.device, dtype: Optional[torch.dtype]) -> nn.Module:
    import transformers
    from transformers import AutoModelForCausalLM

    _reject_mlx_only(path)
    # transformers >= 4.56 names the argument `dtype`; older releases call it `torch_dtype`.
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    kwargs = {key: dtype or torch.float32, "trust_remote_code": cfg.model.trust_remote_code}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        raise UserError(f"model {path!r} cannot be loaded by transformers for the PyTorch engine: "
                        f"{str(err).splitlines()[0]}") from None
    model.config.use_cache = False
    return model.to(device)


def _reject_mlx_only(path: str) -> None:
    config = Path(path) / "config.json"
    if config.is_file() and "quantization" in json.loads(config.read_text()):
        raise UserError(f"model {path!r} is an MLX-quantized checkpoint, which PyTorch cannot load: "
                        "use the original (unquantized) Hugging Face model with compute.device: cuda")


def _blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks (`model.layers` in llama, qwen2, mistral, gemma, phi3)."""
    inner = getattr(model, "model", None)
    blocks = getattr(inner, "layers", None)
    if not isinstance(blocks, nn.ModuleList):
        raise UserError(f"the PyTorch engine expects a decoder with `model.layers` blocks; "
                        f"{type(model).__name__} has none")
    return blocks


def attach_lora(model: nn.Module, blocks: nn.ModuleList, num_layers: int, cfg: Config) -> dict:
    """Wrap the linear layers named by model.lora_keys (default: every linear layer inside a
    block) in the top `num_layers` blocks, like mlx-lm's `linear_to_lora_layers`."""
    m = cfg.model
    params = {"rank": m.lora_rank, "scale": m.lora_scale, "dropout": m.lora_dropout}
    if m.lora_keys:
        params["keys"] = list(m.lora_keys)
    keys = set(m.lora_keys or [n for b in blocks for n, mod in b.named_modules() if isinstance(mod, nn.Linear)])
    generator = torch.Generator().manual_seed(cfg.training.seed)  # same start on every rank
    chosen = list(blocks[len(blocks) - num_layers:]) if num_layers > 0 else []
    for block in chosen:
        _wrap(block, keys, params, generator)
    _wrap(model, keys, params, generator)  # model-level keys such as lm_head, as mlx-lm allows
    return params


def _wrap(root: nn.Module, keys: set, params: dict, generator: torch.Generator) -> None:
    for name, module in list(root.named_modules()):
        if name in keys and isinstance(module, nn.Linear):
            parent_name, _, child = name.rpartition(".")
            parent = root.get_submodule(parent_name) if parent_name else root
            setattr(parent, child, LoRALinear(module, params["rank"], params["scale"],
                                              params["dropout"], generator))


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """The policy as its own reference: every LoRA branch contributes nothing inside."""
    with scales_zeroed(lora_layers(model)):
        yield model


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Trainable parameters under their mlx-lm names (tied weights appear once)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
