"""Stage 3: is the model pair ready for DPO? Run at the start of every training run and alone
as `mlx-dpo init-check CONFIG`.

  reference_frozen         nothing the optimizer updates can change the reference
  policy_equals_reference  the policy's effective weights equal the reference's (max |dW| = 0)
  architectures_match      same model class, same parameter names and shapes
  tokenizers_agree         same vocabulary, special tokens and chat template (a mismatch is an
                           error: the two models would score different token sequences)
  initial_kl               exact token KL(policy || reference) on a validation batch < 1e-6

A resumed run has trained the policy on purpose: the two "policy starts as the reference"
checks are then skipped. The model checks read the MLX engine's models (model_compare.py) and
the PyTorch engine's (engines/torch_compare.py); another engine skips them.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from .data.batching import collate
from .errors import TrainingStopped
from .gates import Check, format_checks, judge

KL_LIMIT = 1e-6


class InitCheckFailed(TrainingStopped):
    """A stage-3 check failed: training does not start (exit code 1)."""


def run_init_checks(cfg, engine, pairs: list, batch_size: int, step: int = 0,
                    source: str = "validation") -> list[Check]:
    """Every check's verdict. `pairs` are encoded pairs; the first batch_size form the KL batch."""
    models = getattr(engine, "models", None)
    mc = _model_comparisons(models)
    if mc is None:
        models = None
    resumed = f"skipped: resumed at step {step}, the policy has trained" if step else None
    checks = []
    if mc is None:
        why = f"skipped: {type(engine).__name__} exposes no models these checks can read"
        checks += [Check(n, None, None, "", True, why, skipped=True)
                   for n in ("reference_frozen", "policy_equals_reference", "architectures_match")]
    else:
        checks.append(mc.reference_frozen(models))
        checks.append(_skipped("policy_equals_reference", resumed) or mc.policy_equals_reference(models))
        checks.append(mc.architectures_match(models))
    checks.append(_tokenizers(cfg, engine, models))
    mismatch = [c.name for c in checks if c.name in ("architectures_match", "tokenizers_agree") and not c.passed]
    if mismatch:  # different vocabularies or shapes: the two distributions cannot be compared
        checks.append(Check("initial_kl", None, KL_LIMIT, "<", False,
                            f"not measurable: {' and '.join(mismatch)} failed"))
    else:
        checks.append(_skipped("initial_kl", resumed) or initial_kl(engine, pairs, batch_size, source))
    return checks


def _model_comparisons(models):
    """The module that reads this engine's models for the model checks; None for any other engine."""
    kind = type(models).__module__
    if kind == "mlx_dpo.models":
        from . import model_compare

        return model_compare
    if kind == "mlx_dpo.engines.torch_models":
        from .engines import torch_compare

        return torch_compare
    return None


def _skipped(name: str, why: Optional[str]) -> Optional[Check]:
    return Check(name, None, None, "", True, why, skipped=True) if why else None


def _tokenizers(cfg, engine, models) -> Check:
    from .model_compare import tokenizers_agree

    if models is not None and models.reference is None:
        return Check("tokenizers_agree", None, None, "", True,
                     "one model and one tokenizer (the reference is the policy with adapters off)")
    from .data.lengths import load_tokenizer

    reference_tok = load_tokenizer(cfg.reference_path, cfg.model.trust_remote_code)
    return tokenizers_agree(engine.tokenizer, reference_tok)


def initial_kl(engine, pairs: list, batch_size: int, source: str = "validation") -> Check:
    """KL per completion token on the first batch, through the engine's own evaluate()."""
    if not pairs:
        return Check("initial_kl", None, KL_LIMIT, "<", False, f"no {source} pairs to measure it on")
    batch = collate(pairs[:batch_size], engine.tokenizer.eos_token_id or 0)
    sums = engine.evaluate(batch)
    kl = sums["kl_sum"] / max(sums["kl_tokens"], 1.0)
    loss = sums["loss"] / max(sums["pairs"], 1.0)
    return judge("initial_kl", float(kl), KL_LIMIT, "<",
                 f"{batch.num_pairs} {source} pairs, {int(sums['kl_tokens'])} completion tokens; "
                 f"loss {loss:.4f} (ln 2 = {np.log(2):.4f} when policy == reference)")


def report_init_checks(checks: list[Check], echo: Callable[[str], None] = print) -> None:
    """Print every check; raise InitCheckFailed when one failed."""
    for line in format_checks("model initialisation (stage 3)", checks):
        echo(line)
    failed = [c for c in checks if not c.passed and not c.skipped]
    if failed:
        raise InitCheckFailed("initialisation check(s) failed: "
                              + "; ".join(f"{c.name}: {c.detail}" for c in failed)
                              + ". Fix the models, or set constraints.init_checks: false to train anyway.")


def check_run_start(cfg, engine, data, batch_size: int, step: int, echo: Callable[[str], None]) -> None:
    """The run's stage-3 gate, on validation pairs (training pairs when there are none)."""
    if not cfg.constraints.init_checks:
        echo("initialisation checks: off (constraints.init_checks: false)")
        return
    pairs, source = (data.val.pairs, "validation") if data.val is not None else (data.train.pairs, "training")
    report_init_checks(run_init_checks(cfg, engine, pairs, batch_size, step, source), echo)
