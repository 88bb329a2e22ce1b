"""Where metrics go: OUTPUT_DIR/metrics.jsonl, the console, and W&B when configured."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .config import Config

CONSOLE_KEYS = ("loss", "rewards/accuracies", "rewards/margins", "kl", "preference_gap", "learning_rate",
                "grad_norm", "pairs_per_sec")


class MetricsLog:
    def __init__(self, cfg: Config, enabled: bool = True, echo=None):
        self.enabled = enabled
        self.echo = echo or (lambda line: print(line, file=sys.stderr))
        self.path = Path(cfg.logging.output_dir) / "metrics.jsonl"
        self.wandb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if cfg.logging.wandb_project:
                self.wandb = _start_wandb(cfg, self.echo)

    def log(self, step: int, metrics: dict, prefix: str = "") -> None:
        if not self.enabled:
            return
        row = {"step": step, **{prefix + k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log(row, step=step)
        shown = [f"{prefix}{k}={_fmt(metrics[k])}" for k in CONSOLE_KEYS if k in metrics]
        self.echo(f"step {step:>6} | " + " ".join(shown))

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def _start_wandb(cfg: Config, echo):
    try:
        import wandb
    except ImportError:
        echo("logging.wandb_project is set but wandb is not installed (pip install wandb): "
             "logging to metrics.jsonl only")
        return None
    return wandb.init(project=cfg.logging.wandb_project, name=cfg.logging.wandb_run_name,
                      config=cfg.to_dict())


def _plain(v):
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-3 or abs(v) >= 1e4 else f"{v:.4f}"
    return str(v)
