"""Write docs/config.md from the config dataclasses (the one place keys, defaults and help live).

    .venv/bin/python scripts/make_config_docs.py          # rewrite docs/config.md
    .venv/bin/python scripts/make_config_docs.py --check  # exit 1 if it is out of date
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mlx_dpo.config import describe

DOC = Path(__file__).resolve().parent.parent / "docs" / "config.md"

HEADER = """# Config reference

`mlx-dpo train CONFIG.yaml` reads a YAML file with the workflow template's sections
(configs/dpo_config.yaml is the template itself and loads as is). Every key is optional unless
marked; unknown keys, wrong types and impossible values stop the run before any model loads,
with the file, the key and what is allowed (exit code 2). Override any key on the command line:
`--set training.beta=0.2`. Relative data paths are resolved against the current directory; a
model path that is not a local folder is taken as a Hugging Face repo id.

Generated from `mlx_dpo/config.py` by `scripts/make_config_docs.py`; do not edit by hand.
"""

NOTES = """
## Notes

- **Truncation policy.** A completion longer than `data.max_response_length` keeps its first
  tokens (its EOS is then cut); a prompt longer than `data.max_prompt_length` keeps its last
  tokens (the part nearest the answer). Completions are never empty. The number of truncated
  pairs is printed per file at start-up.
- **Chat template.** With `data.chat_template: auto` a tokenizer that has a template renders the
  prompt as a user turn (or the given message list) plus the generation prompt, and each
  completion as the assistant turn; every completion ends with the tokenizer's EOS token.
  Log-probs count completion tokens only.
- **Effective batch.** `training.batch_size x training.gradient_accumulation_steps` pairs per
  optimizer step on one device; the loss is the mean over all pairs of the step, so 8 micro-batches
  of 1 make the same update as one batch of 8.
- **batch_size: auto** takes the per-device value from `mlx_dpo/hardware.py`'s table
  (Apple M4 Max 32, M3 Ultra 4, M4 Pro 16, M3 Max 16, M2 Ultra 8, M2 Max 8, M1 Max/Ultra 4, CPU 4).
- **Learning-rate schedule.** Linear warm-up over `warmup_steps` (step s uses (s+1)/warmup of the
  peak), then cosine/linear decay to `min_lr_ratio` x peak at `max_steps`, or constant.
- **Non-finite steps.** A step whose loss or gradient norm is not finite is skipped and logged;
  `training.max_bad_steps` in a row stop the run (exit 1); the last checkpoint stays intact.
"""


def render() -> str:
    lines = [HEADER]
    section = None
    for key, kind, default, help_text in describe():
        name = key.split(".")[0]
        if name != section:
            section = name
            lines += [f"\n## {section}\n", "| key | type | default | meaning |", "|---|---|---|---|"]
        kind = kind.replace("Optional[", "").replace("Union[int, str]", "int or auto").rstrip("]")
        lines.append(f"| `{key}` | {kind} | `{default!r}` | {help_text} |")
    return "\n".join(lines) + "\n" + NOTES


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check that docs/config.md is current")
    args = parser.parse_args()
    text = render()
    if args.check:
        current = DOC.read_text() if DOC.exists() else ""
        if current != text:
            print(f"{DOC} is out of date: run scripts/make_config_docs.py", file=sys.stderr)
            return 1
        return 0
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(text)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
