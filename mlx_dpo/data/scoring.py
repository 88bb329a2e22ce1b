"""`data score`: per-pair sequence log-probs of chosen and rejected under a model, and with a
reference, DPO's implicit rewards and their margin.

Pairs are encoded by the trainer's PairEncoder (chat template, truncation at the configured
limits), batched by its `collate`, and scored by its `sequence_logps` (completion tokens
only), so a log-prob here is the number training computes for the same pair.

    reward_chosen   = beta * (logp_chosen   - ref_logp_chosen)
    reward_rejected = beta * (logp_rejected - ref_logp_rejected)
    reward_margin   = reward_chosen - reward_rejected
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import UserError
from .files import check_outputs
from .keys import pair_id
from .records import read_pairs


@dataclass
class ScoreResult:
    out: str
    pairs: int
    truncated: int
    skipped: list          # RecordError (only with on_bad="skip")
    mean_margin: Optional[float]
    accuracy: Optional[float]  # share of pairs with reward_margin > 0


def load_scoring_model(path: str, adapter: Optional[str] = None, trust_remote_code: bool = False):
    """(model, tokenizer) through mlx-lm, adapters applied; float32 weights in eval mode."""
    import mlx.core as mx
    from mlx_lm import load

    try:
        model, tokenizer = load(path, adapter_path=adapter,
                                tokenizer_config={"trust_remote_code": trust_remote_code})
    except Exception as err:  # missing folder, unknown architecture, offline hub id
        what = f"model {path!r}" + (f" with adapters {adapter!r}" if adapter else "")
        raise UserError(f"cannot load {what}: {type(err).__name__}: {str(err)[:300]}") from None
    model.set_dtype(mx.float32)
    model.eval()
    return model, tokenizer


def score_pairs(pairs_path, model: str, out, adapter: Optional[str] = None,
                reference: Optional[str] = None, beta: float = 0.1, batch_size: int = 8,
                max_prompt_length: int = 512, max_response_length: int = 1024,
                chat_template: str = "auto", on_bad: str = "error", overwrite: bool = False) -> ScoreResult:
    """Score every pair of `pairs_path` and write one JSON row per pair to `out`; an existing
    `out` is replaced only with `overwrite`, and never when it is the pairs file."""
    check_outputs(pairs_path, [out], overwrite)  # before the model loads: a refusal costs nothing

    import mlx.core as mx

    from ..logprobs import sequence_logps
    from ..models import adapters_disabled
    from .batching import collate
    from .tokenize import PairEncoder

    data = read_pairs(pairs_path, on_bad)
    policy, tokenizer = load_scoring_model(model, adapter)
    same_model = reference is not None and Path(reference).resolve() == Path(model).resolve()
    # With LoRA adapters the reference is this model with adapters off; a full fine-tune's
    # "adapter" folder replaces the weights, so its reference must be loaded on its own.
    same_base = same_model and adapter is not None and _adapter_kind(adapter) != "full"
    if same_model and adapter is not None and not same_base:
        same_model = False
    ref_model = None
    if reference is not None and not same_model:
        ref_model, _ = load_scoring_model(reference)
    encoder = PairEncoder(tokenizer, max_prompt_length, max_response_length, chat_template)
    encoded = [encoder.encode(p) for p in data.pairs]
    pad = tokenizer.eos_token_id or 0

    def logps(net, batch):
        out = sequence_logps(net(mx.array(batch.inputs)), mx.array(batch.targets), mx.array(batch.mask))
        mx.eval(out)
        return out.tolist()

    rows: list[Optional[dict]] = [None] * len(encoded)
    order = sorted(range(len(encoded)), key=lambda i: encoded[i].length)  # less padding
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = collate([encoded[i] for i in idx], pad)
        pol = logps(policy, batch)
        ref = None
        if same_base:
            with adapters_disabled(policy):  # the training reference: the base without adapters
                ref = logps(policy, batch)
        elif same_model:
            ref = pol  # the same weights: no second copy, no second pass
        elif ref_model is not None:
            ref = logps(ref_model, batch)
        for k, i in enumerate(idx):
            rows[i] = _row(data.pairs[i], encoded[i], pol[k], pol[k + len(idx)],
                           None if ref is None else (ref[k], ref[k + len(idx)]), beta)
    _write(out, rows)
    margins = [r["reward_margin"] for r in rows if "reward_margin" in r]
    return ScoreResult(str(out), len(rows), sum(e.truncated for e in encoded), data.bad,
                       sum(margins) / len(margins) if margins else None,
                       sum(m > 0 for m in margins) / len(margins) if margins else None)


def _adapter_kind(folder: str) -> str:
    import json

    config = Path(folder) / "adapter_config.json"
    return json.loads(config.read_text()).get("fine_tune_type", "lora") if config.exists() else "lora"


def _row(pair, enc, logp_c: float, logp_r: float, ref, beta: float) -> dict:
    row = {"line": pair.line, "id": pair_id(pair), "logp_chosen": logp_c, "logp_rejected": logp_r,
           "tokens_chosen": len(enc.chosen), "tokens_rejected": len(enc.rejected),
           "truncated": enc.truncated}
    if ref is not None:
        reward_c, reward_r = beta * (logp_c - ref[0]), beta * (logp_r - ref[1])
        row.update(ref_logp_chosen=ref[0], ref_logp_rejected=ref[1], beta=beta,
                   reward_chosen=reward_c, reward_rejected=reward_r, reward_margin=reward_c - reward_r)
    return row


def _write(out, rows: list) -> None:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    tmp.replace(path)
