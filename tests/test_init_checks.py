"""Stage-3 initialisation checks: each check's pass and fail, in a run and as `mlx-dpo init-check`."""
import mlx.core as mx
import pytest
import yaml
from click.testing import CliRunner

from conftest import build_model
from mlx_dpo.cli import main
from mlx_dpo.data.pipeline import prepare_data
from mlx_dpo.engines.mlx_engine import MLXEngine
from mlx_dpo.init_checks import InitCheckFailed, run_init_checks
from mlx_dpo.models import lora_modules
from mlx_dpo.run import run_training


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    """Models that differ from the tiny fixture in one respect each."""
    root = tmp_path_factory.mktemp("variants")
    return {"other_weights": build_model(root / "other", seed=1),
            "no_template": build_model(root / "no_template", chat_template=None),
            "bigger_vocab": build_model(root / "vocab", extra_words=["zebra"]),
            "deeper": build_model(root / "deeper", layers=3)}


def checks_of(cfg, engine=None, step=0):
    engine = engine or MLXEngine(cfg)
    pairs = prepare_data(cfg, engine.tokenizer).val.pairs
    return {c.name: c for c in run_init_checks(cfg, engine, pairs, 4, step)}


def test_lora_shared_reference_passes(make_config):
    checks = checks_of(make_config())
    assert all(c.passed and not c.skipped for c in checks.values()), checks
    assert checks["initial_kl"].value < 1e-6
    assert checks["policy_equals_reference"].value == 0.0


def test_full_finetune_separate_reference_passes(make_config):
    checks = checks_of(make_config(**{"model.finetune": "full"}))
    assert all(c.passed for c in checks.values()), checks
    assert "same vocabulary" in checks["tokenizers_agree"].detail  # compared, not assumed


def test_policy_from_other_weights_fails(make_config, tiny_model, variants):
    cfg = make_config(**{"model.reference_model": str(tiny_model),
                         "model.policy_model": str(variants["other_weights"])})
    checks = checks_of(cfg)
    assert not checks["policy_equals_reference"].passed and checks["policy_equals_reference"].value > 0
    assert not checks["initial_kl"].passed and checks["initial_kl"].value > 1e-3
    assert checks["architectures_match"].passed and checks["tokenizers_agree"].passed


def test_nonzero_adapters_fail_policy_equals_reference(make_config):
    cfg = make_config()
    engine = MLXEngine(cfg)
    layer = lora_modules(engine.models.policy)[0]
    layer.lora_b = mx.ones_like(layer.lora_b) * 0.01
    checks = checks_of(cfg, engine)
    assert not checks["policy_equals_reference"].passed
    assert not checks["initial_kl"].passed


@pytest.mark.parametrize("variant, message", [("no_template", "chat templates differ"),
                                              ("bigger_vocab", "only in the reference's: ['zebra']")])
def test_tokenizer_mismatch_is_an_error(make_config, tiny_model, variants, variant, message):
    cfg = make_config(**{"model.policy_model": str(tiny_model), "model.reference_model": str(variants[variant])})
    checks = checks_of(cfg)
    assert not checks["tokenizers_agree"].passed and message in checks["tokenizers_agree"].detail
    if variant == "bigger_vocab":  # a different vocabulary: no KL can be measured
        assert not checks["architectures_match"].passed
        assert not checks["initial_kl"].passed and "not measurable" in checks["initial_kl"].detail


def test_architecture_mismatch(make_config, tiny_model, variants):
    cfg = make_config(**{"model.policy_model": str(tiny_model), "model.reference_model": str(variants["deeper"])})
    checks = checks_of(cfg)
    assert not checks["architectures_match"].passed
    assert "only one model" in checks["architectures_match"].detail


def test_trainable_base_weight_means_reference_not_frozen(make_config):
    cfg = make_config()
    engine = MLXEngine(cfg)
    engine.models.policy.model.embed_tokens.unfreeze()  # the adapters-off reference shares it
    checks = checks_of(cfg, engine)
    assert not checks["reference_frozen"].passed and "embed_tokens" in checks["reference_frozen"].detail


def test_trainable_separate_reference_not_frozen(make_config):
    cfg = make_config(**{"model.finetune": "full"})
    engine = MLXEngine(cfg)
    engine.models.reference.unfreeze()
    assert not checks_of(cfg, engine)["reference_frozen"].passed


def test_resumed_run_skips_the_starting_point_checks(make_config):
    checks = checks_of(make_config(), step=5)
    assert checks["policy_equals_reference"].skipped and checks["initial_kl"].skipped
    assert "resumed at step 5" in checks["initial_kl"].detail
    assert not checks["reference_frozen"].skipped


def test_training_refuses_a_mismatched_reference(make_config, tiny_model, variants):
    cfg = make_config(**{"model.policy_model": str(tiny_model), "model.reference_model": str(variants["no_template"])})
    lines = []
    with pytest.raises(InitCheckFailed, match="tokenizers_agree") as err:
        run_training(cfg, echo=lines.append, progress=False)
    assert err.value.exit_code == 1
    assert any("tokenizers_agree" in line and "FAIL" in line for line in lines)
    assert not any(line.startswith("step ") for line in lines)  # no training step ran


def test_init_checks_off_lets_training_run(make_config, tiny_model, variants):
    cfg = make_config(**{"model.policy_model": str(tiny_model), "model.reference_model": str(variants["no_template"]),
                         "constraints.init_checks": False, "training.max_steps": 1})
    lines = []
    run_training(cfg, echo=lines.append, progress=False)
    assert "initialisation checks: off (constraints.init_checks: false)" in lines


def write_config(path, cfg, **constraints):
    raw = cfg.to_dict()
    raw["constraints"].update(constraints)
    path.write_text(yaml.safe_dump(raw))
    return path


def test_init_check_command_exit_codes(make_config, tiny_model, variants, tmp_path):
    good = write_config(tmp_path / "good.yaml", make_config())
    result = CliRunner().invoke(main, ["init-check", str(good)])
    assert result.exit_code == 0, result.output
    for name in ("reference_frozen", "policy_equals_reference", "architectures_match", "tokenizers_agree",
                 "initial_kl"):
        assert any(line.startswith(name) and "PASS" in line for line in result.output.splitlines()), name
    result = CliRunner().invoke(main, ["init-check", str(good), "--set", f"model.policy_model={tiny_model}",
                                       "--set", f"model.reference_model={variants['other_weights']}"])
    assert result.exit_code == 1 and "Result: FAILED (policy_equals_reference, initial_kl)" in result.output
    result = CliRunner().invoke(main, ["init-check", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and "config file not found" in result.output
