"""The PyTorch engine (the CUDA fallback) against the MLX engine, on the CPU build of PyTorch.

Same tiny model weights, same LoRA start, same batches: log-probs, losses, rewards, KL and the
weights after three AdamW steps must agree; checkpoints must move between engines.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from mlx_dpo.config import load_config  # noqa: E402
from mlx_dpo.data.batching import collate  # noqa: E402
from mlx_dpo.data.pipeline import prepare_data  # noqa: E402
from mlx_dpo.engines import engine_kind, select_device  # noqa: E402
from mlx_dpo.engines import torch_engine as te_mod  # noqa: E402
from mlx_dpo.engines.mlx_engine import MLXEngine  # noqa: E402
from mlx_dpo.engines.torch_engine import TorchEngine  # noqa: E402
from mlx_dpo.errors import UserError  # noqa: E402
from mlx_dpo.hardware import DeviceInfo  # noqa: E402
from mlx_dpo.logprobs import sequence_logps  # noqa: E402
from mlx_dpo.models import reference_forward  # noqa: E402
from mlx_dpo.run import run_training  # noqa: E402
from mlx_dpo.schedule import learning_rate_at  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def parity_config(make_config, finetune, **extra):
    """Weight decay, clipping and a warm-up + cosine schedule all active: every part of the
    update is compared."""
    return make_config(**{"model.finetune": finetune, "training.learning_rate": 2e-3,
                          "training.max_steps": 3, "training.warmup_steps": 1,
                          "optimization.lr_scheduler": "cosine", "optimization.weight_decay": 0.01,
                          "optimization.max_grad_norm": 0.5, **extra})


def mlx_weights(engine):
    return {k: np.array(v) for k, v in tree_flatten(engine.models.policy.trainable_parameters())}


def twin_engines(cfg):
    """An MLX and a PyTorch engine with identical trainable weights (the MLX LoRA draw)."""
    m, t = MLXEngine(cfg), TorchEngine(cfg, "cpu")
    start = mlx_weights(m)
    assert set(start) == {n for n, _ in t.params}  # same tensor names, mlx-lm's
    with torch.no_grad():
        for name, p in t.params:
            assert tuple(p.shape) == start[name].shape
            p.copy_(torch.from_numpy(start[name]))
    return m, t


def batches(cfg, engine, n, size=4):
    pairs = prepare_data(cfg, engine.tokenizer).train.pairs
    return [collate(pairs[i * size:(i + 1) * size], engine.tokenizer.eos_token_id) for i in range(n)]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def per_sequence_logps(m, t, batch):
    """(policy, reference) per-sequence log-probs from each engine, shape (2B,)."""
    x, y, mask = mx.array(batch.inputs), mx.array(batch.targets), mx.array(batch.mask)
    ml = [np.array(sequence_logps(m.models.policy(x), y, mask)),
          np.array(sequence_logps(reference_forward(m.models, x), y, mask))]
    tx, ty, tmask = t._tensors(batch)
    with torch.no_grad():
        tl = [te_mod.sequence_logps(t.models.policy(input_ids=tx).logits, ty, tmask).numpy(),
              te_mod.sequence_logps(t._reference_logits(tx), ty, tmask).numpy()]
    return ml, tl


def close(a: float, b: float, rel: float) -> bool:
    return abs(a - b) <= rel * max(1.0, abs(a))


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_engines_agree_on_logps_losses_and_three_steps(make_config, finetune):
    cfg = parity_config(make_config, finetune)
    m, t = twin_engines(cfg)
    data = batches(cfg, m, 4)
    for batch in data:  # identical weights: every sequence's policy and reference log-prob
        for a, b in zip(*per_sequence_logps(m, t, batch)):
            assert a.shape == (8,) and np.abs(a - b).max() < 1e-4, (a, b)
    start = mlx_weights(m)
    for step, batch in enumerate(data[:3]):
        sm, st = m.forward_backward(batch, 4), t.forward_backward(batch, 4)
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                    "logps/chosen", "logps/rejected"):
            assert close(sm[key], st[key], 1e-4), (step, key, sm[key], st[key])
        lr = learning_rate_at(step, cfg)
        (nm, ok_m), (nt, ok_t) = m.apply_update(lr), t.apply_update(lr)
        assert ok_m and ok_t and close(nm, nt, 1e-4) and nm > cfg.optimization.max_grad_norm  # clipped
    assert max_diff(mlx_weights(m), start) > 1e-3  # the three steps moved the weights
    assert max_diff(mlx_weights(m), t.trainable_arrays()) < 1e-4
    em, et = m.evaluate(data[3]), t.evaluate(data[3])
    assert em.keys() == et.keys() and em["kl_sum"] > 0
    for key in em:
        assert close(em[key], et[key], 1e-4), (key, em[key], et[key])


def test_checkpoints_move_between_engines(make_config, tmp_path):
    """Torch writes a checkpoint, MLX resumes from it, and the next step agrees with Torch's."""
    cfg = parity_config(make_config, "lora")
    m, t = twin_engines(cfg)
    data = batches(cfg, m, 2)
    t.forward_backward(data[0], 4)
    t.apply_update(1e-2)
    t.save_state(tmp_path)
    saved = load_file(str(tmp_path / "adapters.safetensors"))
    assert any(k.endswith(".lora_a") for k in saved) and any(k.endswith(".lora_b") for k in saved)
    m.load_state(tmp_path)
    assert max_diff(mlx_weights(m), t.trainable_arrays()) == 0.0
    for engine in (m, t):
        engine.forward_backward(data[1], 4)
        engine.apply_update(1e-2)  # a second step: uses the restored Adam moments and step count
    assert max_diff(mlx_weights(m), t.trainable_arrays()) < 1e-4
    assert int(np.array(dict(tree_flatten(m.optimizer.state))["step"])) == 2
    # ... and back: MLX's checkpoint restores into a fresh PyTorch engine
    m.save_state(tmp_path)
    fresh = TorchEngine(cfg, "cpu")
    fresh.load_state(tmp_path)
    assert max_diff(fresh.trainable_arrays(), mlx_weights(m)) == 0.0
    assert int(fresh._optimizer_arrays()["step"]) == 2


def test_torch_adapters_and_full_model_load_in_mlx_lm(make_config, tmp_path, tiny_model):
    from mlx_lm import load

    for finetune in ("lora", "full"):
        cfg = parity_config(make_config, finetune)
        t = TorchEngine(cfg, "cpu")
        batch = batches(cfg, t, 1)[0]
        t.forward_backward(batch, 4)
        t.apply_update(1e-2)
        folder = tmp_path / finetune
        folder.mkdir()
        t.export(folder)
        model, _ = load(str(tiny_model), adapter_path=str(folder)) if finetune == "lora" else load(str(folder))
        tx, _, _ = t._tensors(batch)
        with torch.no_grad():
            t.models.policy.eval()
            expected = t.models.policy(input_ids=tx).logits.numpy()
        assert np.abs(np.array(model(mx.array(batch.inputs))) - expected).max() < 1e-4


def test_missing_device_is_a_clear_error(make_config):
    with pytest.raises(UserError, match=r"compute.device is 'cuda'.*devices found: .*cpu"):
        select_device(make_config(**{"compute.device": "cuda"}))


def test_auto_prefers_cuda_to_cpu_and_picks_the_torch_engine(make_config, monkeypatch):
    import mlx_dpo.engines as engines

    gpu = DeviceInfo("cuda", "NVIDIA Test GPU", 80.0)
    monkeypatch.setattr(engines, "cuda_device", lambda: gpu)
    monkeypatch.setattr(engines, "detect_device", lambda: DeviceInfo("cpu", "cpu (x86_64)", 16.0))
    cfg = make_config()
    assert select_device(cfg) == gpu
    assert engine_kind(cfg, gpu) == "torch"
    with pytest.raises(UserError, match="compute.engine mlx cannot drive a CUDA GPU"):
        engine_kind(make_config(**{"compute.engine": "mlx"}), gpu)
    cpu = select_device(make_config(**{"compute.device": "cpu"}))
    assert cpu.kind == "cpu" and engine_kind(make_config(), cpu) == "mlx"


def test_torchrun_data_parallel_matches_one_process(tiny_model, tiny_data, tmp_path):
    """Two gloo ranks with 2 pairs each train exactly like one process with batches of 4."""
    def config(name, world):
        raw = {"model": {"base_model": str(tiny_model), "lora_rank": 4},
               "data": {"train_file": str(tiny_data["train"]), "validation_file": str(tiny_data["val"]),
                        "max_prompt_length": 32, "max_response_length": 32, "max_eval_pairs": 8},
               "training": {"learning_rate": 1e-2, "batch_size": 4 // world, "max_steps": 3, "eval_steps": 3,
                            "save_steps": 3, "logging_steps": 1, "seed": 0},
               "compute": {"engine": "torch", "device": "cpu", "num_devices": world},
               "logging": {"output_dir": str(tmp_path / name)}}
        path = tmp_path / f"{name}.yaml"
        path.write_text(json.dumps(raw))
        return path

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "mlx_dpo", "train", str(config("ddp", 2)), "--no-progress"]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "rank 1 of 2" in run.stdout + run.stderr
    assert "rank 1 of 2: starting from rank 0's weights, optimizer state and data position (step 0)" in run.stdout
    run_training(load_config(config("single", 1)), echo=lambda line: None, progress=False)
    ddp = load_file(str(tmp_path / "ddp" / "final" / "adapters.safetensors"))
    single = load_file(str(tmp_path / "single" / "final" / "adapters.safetensors"))
    assert max_diff(ddp, single) < 1e-5
    assert max(float(np.abs(v).max()) for k, v in ddp.items() if k.endswith("lora_b")) > 1e-3


def test_two_processes_without_torchrun_are_refused(make_config):
    with pytest.raises(UserError, match="torchrun --standalone --nproc_per_node 2"):
        TorchEngine(make_config(**{"compute.num_devices": 2}), "cpu")


def torch_checks(cfg, engine=None):
    from mlx_dpo.init_checks import run_init_checks

    engine = engine or TorchEngine(cfg, "cpu")
    pairs = prepare_data(cfg, engine.tokenizer).val.pairs
    return {c.name: c for c in run_init_checks(cfg, engine, pairs, 4)}


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_init_checks_read_the_torch_engines_models(make_config, finetune):
    checks = torch_checks(make_config(**{"model.finetune": finetune}))
    assert all(c.passed and not c.skipped for c in checks.values()), checks
    assert checks["policy_equals_reference"].value == 0.0
    if finetune == "full":  # a separate reference: compared tensor by tensor, under mlx-lm's names
        assert checks["architectures_match"].detail.endswith("parameter tensors with equal shapes")
        assert "max |dW| over" in checks["policy_equals_reference"].detail
    else:
        assert "LoRA adapters off; only adapters are trainable" in checks["reference_frozen"].detail


def test_torch_init_checks_catch_moved_adapters_and_a_trainable_reference(make_config):
    cfg = make_config()
    engine = TorchEngine(cfg, "cpu")
    with torch.no_grad():
        engine.params[1][1].fill_(0.01)  # a lora_b: the adapters now change the weights
    assert engine.params[1][0].endswith("lora_b")
    engine.models.policy.get_input_embeddings().weight.requires_grad_(True)  # shared with the reference
    checks = torch_checks(cfg, engine)
    assert not checks["policy_equals_reference"].passed and checks["policy_equals_reference"].value > 0
    assert not checks["reference_frozen"].passed and "embed_tokens" in checks["reference_frozen"].detail

    full = make_config(**{"model.finetune": "full"})
    engine = TorchEngine(full, "cpu")
    engine.models.reference.requires_grad_(True)
    assert not torch_checks(full, engine)["reference_frozen"].passed


def test_torch_init_checks_catch_other_weights_and_shapes(make_config, tiny_model, tmp_path):
    from conftest import build_model

    other = build_model(tmp_path / "other", seed=1)
    deeper = build_model(tmp_path / "deeper", layers=3)
    checks = torch_checks(make_config(**{"model.finetune": "full", "model.policy_model": str(other),
                                         "model.reference_model": str(tiny_model)}))
    assert not checks["policy_equals_reference"].passed and checks["architectures_match"].passed
    checks = torch_checks(make_config(**{"model.finetune": "full", "model.policy_model": str(tiny_model),
                                         "model.reference_model": str(deeper)}))
    assert not checks["architectures_match"].passed and "only one model" in checks["architectures_match"].detail


RANK_SCRIPT = """
import json, sys
import numpy as np
from dataclasses import asdict
from mlx_dpo.config import load_config
from mlx_dpo.engines.torch_engine import TorchEngine
from mlx_dpo.trainer import RunState

config, checkpoint, out = sys.argv[1:4]
engine = TorchEngine(load_config(config), "cpu")
rank = engine.group.rank
state = RunState()
if rank == 0:  # only rank 0 can see the checkpoint (no shared disk)
    engine.load_state(__import__("pathlib").Path(checkpoint))
    state = RunState(step=3, epoch=1, batch_index=5, skipped_steps=1)
engine.sync_from_rank0(state)
np.savez(f"{out}/rank{rank}.npz", **engine.trainable_arrays(),
         **{"opt/" + k: v for k, v in engine._optimizer_arrays().items()})
json.dump({k: v for k, v in asdict(state).items() if k != "last_eval"}, open(f"{out}/rank{rank}.json", "w"))
"""


def test_torchrun_ranks_take_rank0s_checkpoint_without_a_shared_disk(tiny_model, tiny_data, tmp_path):
    """--resume and rollbacks under torchrun: rank 1 has no checkpoint, and after sync_from_rank0
    it holds rank 0's weights, AdamW moments and step, and RunState."""
    import socket

    def config(name, world):
        raw = {"model": {"base_model": str(tiny_model), "lora_rank": 4},
               "data": {"train_file": str(tiny_data["train"]), "max_prompt_length": 32, "max_response_length": 32},
               "training": {"learning_rate": 1e-2, "batch_size": 2, "max_steps": 3, "save_steps": 3,
                            "eval_steps": 3, "seed": 0},
               "compute": {"engine": "torch", "device": "cpu", "num_devices": world},
               "logging": {"output_dir": str(tmp_path / name)}}
        path = tmp_path / f"{name}.yaml"
        path.write_text(json.dumps(raw))
        return path

    run_training(load_config(config("trained", 1)), echo=lambda line: None, progress=False)
    checkpoint = tmp_path / "trained" / "checkpoint-3"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(config("pair", 2)), str(checkpoint), str(tmp_path)],
                              cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(r), "LOCAL_RANK": str(r),
                                             "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    for rank in ranks:
        output = rank.communicate(timeout=300)[0]
        assert rank.returncode == 0, output[-3000:]
    zero, one = (dict(np.load(tmp_path / f"rank{r}.npz")) for r in (0, 1))
    saved = {**load_file(str(checkpoint / "adapters.safetensors")),
             **{"opt/" + k: v for k, v in load_file(str(checkpoint / "optimizer.safetensors")).items()}}
    saved.pop("opt/learning_rate")
    assert set(saved) <= set(one) and int(one["opt/step"]) == 3
    for name, value in saved.items():
        assert np.array_equal(one[name], value) and np.array_equal(zero[name], value), name
    assert json.load(open(tmp_path / "rank1.json")) == {"step": 3, "epoch": 1, "batch_index": 5, "bad_in_a_row": 0,
                                                        "skipped_steps": 1}
