"""Comparisons of the policy and the reference for init_checks.py: the verdicts, the MLX models'
side of them and the tokenizers (engines/torch_compare.py reads PyTorch models for the same verdicts).

With LoRA, mlx-lm wraps each adapted linear layer: its base weight lives at `<path>.linear.weight`
next to `lora_a` / `lora_b`, and the layer computes W x + scale * (x A) B. The policy's
effective weights are therefore the base weights plus scale * A B, and the reference (a
separate model, or the policy with adapters off) must equal exactly that at the start.
"""
from __future__ import annotations

from typing import Callable, Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from .gates import Check, judge
from .models import ADAPTER_LEAVES, Models, lora_modules


def base_name(name: str, wrapped: set) -> Optional[str]:
    """A parameter's name in the model without LoRA wrappers (`<path>.linear.weight` of a wrapped
    layer is `<path>.weight`); None for the adapters themselves. Both engines name them alike."""
    owner, _, leaf = name.rpartition(".")
    if leaf in ADAPTER_LEAVES:
        return None
    module, _, last = owner.rpartition(".")
    return f"{module}.{leaf}" if last == "linear" and module in wrapped else name


# -- the verdicts, from what either engine reads off its models ----------------------------------
def separate_reference_frozen(leaked: list, misused: bool) -> Check:
    """leaked: the reference's trainable parameters; misused: it is the policy, or in training mode."""
    ok = not leaked and not misused
    detail = ("separate reference model: no trainable parameters, eval mode" if ok else
              f"the reference has {len(leaked)} trainable parameter(s) (first: {leaked[:1]}) "
              f"or is in training mode / shared with the policy")
    return Check("reference_frozen", None, None, "", ok, detail)


def shared_reference_frozen(adapters: int, base_trainable: list) -> Check:
    """The reference is the policy with its adapters off: only the adapters may train."""
    ok = adapters > 0 and not base_trainable
    detail = (f"reference = policy with its {adapters} LoRA adapters off; only adapters are trainable"
              if ok else f"the policy trains {len(base_trainable)} base weight(s) (first: {base_trainable[:1]}) "
                         f"that the adapters-off reference shares, or has no adapters ({adapters})")
    return Check("reference_frozen", None, None, "", ok, detail)


def equality_verdict(models, base_weights: Callable, adapter_delta: Callable, max_diff: Callable) -> Check:
    """The policy's effective weights against the reference's, for either engine's model pair
    (`.policy`, `.reference`; None: the policy with adapters off), through its readers: the base
    weights by name, the adapters' largest contribution, a tensor pair's largest difference (inf
    for different shapes)."""
    adapter = adapter_delta(models)
    if models.reference is None:
        return judge("policy_equals_reference", adapter, 0.0, "<=",
                     "shared base weights; max |scale * A B| of the adapters")
    policy, reference = base_weights(models.policy), base_weights(models.reference)
    common = sorted(set(policy) & set(reference))
    if not common or set(policy) != set(reference):
        return Check("policy_equals_reference", None, 0.0, "<=", False,
                     "parameter names differ; see architectures_match")
    diffs = {name: max_diff(policy[name], reference[name]) for name in common}
    worst = max(diffs, key=diffs.get)
    value = max(diffs[worst], adapter)
    detail = f"max |dW| over {len(common)} tensors" + (f" (largest at {worst})" if diffs[worst] else "")
    if diffs[worst] == float("inf"):
        detail = f"shapes differ at {worst}; see architectures_match"
    return judge("policy_equals_reference", value, 0.0, "<=", detail)


def architecture_verdict(models, base_weights: Callable) -> Check:
    """Same model class, parameter names and shapes, for either engine's model pair."""
    if models.reference is None:
        return Check("architectures_match", None, None, "", True,
                     "one model: the reference is the policy with adapters off")
    kinds = [f"{type(m).__module__}.{type(m).__name__}" for m in (models.policy, models.reference)]
    if kinds[0] != kinds[1]:
        return Check("architectures_match", None, None, "", False, f"model classes differ: {kinds[0]} vs {kinds[1]}")
    policy, reference = base_weights(models.policy), base_weights(models.reference)
    missing = sorted(set(policy) ^ set(reference))
    if missing:
        return Check("architectures_match", None, None, "", False,
                     f"{len(missing)} parameter(s) in only one model, first: {missing[0]}")
    shapes = [n for n in sorted(policy) if tuple(policy[n].shape) != tuple(reference[n].shape)]
    if shapes:
        n = shapes[0]
        return Check("architectures_match", None, None, "", False, f"{len(shapes)} shape mismatch(es), first: "
                     f"{n} {tuple(policy[n].shape)} vs {tuple(reference[n].shape)}")
    return Check("architectures_match", None, None, "", True,
                 f"{kinds[0]}, {len(policy)} parameter tensors with equal shapes")


# -- MLX models ----------------------------------------------------------------------------------
def _base_weights(model) -> dict:
    """Parameters without adapters, named as in the model without LoRA wrappers."""
    wrapped = {name for name, m in model.named_modules() if hasattr(m, "lora_a")}
    named = ((base_name(name, wrapped), value) for name, value in tree_flatten(model.parameters()))
    return {name: value for name, value in named if name is not None}


def reference_frozen(models: Models) -> Check:
    if models.reference is not None:
        leaked = [n for n, _ in tree_flatten(models.reference.trainable_parameters())]
        return separate_reference_frozen(leaked, models.reference is models.policy or models.reference.training)
    trainable = [n for n, _ in tree_flatten(models.policy.trainable_parameters())]
    return shared_reference_frozen(len(lora_modules(models.policy)),
                                   [n for n in trainable if n.rsplit(".", 1)[-1] not in ADAPTER_LEAVES])


def _max_diff(a: mx.array, b: mx.array) -> float:
    if a.shape != b.shape:
        return float("inf")
    if not mx.issubdtype(a.dtype, mx.floating):  # quantized weights: packed integers
        return float(mx.any(a != b).item())
    return float(mx.max(mx.abs(a.astype(mx.float32) - b.astype(mx.float32))).item())


def _adapter_delta(models: Models) -> float:
    """Largest |scale * A B| entry over all LoRA layers: what the adapters add to the weights."""
    worst = 0.0
    for layer in lora_modules(models.policy):
        delta = layer.scale * (layer.lora_a.astype(mx.float32) @ layer.lora_b.astype(mx.float32))
        worst = max(worst, float(mx.max(mx.abs(delta)).item()))
    return worst


def policy_equals_reference(models: Models) -> Check:
    return equality_verdict(models, _base_weights, _adapter_delta, _max_diff)


def architectures_match(models: Models) -> Check:
    return architecture_verdict(models, _base_weights)


# -- tokenizers (mlx-lm's loader, for both engines) ------------------------------------------------
def _special_tokens(tok) -> dict:
    added = getattr(tok, "added_tokens_decoder", {}) or {}
    return {"map": dict(getattr(tok, "special_tokens_map", {}) or {}),
            "ids": {k: getattr(tok, f"{k}_token_id", None) for k in ("eos", "bos", "pad", "unk")},
            "eos_ids": sorted(getattr(tok, "eos_token_ids", None) or []),
            "added": {i: (str(t), bool(getattr(t, "special", False))) for i, t in added.items()}}


def tokenizers_agree(policy_tok, reference_tok) -> Check:
    problems = []
    pv, rv = policy_tok.get_vocab(), reference_tok.get_vocab()
    if pv != rv:
        only_p, only_r = sorted(set(pv) - set(rv)), sorted(set(rv) - set(pv))
        moved = sorted(t for t in set(pv) & set(rv) if pv[t] != rv[t])
        first = (f"only in the policy's: {only_p[:3]}" if only_p else
                 f"only in the reference's: {only_r[:3]}" if only_r else f"ids differ for {moved[:3]}")
        problems.append(f"vocabularies differ ({len(pv)} vs {len(rv)} tokens; {first})")
    ps, rs = _special_tokens(policy_tok), _special_tokens(reference_tok)
    for key, what in (("map", "special tokens"), ("ids", "special token ids"),
                      ("eos_ids", "EOS token ids"), ("added", "added tokens")):
        if ps[key] != rs[key]:
            problems.append(f"{what} differ: {ps[key]} vs {rs[key]}"[:300])
    if getattr(policy_tok, "chat_template", None) != getattr(reference_tok, "chat_template", None):
        problems.append("chat templates differ")
    if problems:
        return Check("tokenizers_agree", None, None, "", False, "; ".join(problems))
    return Check("tokenizers_agree", None, None, "", True,
                 f"same vocabulary ({len(pv)} tokens), special tokens and chat template")
