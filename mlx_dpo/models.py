"""Load policy and reference through mlx-lm, attach LoRA, switch adapters off for the reference.

With LoRA and one checkpoint for both roles, the reference is the policy with its adapters'
scale set to zero: no second copy of the weights. Otherwise (full fine-tuning, or a distinct
reference_model) the reference is a separately loaded, frozen model.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import cpu_layers, cpu_lora, recompute
from .config import Config
from .engines.base import scales_zeroed
from .errors import UserError

ADAPTER_LEAVES = ("lora_a", "lora_b")


@dataclass
class Models:
    policy: nn.Module
    reference: Optional[nn.Module]  # None: the policy with adapters off
    tokenizer: object
    model_config: dict
    adapter_config: dict  # what mlx-lm's load_adapters reads
    notes: list[str]  # what precision / checkpointing was actually used, for the log


def load_models(cfg: Config, device_kind: str = "cpu") -> Models:
    from mlx_lm.tuner.utils import linear_to_lora_layers

    policy, tokenizer, model_config = _load(cfg.policy_path, cfg.model.trust_remote_code)
    cpu_layers.use_native_layers(policy, trained_linears=cfg.model.finetune == "full")
    notes = [_set_precision(policy, cfg.compute.fp16, device_kind, cfg.model.finetune)]
    separate_ref = cfg.model.finetune == "full" or cfg.reference_path != cfg.policy_path
    reference = None
    if separate_ref:
        reference, ref_tokenizer, _ = _load(cfg.reference_path, cfg.model.trust_remote_code)
        _set_precision(reference, cfg.compute.fp16, device_kind, "frozen")
        cpu_layers.use_native_layers(reference)
        reference.freeze()
        reference.eval()
    num_layers = len(policy.layers) if cfg.model.lora_layers < 0 else cfg.model.lora_layers
    adapter_config = {"fine_tune_type": cfg.model.finetune, "num_layers": num_layers}
    if cfg.model.finetune == "lora":
        lora = {"rank": cfg.model.lora_rank, "scale": cfg.model.lora_scale,
                "dropout": cfg.model.lora_dropout}
        if cfg.model.lora_keys:
            lora["keys"] = list(cfg.model.lora_keys)
        policy.freeze()
        mx.random.seed(cfg.training.seed)  # LoRA A matrices are drawn from the global RNG
        _check_lora_keys(cfg, policy)
        linear_to_lora_layers(policy, num_layers, lora)
        cpu_lora.use_addmm(policy)
        if device_kind == "cpu" and cfg.compute.frozen_panels and cfg.compute.fast_cpu_math:
            size = cpu_lora.pack_frozen_weights(policy)
            amount = f"{size / 2**30:.2f} GB" if size >= 2**30 // 10 else f"{size / 2**20:.1f} MB"
            notes.append(f"frozen panels: {amount} (LoRA's frozen weights packed once)" if size else
                         "frozen panels: not available (mlx-dpo's C++ kernels or OpenBLAS's micro-kernel not found)")
        adapter_config["lora_parameters"] = lora
    if cfg.compute.gradient_checkpointing:
        for layer in policy.layers:
            checkpoint_layer(layer)
        notes.append("gradient checkpointing: on (per transformer block)")
    else:
        notes.append("gradient checkpointing: off")
    policy.train()
    return Models(policy, reference, tokenizer, model_config, adapter_config, notes)


def _check_lora_keys(cfg: Config, policy: nn.Module) -> None:
    """mlx-lm adapts the modules whose path inside a block equals a key, and skips a key that
    names none: a typo would leave those layers untrained without a word."""
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    kinds = (nn.Linear, nn.QuantizedLinear, SwitchLinear, QuantizedSwitchLinear, nn.Embedding,
             nn.QuantizedEmbedding)  # what mlx-lm's linear_to_lora_layers can convert
    adaptable = sorted({name for block in policy.layers for name, module in block.named_modules()
                        if hasattr(module, "to_lora") or isinstance(module, kinds)})
    unknown = [key for key in cfg.model.lora_keys or () if key not in adaptable]
    if unknown:
        raise UserError(f"{cfg.source}: model.lora_keys: {', '.join(unknown)}: no such layer in a "
                        f"transformer block; the layers LoRA can adapt are: {', '.join(adaptable)}")


def _load(path: str, trust_remote_code: bool):
    from mlx_lm import load

    try:
        model, tokenizer, config = load(path, return_config=True,
                                        tokenizer_config={"trust_remote_code": trust_remote_code})
    except FileNotFoundError as err:
        where = "" if Path(path).exists() else "not a local folder, and the Hugging Face Hub could not provide it: "
        raise UserError(f"model {path!r}: {where}{err}") from None
    except ValueError as err:
        raise UserError(f"model {path!r} cannot be loaded by mlx-lm: {err}") from None
    except Exception as err:  # hub errors: offline, unknown repo, gated model
        if type(err).__module__.startswith(("huggingface_hub", "requests", "httpx")):
            raise UserError(f"model {path!r}: not a local folder and the Hugging Face Hub "
                            f"could not provide it ({type(err).__name__}: {err})") from None
        raise
    return model, tokenizer, config


def _set_precision(model: nn.Module, fp16: bool, device_kind: str, role: str) -> str:
    """Half precision only for weights that are not trained (LoRA's base, a frozen reference) and
    only on Metal: the CPU has no fast half-precision matmul, and AdamW on fp16 master weights
    loses small updates. LoRA adapters are created afterwards in float32."""
    if fp16 and device_kind == "metal" and role != "full":
        model.set_dtype(mx.float16)
        return "precision: float16 frozen weights, float32 adapters (compute.fp16, Metal)"
    model.set_dtype(mx.float32)
    if not fp16:
        return "precision: float32"
    why = "no half-precision speed-up on CPU" if device_kind != "metal" else "full fine-tuning keeps fp32 weights"
    return f"precision: float32 (compute.fp16 ignored: {why})"


def checkpoint_layer(layer: nn.Module) -> None:
    """Recompute this block's activations in the backward pass.

    Only this instance changes class (a one-off subclass), so parameter names stay the same
    and no library class is patched globally.
    """
    base = type(layer)
    call = base.__call__

    def checkpointed(self, x, *args, **kwargs):
        # Only the parameters and the hidden states go through the checkpoint (it takes arrays);
        # the mask and the cache, which need no gradient, are closed over.
        def inner(params, x):
            self.update(params)
            return call(self, x, *args, **kwargs)

        return recompute.checkpoint(inner)(self.trainable_parameters(), x)

    layer.__class__ = type(f"Checkpointed{base.__name__}", (base,), {"__call__": checkpointed})


def lora_modules(model: nn.Module) -> list[nn.Module]:
    return [m for _, m in model.named_modules() if hasattr(m, "lora_a") and hasattr(m, "scale")]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Run the model as its own reference: LoRA branches contribute nothing inside."""
    with scales_zeroed(lora_modules(model)):
        yield model


def reference_forward(models: Models, inputs: mx.array) -> mx.array:
    """Reference logits, never differentiated."""
    if models.reference is not None:
        return mx.stop_gradient(models.reference(inputs))
    with adapters_disabled(models.policy):
        return mx.stop_gradient(models.policy(inputs))


def trainable_weights(model: nn.Module) -> dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


def save_adapters(models: Models, folder: Path) -> None:
    """Trainable weights + adapter_config.json: `mlx_lm.load(base, adapter_path=folder)` works."""
    mx.save_safetensors(str(folder / "adapters.safetensors"), trainable_weights(models.policy))
    (folder / "adapter_config.json").write_text(json.dumps(models.adapter_config, indent=2))


def load_trainable(model: nn.Module, folder: Path) -> None:
    weights = mx.load(str(folder / "adapters.safetensors"))
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())


def export_model(models: Models, folder: Path, source_path: str) -> None:
    """The final model for mlx-lm: LoRA adapters (`mlx_lm.load(base, adapter_path=folder)`),
    or after full fine-tuning a standalone model folder with its tokenizer (`mlx_lm.load(folder)`)."""
    if models.adapter_config["fine_tune_type"] == "lora":
        save_adapters(models, folder)
        return
    from mlx_lm.utils import save

    save(folder, source_path, models.policy, models.tokenizer, dict(models.model_config),
         donate_model=False)
