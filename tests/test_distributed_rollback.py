"""constraints.kl_action: rollback on two real ranks over MLX's ring, rank 1 with an empty
output folder of its own as on a second machine: only rank 0 has checkpoints and best.json,
yet both ranks roll back together and hold the same weights and optimizer state afterwards.

Each rank runs `run_training` in its own process through a small driver that, however the run
ends, writes the rank's trainable weights and optimizer state: the only way to see rank 1's
state, since rank 1 writes nothing by design."""
import json
import os
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from test_distributed_runs import PY, RUN_SECONDS, SECRET, free_base, metric_rows, quiet, write_yaml

from mlx_dpo import checkpoint
from mlx_dpo.errors import TrainingStopped
from mlx_dpo.run import run_training

# KL is pushed over the target at every evaluation after the start (tests/test_gates_training.py).
HIGH_LR = {"training.learning_rate": 3e-2, "training.max_steps": 6, "training.eval_steps": 2,
           "training.save_steps": 2, "constraints.kl_action": "rollback", "constraints.max_rollbacks": 2}

DRIVER = """
import sys
import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_dpo.config import load_config
from mlx_dpo.engines import make_engine, select_device
from mlx_dpo.errors import UserError
from mlx_dpo.run import run_training

config, dump, output_dir = sys.argv[1:]
cfg = load_config(config, ["compute.num_devices=2", f"logging.output_dir={output_dir}"])
engine = make_engine(cfg, select_device(cfg))
code = 0
try:
    run_training(cfg, echo=lambda line: print(line, flush=True), progress=False, engine=engine)
except UserError as err:
    print(f"error: {err}", flush=True)
    code = err.exit_code
state = {"p/" + k: v for k, v in tree_flatten(engine.models.policy.trainable_parameters())}
state.update({"o/" + k: v for k, v in tree_flatten(engine.optimizer.state)})
mx.save_safetensors(dump, state)
sys.exit(code)
"""


def start_ranks(tmp_path: Path, config: Path, output_dirs: list[Path]) -> list[subprocess.Popen]:
    port = free_base()
    ring = tmp_path / "ring.json"
    ring.write_text(json.dumps([[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]]))
    procs = []
    for rank, out in enumerate(output_dirs):
        env = {**os.environ, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(ring), "MLX_DPO_SECRET": SECRET,
               "MLX_DPO_CACHE_DIR": str(tmp_path / "cache")}
        argv = [PY, "-c", DRIVER, str(config), str(tmp_path / f"state{rank}.safetensors"), str(out)]
        with open(tmp_path / f"rank{rank}.log", "w") as log:
            procs.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, cwd=tmp_path))
    return procs


@pytest.fixture
def started():
    procs: list[subprocess.Popen] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_two_ranks_roll_back_together_from_rank0_disk(make_config, tmp_path, started):
    out, rank1_out = tmp_path / "two", tmp_path / "rank1"
    config = write_yaml(tmp_path / "rollback.yaml",
                        make_config(**HIGH_LR, **{"training.batch_size": 4, "logging.output_dir": str(out)}))
    started.extend(start_ranks(tmp_path, config, [out, rank1_out]))
    codes = [p.wait(timeout=RUN_SECONDS) for p in started]
    logs = [(tmp_path / f"rank{r}.log").read_text() for r in range(2)]
    assert codes == [1, 1], logs[0][-3000:] + "\n---\n" + logs[1][-3000:]

    # Both ranks stopped at the same evaluation, after the same two rollbacks.
    errors = [next(x for x in log.splitlines() if x.startswith("error:")) for log in logs]
    assert all("error: step 6:" in e and "after 2 rollback(s) (constraints.max_rollbacks): stopped" in e
               for e in errors), errors
    assert errors[0].split(". ")[0] == errors[1].split(". ")[0], errors  # same KL on both ranks
    assert "Best checkpoint within the target:" in errors[0] and "Rank 0 keeps the checkpoints." in errors[1]
    assert [x.split(":")[0] for x in logs[0].splitlines() if x.startswith("rollback")] == \
        ["rollback 1/2", "rollback 2/2"]
    assert "restored checkpoint-0" in logs[0]

    # Rank 1 never had a record or a checkpoint of its own to restore from.
    assert not (rank1_out / "best.json").exists() and not checkpoint.list_checkpoints(rank1_out)
    assert json.loads((out / "best.json").read_text())["checkpoint"] == "checkpoint-0"

    # The same weights and optimizer state on both ranks after the last rollback's training.
    rank0, rank1 = (mx.load(str(tmp_path / f"state{r}.safetensors")) for r in range(2))
    assert rank0.keys() == rank1.keys() and any(k.startswith("o/") for k in rank0)
    assert all(np.array_equal(np.array(rank0[k]), np.array(rank1[k])) for k in rank0)

    # And both ranks together are the one-process run (same global batch), rollbacks included:
    # every logged loss and evaluation after a rollback sums rank 1's share too.
    one = make_config(**HIGH_LR, **{"training.batch_size": 8, "logging.output_dir": str(tmp_path / "one")})
    with pytest.raises(TrainingStopped, match=r"after 2 rollback\(s\)"):
        run_training(one, echo=quiet, progress=False)
    two_rows, one_rows = metric_rows(out), metric_rows(tmp_path / "one")
    assert [r["step"] for r in two_rows] == [r["step"] for r in one_rows]
    for two, single in zip(two_rows, one_rows):
        for key in ("loss", "eval/loss", "eval/kl"):
            if key in single:
                assert two[key] == pytest.approx(single[key], rel=1e-4, abs=1e-6), (two["step"], key)
