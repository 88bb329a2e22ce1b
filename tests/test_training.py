"""End-to-end behaviour of the loop on the tiny fixture model: invariants a user relies on."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_dpo import checkpoint
from mlx_dpo.data.batching import collate
from mlx_dpo.data.pipeline import prepare_data
from mlx_dpo.engines.mlx_engine import MLXEngine
from mlx_dpo.errors import TrainingStopped, UserError
from mlx_dpo.models import reference_forward
from mlx_dpo.run import run_training


def quiet(_line):
    pass


def weights(model):
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def assert_same(a, b, atol):
    assert a.keys() == b.keys()
    worst = max(np.abs(a[k] - b[k]).max() for k in a)
    assert worst <= atol, worst


def read_metrics(cfg):
    path = os.path.join(cfg.logging.output_dir, "metrics.jsonl")
    return [json.loads(line) for line in open(path)]


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_accumulating_8x1_equals_one_batch_of_8(make_config, finetune):
    cfg = make_config(**{"model.finetune": finetune})
    engines = [MLXEngine(cfg) for _ in range(2)]
    pairs = prepare_data(cfg, engines[0].tokenizer).train.pairs[:8]
    pad = engines[0].tokenizer.eos_token_id
    engines[0].forward_backward(collate(pairs, pad), global_pairs=8)
    for p in pairs:
        engines[1].forward_backward(collate([p], pad), global_pairs=8)
    norms = [e.apply_update(1e-3)[0] for e in engines]
    assert abs(norms[0] - norms[1]) < 1e-4 * max(1.0, norms[0])
    assert_same(weights(engines[0].models.policy), weights(engines[1].models.policy), atol=1e-5)


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_reference_never_changes(make_config, finetune):
    cfg = make_config(**{"model.finetune": finetune, "training.max_steps": 5, "training.learning_rate": 1e-2})
    engine = MLXEngine(cfg)
    batch = collate(prepare_data(cfg, engine.tokenizer).val.pairs[:4], engine.tokenizer.eos_token_id)
    inputs = mx.array(batch.inputs)
    before = np.array(reference_forward(engine.models, inputs))
    policy_before = weights(engine.models.policy)
    run_training(cfg, echo=quiet, progress=False, engine=engine)
    after = np.array(reference_forward(engine.models, inputs))
    assert np.array_equal(before, after)
    changed = weights(engine.models.policy)
    assert any(not np.array_equal(policy_before[k], changed[k]) for k in changed)
    if finetune == "lora":  # reference = adapters off: no second copy of the weights
        assert engine.models.reference is None
        base = {k: v for k, v in changed.items() if "lora_" not in k}
        assert_same({k: policy_before[k] for k in base}, base, atol=0)


def test_initial_kl_is_zero_and_every_metric_is_logged(make_config):
    cfg = make_config(**{"training.max_steps": 2})
    run_training(cfg, echo=quiet, progress=False)
    rows = read_metrics(cfg)
    first_eval = rows[0]
    assert first_eval["step"] == 0 and abs(first_eval["eval/kl"]) < 1e-6
    assert abs(first_eval["eval/loss"] - math.log(2)) < 1e-6
    train_keys = {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                  "logps/chosen", "logps/rejected", "learning_rate", "grad_norm", "tokens_per_sec",
                  "pairs_per_sec", "peak_memory_gb"}
    assert train_keys <= set(rows[1])
    assert {"eval/" + k for k in ("loss", "rewards/accuracies", "kl")} <= set(rows[-1])
    saved = json.loads(open(os.path.join(cfg.logging.output_dir, "checkpoint-2", "training_metrics.json")).read())
    assert saved["kl_divergence"] == rows[-1]["eval/kl"] and saved["step"] == 2


def test_resumed_run_reaches_the_same_weights(make_config, tmp_path):
    common = {"training.max_steps": 6, "training.save_steps": 3, "training.warmup_steps": 2,
              "optimization.lr_scheduler": "cosine", "model.lora_dropout": 0.2}
    full = make_config(**common)
    run_training(full, echo=quiet, progress=False)
    interrupted_dir = tmp_path / "resumed"
    interrupted_dir.mkdir()
    shutil.copytree(os.path.join(full.logging.output_dir, "checkpoint-3"), interrupted_dir / "checkpoint-3")
    resumed = make_config(**common, **{"logging.output_dir": str(interrupted_dir)})
    summary = run_training(resumed, resume=True, echo=quiet, progress=False)
    assert summary["steps"] == 6
    a = mx.load(os.path.join(full.logging.output_dir, "checkpoint-6", "adapters.safetensors"))
    b = mx.load(str(interrupted_dir / "checkpoint-6" / "adapters.safetensors"))
    assert_same({k: np.array(v) for k, v in a.items()}, {k: np.array(v) for k, v in b.items()}, atol=1e-6)


def test_existing_run_needs_resume_or_overwrite(make_config):
    cfg = make_config(**{"training.max_steps": 1})
    run_training(cfg, echo=quiet, progress=False)
    with pytest.raises(UserError, match="--resume .* --overwrite"):
        run_training(cfg, echo=quiet, progress=False)
    assert run_training(cfg, overwrite=True, echo=quiet, progress=False)["steps"] == 1


def test_non_finite_steps_are_skipped_then_stop_with_last_checkpoint_intact(make_config, monkeypatch):
    cfg = make_config(**{"training.max_steps": 10, "training.save_steps": 2, "training.max_bad_steps": 3})
    engine = MLXEngine(cfg)
    real = engine.forward_backward
    calls = {"n": 0}

    def poisoned(batch, global_pairs):
        calls["n"] += 1
        stats = real(batch, global_pairs)
        if calls["n"] >= 3:  # from the third step on, every loss is NaN
            stats["loss"] = float("nan")
        return stats

    monkeypatch.setattr(engine, "forward_backward", poisoned)
    lines = []
    with pytest.raises(TrainingStopped, match="3 non-finite steps in a row"):
        run_training(cfg, echo=lines.append, progress=False, engine=engine)
    assert sum("update skipped" in line for line in lines) == 3
    names = [p.name for p in checkpoint.list_checkpoints(checkpoint.Path(cfg.logging.output_dir))]
    assert names == ["checkpoint-2", "checkpoint-4"]  # steps 3 and 4 were skipped, never 5
    saved = mx.load(os.path.join(cfg.logging.output_dir, "checkpoint-4", "adapters.safetensors"))
    live = dict(tree_flatten(engine.models.policy.trainable_parameters()))
    assert_same({k: np.array(v) for k, v in saved.items()}, {k: np.array(live[k]) for k in saved}, atol=0)


def test_ctrl_c_saves_a_checkpoint_then_resume_finishes(make_config):
    cfg = make_config(**{"training.max_steps": 6})

    def interrupt_at_step_2(line):
        if line.startswith("step      2 |"):
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingStopped, match="interrupted: saved .*checkpoint-2"):
        run_training(cfg, echo=interrupt_at_step_2, progress=False)
    state = checkpoint.read_state(checkpoint.Path(cfg.logging.output_dir) / "checkpoint-2")
    assert state["step"] == 2 and state["config"]["training"]["max_steps"] == 6
    assert run_training(cfg, resume=True, echo=quiet, progress=False)["steps"] == 6
    steps = [r["step"] for r in read_metrics(cfg) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # no duplicate rows after the resume


def test_crash_mid_save_leaves_previous_checkpoint_intact(tmp_path):
    def good(folder):
        (folder / "adapters.safetensors").write_bytes(b"v1")

    def crashing(folder):
        (folder / "adapters.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    checkpoint.save_checkpoint(tmp_path, 1, good, {"step": 1}, {}, keep=3)
    with pytest.raises(OSError):
        checkpoint.save_checkpoint(tmp_path, 2, crashing, {"step": 2}, {}, keep=3)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["checkpoint-1"]
    assert (tmp_path / "checkpoint-1" / "adapters.safetensors").read_bytes() == b"v1"
    checkpoint.save_checkpoint(tmp_path, 3, good, {"step": 3}, {}, keep=3)
    assert not list(tmp_path.glob(".tmp-*"))  # the crash's leftovers are swept


def test_rotation_keeps_the_newest_k_and_protected(tmp_path):
    for step in range(1, 6):
        checkpoint.save_checkpoint(tmp_path, step, lambda f: None, {"step": step}, {}, keep=2,
                                   protect=("checkpoint-1",))
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["checkpoint-1", "checkpoint-4",
                                                                       "checkpoint-5"]


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_final_model_loads_with_mlx_lm(make_config, tiny_model, finetune):
    from mlx_lm import load

    cfg = make_config(**{"model.finetune": finetune, "training.max_steps": 3, "training.learning_rate": 1e-2})
    engine = MLXEngine(cfg)
    run_training(cfg, echo=quiet, progress=False, engine=engine)
    final = os.path.join(cfg.logging.output_dir, "final")
    model, _ = load(str(tiny_model), adapter_path=final) if finetune == "lora" else load(final)
    tokens = mx.array([[5, 6, 7, 8]])
    engine.models.policy.eval()
    assert np.allclose(np.array(model(tokens)), np.array(engine.models.policy(tokens)), atol=1e-5)


def test_lora_final_fuses_into_a_standalone_model_with_mlx_lm_fuse(make_config, tiny_model, tmp_path):
    """The README's way to a model without adapters: mlx-lm's own fuse reads final/ as it is."""
    from mlx_lm import load

    cfg = make_config(**{"training.max_steps": 3, "training.learning_rate": 1e-2})
    engine = MLXEngine(cfg)
    run_training(cfg, echo=quiet, progress=False, engine=engine)
    fused = tmp_path / "fused"
    done = subprocess.run([sys.executable, "-m", "mlx_lm", "fuse", "--model", str(tiny_model), "--adapter-path",
                           os.path.join(cfg.logging.output_dir, "final"), "--save-path", str(fused)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    model, _ = load(str(fused))
    base, _ = load(str(tiny_model))
    tokens = mx.array([[5, 6, 7, 8]])
    engine.models.policy.eval()
    trained = np.array(engine.models.policy(tokens))
    assert np.allclose(np.array(model(tokens)), trained, atol=1e-5)
    assert not np.allclose(np.array(base(tokens)), trained, atol=1e-3)  # the adapters did change it


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_gradient_checkpointing_gives_the_same_update(make_config, finetune):
    plain, ckpt = (MLXEngine(make_config(**{"compute.gradient_checkpointing": flag, "training.share_prompt": True,
                                            "model.finetune": finetune}))
                   for flag in (False, True))
    assert "gradient checkpointing: on (per transformer block)" in ckpt.notes
    assert ckpt.fast.shared  # the shared prompt's mask and cache pass through the checkpoint
    pairs = prepare_data(plain.cfg, plain.tokenizer).train.pairs[:4]
    for engine in (plain, ckpt):
        engine.forward_backward(collate(pairs, 0), 4)
        engine.apply_update(1e-3)
    assert_same(weights(plain.models.policy), weights(ckpt.models.policy), atol=1e-6)


def test_fp16_request_on_cpu_trains_in_fp32_and_says_so(make_config):
    engine = MLXEngine(make_config(**{"compute.fp16": True}))
    assert "precision: float32 (compute.fp16 ignored: no half-precision speed-up on CPU)" in engine.notes
    assert all(v.dtype == mx.float32 for _, v in tree_flatten(engine.models.policy.parameters()))


def test_bad_record_is_reported_before_any_model_loads(make_config, tmp_path):
    from mlx_dpo.data.records import RecordError

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": 1}\n')
    cfg = make_config(**{"data.train_file": str(bad), "model.base_model": "no-such-org/no-such-model"})  # would need the Hub
    with pytest.raises(RecordError, match=r"bad.jsonl:2: missing field\(s\) rejected"):
        run_training(cfg, echo=quiet, progress=False)
