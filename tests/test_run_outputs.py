"""What a run does with an output folder that already holds one, and with --resume."""
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlx_dpo.cli import main
from mlx_dpo.errors import UserError
from mlx_dpo.models import load_models
from mlx_dpo.run import run_training


def quiet(_line):
    pass


@pytest.fixture
def finished(make_config):
    """A finished 2-step run, with a file of the user's own beside it."""
    cfg = make_config(**{"training.max_steps": 2, "training.save_steps": 2})
    run_training(cfg, echo=quiet, progress=False)
    out = Path(cfg.logging.output_dir)
    (out / "NOTES.txt").write_text("mine")
    return cfg, out


def test_overwrite_that_cannot_start_leaves_the_earlier_run_alone(make_config, finished, tmp_path, tiny_model):
    cfg, out = finished
    before = sorted(p.name for p in out.iterdir())
    broken = tmp_path / "broken-model"  # a model folder whose weights are missing: fails as it loads
    broken.mkdir()
    shutil.copy(tiny_model / "config.json", broken / "config.json")
    with pytest.raises(UserError, match="broken-model"):
        run_training(make_config(**{"model.base_model": str(broken)}), overwrite=True, echo=quiet, progress=False)
    assert sorted(p.name for p in out.iterdir()) == before


def test_overwrite_removes_only_the_earlier_runs_files(make_config, finished):
    cfg, out = finished
    lines = []
    run_training(make_config(**{"training.max_steps": 1}), overwrite=True, echo=lines.append, progress=False)
    assert (out / "NOTES.txt").read_text() == "mine"
    assert not (out / "checkpoint-2").exists() and (out / "checkpoint-1").is_dir()
    assert [json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()][0] == 0
    assert max(json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()) == 1
    assert any(line.startswith("starting again: removing the earlier run") for line in lines)


def test_a_finished_run_without_checkpoints_is_not_mixed_into(make_config, finished):
    cfg, out = finished
    for folder in out.glob("checkpoint-*"):
        shutil.rmtree(folder)  # kept only final/ and metrics.jsonl
    with pytest.raises(UserError, match=r"already holds a run \(best.json, final, metrics.jsonl\)"):
        run_training(cfg, echo=quiet, progress=False)
    with pytest.raises(UserError, match="--resume: .* has no checkpoint to continue from"):
        run_training(cfg, resume=True, echo=quiet, progress=False)
    with pytest.raises(UserError, match="--resume and --overwrite contradict each other"):
        run_training(cfg, resume=True, overwrite=True, echo=quiet, progress=False)


def test_resume_lists_the_settings_that_differ_from_the_checkpoints_run(make_config, finished):
    cfg, out = finished
    lines = []
    run_training(make_config(**{"training.max_steps": 3, "training.beta": 0.5}), resume=True,
                 echo=lines.append, progress=False)
    changed = [line for line in lines if "differ from the checkpoint's run" in line]
    assert len(changed) == 1 and "training.beta: 0.1 -> 0.5" in changed[0]
    assert "training.max_steps: 2 -> 3" in changed[0]


def test_smoke_refuses_resume_and_overwrite():
    result = CliRunner().invoke(main, ["train", "--smoke", "--resume"])
    assert result.exit_code == 2 and "--smoke writes only to a temporary folder" in result.output


def test_lora_keys_that_name_no_layer_are_refused_with_the_choices(make_config):
    cfg = make_config(**{"model.lora_keys": ["self_attn.q_proj", "self_attn.qproj"]})
    with pytest.raises(UserError, match=r"model.lora_keys: self_attn.qproj: no such layer .* self_attn.q_proj"):
        load_models(cfg)


def test_a_run_without_validation_pairs_says_the_kl_target_is_not_enforced(make_config):
    lines = []
    run_training(make_config(**{"data.validation_file": None, "training.max_steps": 1}),
                 echo=lines.append, progress=False)
    assert any("constraints.kl_target is not enforced: no data.validation_file" in line for line in lines)


def test_skip_bad_records_is_one_flag_name_everywhere(tiny_data, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(open(tiny_data["train"]).read() + "not json\n")
    result = CliRunner().invoke(main, ["data", "split", str(bad), "--skip-bad-records"])
    assert result.exit_code == 0 and "skipped 1 malformed records" in result.output, result.output
