"""Two real ranks on 127.0.0.1 over MLX's ring: equivalence with one process, the split,
resume, and faults. Each rank is a `python -m mlx_dpo train` process; the one-process
references run in this process."""
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml

from mlx_dpo import checkpoint
from mlx_dpo.run import run_training

PY = sys.executable
SECRET = "a shared secret for the test ranks"
RUN_SECONDS = 240  # generous: the machine may be busy with other test runs


def quiet(_line):
    pass


def free_base(count: int = 3) -> int:
    """A base port with `count` free ports after it on 127.0.0.1."""
    for _ in range(100):
        base = random.randint(20000, 60000)
        try:
            for port in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free ports")


def write_yaml(path: Path, cfg) -> Path:
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def final_weights(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update({k: np.array(v) for k, v in mx.load(str(f)).items()})
    assert out, f"no weights in {folder}"
    return out


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def metric_rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def wait_until(predicate, timeout: float, what: str, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll)


class TwoRanks:
    """Ranks 0 and 1 started directly (MLX_RANK + MLX_HOSTFILE), logs in files."""

    def __init__(self, tmp_path: Path, config: Path, args=(), rank_args=None, name="run"):
        self.port = free_base()
        ring = tmp_path / f"{name}-ring.json"
        ring.write_text(json.dumps([[f"127.0.0.1:{self.port}"], [f"127.0.0.1:{self.port + 1}"]]))
        self.logs = [tmp_path / f"{name}-rank{r}.log" for r in range(2)]
        self.procs = []
        for rank in range(2):
            env = {**os.environ, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(ring), "MLX_DPO_SECRET": SECRET,
                   "MLX_DPO_CACHE_DIR": str(tmp_path / "cache")}
            argv = [PY, "-m", "mlx_dpo", "train", str(config), "--no-progress", "--set", "compute.num_devices=2",
                    *args, *(rank_args or {}).get(rank, ())]
            with open(self.logs[rank], "w") as log:
                self.procs.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                   stdin=subprocess.DEVNULL, cwd=tmp_path))

    def log(self, rank: int) -> str:
        return self.logs[rank].read_text()

    def wait(self, timeout: float = RUN_SECONDS) -> list[int]:
        try:
            return [p.wait(timeout=timeout) for p in self.procs]
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"ranks did not finish:\n{self.log(0)[-3000:]}\n---\n{self.log(1)[-3000:]}")

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
                p.wait()


@pytest.fixture
def ranks_cleanup():
    started = []
    yield started.append
    for r in started:
        r.kill()


def two_rank_config(make_config, out: Path, **overrides):
    """Per-rank batch 4 over two ranks: the same global batch as one process with batch 8."""
    return make_config(**{"training.batch_size": 4, "logging.output_dir": str(out), **overrides})


def one_process_run(make_config, out: Path, **overrides) -> dict:
    cfg = make_config(**{"training.batch_size": 8, "logging.output_dir": str(out), **overrides})
    run_training(cfg, echo=quiet, progress=False)
    return final_weights(out / "final")


# -- equivalence ------------------------------------------------------------------------------
def test_launch_lora_65_35_equals_one_process(make_config, tmp_path, monkeypatch):
    """`mlx-dpo launch` with rank 1 behind (a stand-in for) ssh: same weights, global metrics."""
    monkeypatch.setenv("MLX_DPO_CACHE_DIR", str(tmp_path / "cache"))
    fake_ssh = tmp_path / "bin" / "ssh"
    fake_ssh.parent.mkdir()
    fake_ssh.write_text('#!/bin/bash\n# ssh stand-in: skip options and host, run the command here\n'
                        'while [[ "$1" == -* ]]; do [[ "$1" == -o ]] && shift; shift; done\n'
                        'shift; exec bash -c "$1"\n')
    fake_ssh.chmod(0o755)
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps([{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]},
                                 {"ssh": "peer.example", "ips": ["127.0.0.1"]}]))
    config = write_yaml(tmp_path / "two.yaml", two_rank_config(make_config, tmp_path / "two",
                                                               **{"training.max_steps": 5}))
    env = {**os.environ, "PATH": f"{fake_ssh.parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLX_DPO_SECRET", None)  # the launcher makes one and hands it to both ranks
    done = subprocess.run([PY, "-m", "mlx_dpo", "launch", "--hostfile", str(hosts), "--split", "0.65,0.35",
                           "--port", str(free_base()), "--no-progress", str(config)],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=RUN_SECONDS)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "compute.split: 0.65,0.35 of every global batch (8 pairs" in done.stdout + done.stderr

    single = one_process_run(make_config, tmp_path / "one", **{"training.max_steps": 5})
    assert max_difference(final_weights(tmp_path / "two" / "final"), single) <= 1e-5
    two_rows, one_rows = metric_rows(tmp_path / "two"), metric_rows(tmp_path / "one")
    assert [r["step"] for r in two_rows] == [r["step"] for r in one_rows]  # rank 0 alone logs
    for two, one in zip(two_rows, one_rows):  # reduced over ranks: the global batch's averages
        # (not accuracies: at step 1 policy == reference and rounding noise decides them)
        for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected", "eval/loss", "eval/kl"):
            if key in one:
                assert two[key] == pytest.approx(one[key], abs=1e-5), (key, two["step"])


def test_split_auto_full_finetune_slowed_rank_equals_one_process(make_config, tmp_path, ranks_cleanup):
    """Rank 1 runs ~1/5 of the time while the split is measured: it gets the smaller share,
    and the weights still equal one process's (the split never changes an update)."""
    # lr 1e-4: Adam turns a rounding-level gradient difference on a coordinate whose gradient is
    # near adam_epsilon into a step difference of order lr (at 1e-3 one weight of the tiny random
    # model lands 1e-5 apart); full fine-tuning uses 1e-6..1e-5 in practice.
    settings = {"model.finetune": "full", "training.max_steps": 3, "training.learning_rate": 1e-4,
                "compute.split_probe_steps": 6}
    config = write_yaml(tmp_path / "auto.yaml", two_rank_config(make_config, tmp_path / "two", **settings))
    ranks = TwoRanks(tmp_path, config, args=("--set", "compute.split=auto"))
    ranks_cleanup(ranks)
    wait_until(lambda: "batch size:" in ranks.log(0), RUN_SECONDS, "rank 0 to load the model")
    slow = ranks.procs[1]
    while "compute.split auto:" not in ranks.log(0) and slow.poll() is None:
        slow.send_signal(signal.SIGSTOP)  # 80% stopped: an artificially slow machine
        time.sleep(0.04)
        slow.send_signal(signal.SIGCONT)
        time.sleep(0.01)
    slow.send_signal(signal.SIGCONT)
    assert ranks.wait() == [0, 0], ranks.log(0)[-3000:] + ranks.log(1)[-3000:]
    line = next(x for x in ranks.log(0).splitlines() if "compute.split auto:" in x)
    shares = [float(x) for x in line.rsplit("split ", 1)[1].split(",")]
    assert shares[0] >= 0.6 > shares[1], line

    single = one_process_run(make_config, tmp_path / "one", **settings)
    assert max_difference(final_weights(tmp_path / "two" / "final"), single) <= 1e-5


# -- faults -----------------------------------------------------------------------------------
def checkpoints_are_complete(out: Path) -> list[Path]:
    found = checkpoint.list_checkpoints(out)
    assert found
    for folder in found:  # every one loads: weights, optimizer state, run state
        assert mx.load(str(folder / "adapters.safetensors")) and mx.load(str(folder / "optimizer.safetensors"))
        assert checkpoint.read_state(folder)["step"] == int(folder.name.split("-")[1])
    return found


LONG_RUN = {"training.max_steps": 500, "training.save_steps": 3, "training.eval_steps": 1000}


def test_dead_peer_stops_the_other_then_two_ranks_resume(make_config, tmp_path, ranks_cleanup):
    out = tmp_path / "two"
    config = write_yaml(tmp_path / "long.yaml", two_rank_config(make_config, out, **LONG_RUN))
    ranks = TwoRanks(tmp_path, config)
    ranks_cleanup(ranks)
    wait_until(lambda: (out / "checkpoint-6").exists(), RUN_SECONDS, "checkpoint-6")
    ranks.procs[0].kill()  # rank 0 dies at an arbitrary point, perhaps inside a checkpoint save
    killed = time.monotonic()
    code = ranks.procs[1].wait(timeout=30)
    assert time.monotonic() - killed <= 10
    assert code == 1
    assert "error: lost rank 0 (127.0.0.1) ended" in ranks.log(1)
    latest = checkpoints_are_complete(out)[-1]
    step = checkpoint.read_state(latest)["step"]

    # Rank 1 resumes with an empty folder of its own, as on a second machine: rank 0's state
    # reaches it over the ring.
    target = {"training.max_steps": step + 3}
    resumed = TwoRanks(tmp_path, config, name="resume",
                       args=("--resume", "--set", f"training.max_steps={step + 3}"),
                       rank_args={1: ("--set", f"logging.output_dir={tmp_path / 'rank1'}")})
    ranks_cleanup(resumed)
    assert resumed.wait() == [0, 0], resumed.log(0)[-3000:] + resumed.log(1)[-3000:]
    assert f"resumed from {latest} (step {step})" in resumed.log(0)
    assert not checkpoint.list_checkpoints(tmp_path / "rank1")  # only rank 0 writes
    single = one_process_run(make_config, tmp_path / "one", **{**LONG_RUN, **target})
    assert max_difference(final_weights(out / "final"), single) <= 1e-5


def test_frozen_peer_is_stopped_by_the_watchdog(make_config, tmp_path, ranks_cleanup):
    out = tmp_path / "two"
    config = write_yaml(tmp_path / "long.yaml", two_rank_config(
        make_config, out, **{**LONG_RUN, "compute.peer_timeout": 2.0}))
    ranks = TwoRanks(tmp_path, config)
    ranks_cleanup(ranks)
    wait_until(lambda: (out / "checkpoint-3").exists(), RUN_SECONDS, "checkpoint-3")
    ranks.procs[1].send_signal(signal.SIGSTOP)
    frozen = time.monotonic()
    code = ranks.procs[0].wait(timeout=60)
    assert time.monotonic() - frozen <= 2.0 + 8
    assert code == 1
    message = next(x for x in ranks.log(0).splitlines() if x.startswith("error:"))
    steps = [r["step"] for r in metric_rows(out) if "loss" in r]
    assert message.startswith(f"error: peer stalled at step {steps[-1] + 1}: rank 1 (127.0.0.1) sent nothing "
                              "for 2 s (compute.peer_timeout)"), message
    ranks.kill()

    latest = checkpoints_are_complete(out)[-1]
    step = checkpoint.read_state(latest)["step"]
    cfg = make_config(**{**LONG_RUN, "training.batch_size": 8, "logging.output_dir": str(out),
                         "training.max_steps": step + 1})  # the same global batch, on one machine
    summary = run_training(cfg, resume=True, echo=quiet, progress=False)
    assert summary["steps"] == step + 1

