"""The bench scripts time the batch that mlx-dpo trains with by default. scripts/bench.py keeps that
number as a literal (its orchestrator does not import mlx-dpo, so that a broken install still
reports the peers); this test keeps the literal and the config's default together."""
import importlib.util
import sys
from pathlib import Path

from mlx_dpo.config import TrainingConfig

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def parsed_defaults(name, monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", [f"{name}.py"])
    return module.parse_args()


def test_bench_and_paired_scale_default_to_the_trainers_batch(monkeypatch):
    expected = TrainingConfig().batch_size
    assert parsed_defaults("bench", monkeypatch).batch == expected
    assert parsed_defaults("bench_scale_paired", monkeypatch).batch == expected
