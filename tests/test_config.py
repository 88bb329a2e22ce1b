"""Config: the workflow template loads as is; bad values fail with file, key and what is allowed."""
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlx_dpo.cli import main
from mlx_dpo.config import ConfigError, check_files, describe, load_config

TEMPLATE = Path(__file__).parent.parent / "configs" / "dpo_config.yaml"


def test_workflow_template_loads_with_its_values():
    cfg = load_config(TEMPLATE)
    assert cfg.training.learning_rate == 1.0e-6 and isinstance(cfg.training.learning_rate, float)
    assert cfg.training.beta == 0.1
    assert cfg.training.batch_size == 4 and cfg.training.gradient_accumulation_steps == 4
    assert cfg.optimization.lr_scheduler == "cosine" and cfg.optimization.max_grad_norm == 1.0
    assert cfg.constraints.kl_target == 0.1 and cfg.compute.fp16 is True
    assert cfg.compute.gradient_checkpointing is True and cfg.compute.device == "cuda"
    assert cfg.logging.wandb_project == "dpo-alignment"
    assert cfg.reference_path == "checkpoints/sft_baseline"  # not a local folder: kept as a hub id


def test_one_mac_config_is_the_template_for_a_single_machine():
    template, mac = load_config(TEMPLATE), load_config(TEMPLATE.parent / "one-mac.yaml")
    assert mac.model.reference_model is None and mac.model.policy_model is None  # both from base_model
    assert mac.compute.device == "auto" and mac.compute.num_devices == 1 and mac.training.batch_size == "auto"
    for section in ("optimization", "constraints"):
        assert getattr(mac, section) == getattr(template, section)
    same = ("learning_rate", "beta", "gradient_accumulation_steps", "max_steps", "warmup_steps")
    assert all(getattr(mac.training, k) == getattr(template.training, k) for k in same)


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


BASE = "model: {base_model: m}\ndata: {train_file: t.jsonl}\n"


@pytest.mark.parametrize("extra, message", [
    ("training: {betta: 0.2}", "unknown key(s) training.betta; allowed in training:"),
    ("training: {beta: 0}", "training.beta: 0.0 is out of range; it must be > 0"),
    ("training: {beta: -1}", "training.beta: -1.0 is out of range"),
    ("training: {loss_type: kto}", "training.loss_type: 'kto' is not allowed; choose one of sigmoid, ipo"),
    ("training: {max_steps: ten}", "training.max_steps: expected an integer, got 'ten'"),
    ("training: {max_steps: 1.5}", "training.max_steps: expected an integer"),
    ("compute: {fp16: 1}", "compute.fp16: expected true or false"),
    ("training: {batch_size: big}", "training.batch_size: expected an integer or 'auto'"),
    ("trainer: {}", "unknown section(s) ['trainer']"),
])
def test_bad_values_name_file_key_and_allowed(tmp_path, extra, message):
    path = write(tmp_path, BASE + extra)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_scientific_notation_without_dot_is_a_number(tmp_path):
    cfg = load_config(write(tmp_path, BASE + "training: {learning_rate: 1e-6}"))
    assert cfg.training.learning_rate == 1e-6


def test_overrides_apply_and_are_validated(tmp_path):
    path = write(tmp_path, BASE)
    cfg = load_config(path, ("training.beta=0.2", "training.batch_size=auto"))
    assert cfg.training.beta == 0.2 and cfg.training.batch_size == "auto"
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(path, ("beta=0.2",))
    with pytest.raises(ConfigError, match="training.beta"):
        load_config(path, ("training.beta=-3",))


def test_missing_train_file_is_reported_before_any_model_loads(tmp_path):
    cfg = load_config(write(tmp_path, BASE), base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"data.train_file: file not found: .*t.jsonl"):
        check_files(cfg)


def test_cli_prints_one_clear_line_and_exits_2(tmp_path):
    path = write(tmp_path, BASE + "training: {loss_type: nope}")
    result = CliRunner().invoke(main, ["train", str(path)])
    assert result.exit_code == 2
    assert "training.loss_type" in result.output and "Traceback" not in result.output
    missing = CliRunner().invoke(main, ["train", str(write(tmp_path, BASE))])
    assert missing.exit_code == 2 and "file not found" in missing.output


def test_every_key_has_help():
    rows = describe()
    assert len(rows) > 40 and all(help_text for _, _, _, help_text in rows)


def test_config_reference_in_docs_is_current():
    import subprocess
    import sys

    script = Path(__file__).parent.parent / "scripts" / "make_config_docs.py"
    result = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_set_values_yaml_cannot_read_are_strings_and_errors_name_the_set(tmp_path):
    path = write(tmp_path, BASE)
    cfg = load_config(path, ("data.train_file=*.jsonl", "logging.output_dir=runs/a #1",
                             "logging.wandb_run_name=@run1"))
    assert cfg.data.train_file.endswith("*.jsonl") and cfg.logging.output_dir.endswith("runs/a #1")
    assert cfg.logging.wandb_run_name == "@run1"
    with pytest.raises(ConfigError) as err:
        load_config(path, ("training.beta=[1",))
    assert str(err.value).startswith("--set training.beta=[1: expected a number")
    with pytest.raises(ConfigError) as err:  # the file is fine: the --set is what is wrong
        load_config(path, ("training.beta=0",))
    assert str(err.value).startswith("--set training.beta=0: 0.0 is out of range")


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_non_finite_numbers_are_refused(tmp_path, value):
    with pytest.raises(ConfigError, match="training.learning_rate: expected a finite number"):
        load_config(write(tmp_path, BASE + f"training: {{learning_rate: {value}}}"))


def test_chat_template_on_and_off_as_documented(tmp_path):
    # YAML 1.1 reads a bare on/off as a boolean; the documented values must still work
    assert load_config(write(tmp_path, BASE), ("data.chat_template=off",)).data.chat_template == "off"
    assert load_config(write(tmp_path, "model: {base_model: m}\ndata: {train_file: t.jsonl, chat_template: on}\n")
                       ).data.chat_template == "on"


@pytest.mark.parametrize("extra, message", [
    ("model: {base_model: m, lora_layers: 0}", "model.lora_layers: 0 blocks would train nothing"),
    ("model: {base_model: m, lora_keys: []}", "model.lora_keys: an empty list adapts nothing"),
])
def test_lora_settings_that_would_adapt_nothing_are_refused(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, extra + "\ndata: {train_file: t.jsonl}\n"))


def test_model_paths_are_checked_before_any_model_loads(tmp_path):
    (tmp_path / "t.jsonl").write_text("")
    (tmp_path / "empty-folder").mkdir()
    for value, message in [("t.jsonl", "is a file; give an mlx-lm model folder"),
                           ("empty-folder", "not an mlx-lm model folder (no config.json in it)"),
                           (str(tmp_path / "no" / "such" / "model"), "folder not found")]:
        cfg = load_config(write(tmp_path, BASE), (f"model.base_model={value}",), base_dir=tmp_path)
        with pytest.raises(ConfigError, match=r"model\.base_model: .*" + message.replace("(", r"\(").replace(")", r"\)")):
            check_files(cfg)
    hub_id = load_config(write(tmp_path, BASE), ("model.base_model=org/name",), base_dir=tmp_path)
    check_files(hub_id)  # not a local path: left to the Hugging Face Hub


def test_yaml_errors_name_the_file_and_a_key_given_twice_is_an_error(tmp_path):
    twice = write(tmp_path, "model:\n  base_model: a\n  base_model: b\ndata: {train_file: t.jsonl}\n")
    with pytest.raises(ConfigError) as err:
        load_config(twice)
    assert "key 'base_model' is given twice" in str(err.value) and f'in "{twice}", line 3' in str(err.value)
    with pytest.raises(ConfigError, match="a folder, not a config file"):
        load_config(tmp_path)


def test_split_shares_are_checked_when_the_config_loads(tmp_path):
    with pytest.raises(ConfigError, match=r"--set compute.split=abc|compute.split: 'abc' is not a list of numbers"):
        load_config(write(tmp_path, BASE), ("compute.split=abc",))
    with pytest.raises(ConfigError, match="every share must be a positive number"):
        load_config(write(tmp_path, BASE), ("compute.split=1,0",))
    assert load_config(write(tmp_path, BASE), ("compute.split=auto",)).compute.split == "auto"


def test_a_data_folder_is_not_reported_as_missing(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ("data.train_file=.",), base_dir=tmp_path)
    with pytest.raises(ConfigError, match="data.train_file: a folder, not a file"):
        check_files(cfg)
