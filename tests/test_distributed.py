"""Multi-machine building blocks, in one process: split, hostfile, secret, control link,
watchdog, group-size checks, launcher commands. The runs with real ranks are in
test_distributed_runs.py."""
import json
import os
import socket
import sys
import threading
import time

import numpy as np
import pytest
from click.testing import CliRunner

from mlx_dpo.cli import main
from mlx_dpo.data.batching import shard
from mlx_dpo.distributed import join_cluster
from mlx_dpo.distributed.agreement import differences, run_description
from mlx_dpo.distributed.hostfile import Host, layout_from_env, read_hostfile, ring_addresses
from mlx_dpo.distributed.launcher import plan
from mlx_dpo.distributed.link import open_link
from mlx_dpo.distributed.secret import load_secret, proof, verify
from mlx_dpo.distributed.split import parse_split, shares_from_rates
from mlx_dpo.distributed.watchdog import Watchdog
from mlx_dpo.errors import UserError

SECRET = b"correct horse battery staple 42"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_ring(tmp_path, ips, port):
    hosts = [Host("127.0.0.1", [ip]) for ip in ips]
    addresses, control = ring_addresses(hosts, port)
    path = tmp_path / f"ring-{port}.json"
    path.write_text(json.dumps(addresses))
    return path


def layout(tmp_path, rank, ips=("127.0.0.1", "127.0.0.1"), port=None):
    path = write_ring(tmp_path, ips, port or free_port())
    return layout_from_env({"MLX_HOSTFILE": str(path), "MLX_RANK": str(rank)})


# -- split -------------------------------------------------------------------------------------
def test_split_is_parsed_normalized_and_checked():
    assert parse_split("0.65,0.35", 2) == pytest.approx([0.65, 0.35])
    assert parse_split("2,1", 2) == pytest.approx([2 / 3, 1 / 3])
    assert parse_split("auto", 2) is None
    with pytest.raises(UserError, match=r"compute.split.*3 ranks"):
        parse_split("0.65,0.35", 3)
    with pytest.raises(UserError, match="positive"):
        parse_split("1,-1", 2)
    with pytest.raises(UserError, match="not a list of numbers"):
        parse_split("fast,slow", 2)


@pytest.mark.parametrize("global_batch", [2, 3, 8, 9, 64])
def test_split_shards_cover_the_batch_once_with_at_least_one_pair_each(global_batch):
    weights = parse_split("0.65,0.35", 2)
    indices = np.arange(100, 100 + global_batch)
    parts = [shard(indices, weights, r) for r in range(2)]
    assert all(len(p) >= 1 for p in parts)
    assert sorted(np.concatenate(parts).tolist()) == indices.tolist()
    if global_batch >= 8:  # the faster rank gets the larger share, in proportion
        assert abs(len(parts[0]) / global_batch - 0.65) <= 1 / global_batch


def test_measured_rates_become_proportional_shares():
    assert shares_from_rates([30.0, 10.0]) == pytest.approx([0.75, 0.25])
    floor = shares_from_rates([1000.0, 0.0])
    assert floor[1] > 0 and sum(floor) == pytest.approx(1.0)


# -- hostfile and ring layout ------------------------------------------------------------------
def test_example_hostfile_is_valid_and_gives_consecutive_ports():
    from pathlib import Path

    hosts, extra = read_hostfile(Path(__file__).parent.parent / "configs" / "hosts.example.json")
    assert len(hosts) == 2 and extra.get("backend") == "ring"
    addresses, control = ring_addresses(hosts, 32323)
    assert addresses == [[f"{hosts[0].ips[0]}:32323"], [f"{hosts[1].ips[0]}:32324"]]
    assert control == 32325


@pytest.mark.parametrize("content, message", [
    ("not json", "not valid JSON"),
    ('{"hosts": [{"ssh": "a", "ips": ["10.0.0.1"]}]}', "at least two machines"),
    ('[{"ssh": "a", "ips": ["10.0.0.1"]}, {"ssh": "b", "ips": ["mac.local"]}]', r"hosts\[1\].ips: 'mac.local'"),
    ('[{"ssh": "a", "ips": ["10.0.0.1"]}, {"ssh": "b"}]', r"hosts\[1\].ips"),
    ('{"backend": "jaccl", "hosts": [{"ssh": "a", "ips": ["10.0.0.1"]}, {"ssh": "b", "ips": ["10.0.0.2"]}]}',
     "backend 'jaccl' is not supported"),
])
def test_bad_hostfiles_name_the_file_and_key(tmp_path, content, message):
    path = tmp_path / "hosts.json"
    path.write_text(content)
    with pytest.raises(UserError, match=message) as err:
        read_hostfile(path)
    assert str(path) in str(err.value)


def test_ring_layout_from_the_environment(tmp_path):
    mine = layout(tmp_path, 1, port=40000)
    assert (mine.rank, mine.world, mine.control) == (1, 2, ("127.0.0.1", 40002))
    assert layout_from_env({}) is None
    with pytest.raises(UserError, match="MLX_RANK='5'"):
        layout_from_env({"MLX_HOSTFILE": str(tmp_path / "ring-40000.json"), "MLX_RANK": "5"})


# -- the shared secret -------------------------------------------------------------------------
def test_secret_from_env_or_private_file(tmp_path):
    assert load_secret({"MLX_DPO_SECRET": "s" * 20}) == b"s" * 20
    path = tmp_path / "secret"
    path.write_text("f" * 40 + "\n")
    path.chmod(0o600)
    assert load_secret({"MLX_DPO_SECRET_FILE": str(path)}) == b"f" * 40
    # both set: the file wins on every rank, as it does in `mlx-dpo launch`
    assert load_secret({"MLX_DPO_SECRET": "s" * 20, "MLX_DPO_SECRET_FILE": str(path)}) == b"f" * 40
    if os.name == "posix":
        path.chmod(0o644)
        with pytest.raises(UserError, match="chmod 600"):
            load_secret({"MLX_DPO_SECRET_FILE": str(path)})
    with pytest.raises(UserError, match="at least 16"):
        load_secret({"MLX_DPO_SECRET": "short"})
    with pytest.raises(UserError, match="MLX_DPO_SECRET"):
        load_secret({})


def test_a_proof_is_bound_to_its_secret_rank_and_session():
    good = proof(SECRET, "ring", b"session", 1)
    assert verify(SECRET, good, "ring", b"session", 1)
    assert not verify(SECRET, good, "ring", b"session", 0)
    assert not verify(SECRET, good, "ring", b"other session", 1)
    assert not verify(b"a stranger's secret 1234", good, "ring", b"session", 1)


# -- the control link --------------------------------------------------------------------------
class Rank0:
    """open_link for rank 0 in a thread; .result is the Link or the exception."""

    def __init__(self, lay, description=None, timeout=10.0, secret=SECRET):
        self.log, self.result = [], None
        self.thread = threading.Thread(target=self._run, args=(lay, description or {"k": "v"}, timeout, secret))
        self.thread.start()

    def _run(self, lay, description, timeout, secret):
        try:
            self.result = open_link(lay, secret, description, timeout, self.log.append)
        except Exception as err:  # noqa: BLE001 - handed to the test
            self.result = err


def test_link_rejects_a_stranger_then_admits_the_real_rank(tmp_path):
    port = free_port()
    server = Rank0(layout(tmp_path, 0, port=port))
    with pytest.raises(UserError, match="does not know the shared secret"):
        open_link(layout(tmp_path, 1, port=port), b"a stranger's secret 1234", {"k": "v"}, 5, print)
    peer = open_link(layout(tmp_path, 1, port=port), SECRET, {"k": "v"}, 5, print)
    server.thread.join(10)
    assert not isinstance(server.result, Exception), server.result
    assert any("rejected a connection from 127.0.0.1: wrong shared secret" in line for line in server.log)
    assert server.result.session == peer.session  # the session the ring proofs are bound to
    peer.close()
    server.result.close()


def test_rank0_gives_up_naming_the_missing_rank_and_the_rejections(tmp_path):
    port = free_port()
    server = Rank0(layout(tmp_path, 0, port=port), timeout=1.0)
    with pytest.raises(UserError):
        open_link(layout(tmp_path, 1, port=port), b"a stranger's secret 1234", {"k": "v"}, 5, print)
    server.thread.join(10)
    assert isinstance(server.result, UserError)
    assert "rank 1 (127.0.0.1) did not join within 1 s" in str(server.result)
    assert "wrong shared secret" in str(server.result)


def test_a_fake_rank0_gets_nothing(tmp_path):
    port = free_port()
    impostor = Rank0(layout(tmp_path, 0, port=port), timeout=1.0, secret=b"an impostor's secret 12345")
    with pytest.raises(UserError, match="is not this run's rank 0.*nothing was sent"):
        open_link(layout(tmp_path, 1, port=port), SECRET, {"k": "v"}, 5, print)
    impostor.thread.join(10)


@pytest.mark.skipif(sys.platform != "linux", reason="127.0.0.2 is a loopback address on Linux only")
def test_link_rejects_a_rank_connecting_from_outside_its_hostfile_address(tmp_path):
    port = free_port()
    server = Rank0(layout(tmp_path, 0, ips=("127.0.0.1", "127.0.0.2"), port=port), timeout=1.0)
    with pytest.raises(UserError):  # a process on 127.0.0.1 claiming rank 1, whose address is 127.0.0.2
        open_link(layout(tmp_path, 1, port=port), SECRET, {"k": "v"}, 5, print)
    server.thread.join(10)
    assert "connects from 127.0.0.1, not from its hostfile address 127.0.0.2" in str(server.result)


def test_link_refuses_a_rank_with_other_settings(tmp_path):
    port = free_port()
    server = Rank0(layout(tmp_path, 0, port=port), description={"training.beta": "0.1"})
    with pytest.raises(UserError, match="settings differ.*training.beta"):
        open_link(layout(tmp_path, 1, port=port), SECRET, {"training.beta": "0.2"}, 5, print)
    server.thread.join(10)
    assert "training.beta: 0.1 here, 0.2 there" in str(server.result)


def test_link_reports_a_peer_that_ends_or_fails_but_not_one_that_says_bye(tmp_path):
    expected = {"bye": [], "died": [(1, "ended (its connection closed)")], "failed": [(1, "stopped: out of memory")]}
    for how, report in expected.items():
        port = free_port()
        server = Rank0(layout(tmp_path, 0, port=port))
        peer = open_link(layout(tmp_path, 1, port=port), SECRET, {"k": "v"}, 5, print)
        server.thread.join(10)
        gone = []
        server.result.watch(lambda rank, why: gone.append((rank, why)))
        if how == "died":
            peer.channels[0].sock.close()  # what the kernel does when the process dies
        else:
            peer.close(error="out of memory" if how == "failed" else None)
        time.sleep(0.5)
        assert gone == report, how
        server.result.close()


def test_rank0_listens_only_on_its_hostfile_address(tmp_path):
    lay = layout(tmp_path, 0)
    server = Rank0(lay, timeout=1.0)
    time.sleep(0.3)
    assert listening_addresses(lay.control[1]) == {"127.0.0.1"}
    server.thread.join(10)


def test_an_mlx_ring_rank_listens_only_on_its_hostfile_address(tmp_path):
    """MLX's own listener (what the ring binds while it forms), seen from outside."""
    import subprocess

    port = free_port()
    env = {**os.environ, "MLX_HOSTFILE": str(write_ring(tmp_path, ["127.0.0.1"] * 2, port)), "MLX_RANK": "0"}
    proc = subprocess.Popen([sys.executable, "-c", "import mlx.core as mx; mx.distributed.init(strict=True, "
                             "backend='ring')"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not listening_addresses(port) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert listening_addresses(port) == {"127.0.0.1"}
    finally:
        proc.kill()
        proc.wait()


def listening_addresses(port: int) -> set:
    """Local addresses with a TCP socket listening on `port` (Linux /proc/net/tcp)."""
    if not os.path.exists("/proc/net/tcp"):
        pytest.skip("needs /proc/net/tcp")
    found = set()
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        ip_hex, port_hex = local.split(":")
        if state == "0A" and int(port_hex, 16) == port:
            found.add(socket.inet_ntoa(bytes.fromhex(ip_hex)[::-1]))
    return found


# -- watchdog ----------------------------------------------------------------------------------
def test_watchdog_names_the_step_of_a_stalled_exchange():
    stalls = []
    dog = Watchdog(0.3, "rank 1 (10.0.0.2)", lambda: "resume hint", on_stall=stalls.append, poll=0.05)
    with dog.waiting(3):
        time.sleep(0.1)  # a prompt exchange
    time.sleep(0.4)
    assert stalls == []
    with dog.waiting(7):
        time.sleep(0.6)
    dog.stop()
    assert len(stalls) == 1
    assert stalls[0].startswith("peer stalled at step 7: rank 1 (10.0.0.2) sent nothing for 0.3 s")


# -- a group smaller than asked for ------------------------------------------------------------
def test_more_devices_than_ranks_refuses_to_start(make_config, monkeypatch, tmp_path):
    monkeypatch.delenv("MLX_HOSTFILE", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(UserError, match="compute.num_devices is 2 but this process was started alone"):
        join_cluster(make_config(**{"compute.num_devices": 2}))
    monkeypatch.setenv("MLX_HOSTFILE", str(write_ring(tmp_path, ["127.0.0.1"] * 2, free_port())))
    monkeypatch.setenv("MLX_RANK", "0")
    with pytest.raises(UserError, match="compute.num_devices is 3 but the ring hostfile .* lists 2"):
        join_cluster(make_config(**{"compute.num_devices": 3}))
    with pytest.raises(UserError, match="compute.num_devices is 1 but the ring hostfile .* lists 2"):
        join_cluster(make_config())  # started by a launcher, but the config asks for one machine


def test_train_command_refuses_a_group_of_one(make_config, tmp_path, monkeypatch):
    import yaml

    monkeypatch.delenv("MLX_HOSTFILE", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(make_config(**{"compute.num_devices": 2}).to_dict()))
    result = CliRunner().invoke(main, ["train", str(path), "--no-progress"])
    assert result.exit_code == 2
    assert "MLX would silently form a group of one" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()  # nothing started


# -- settings agreement ------------------------------------------------------------------------
def test_ranks_compare_data_by_content_not_path(make_config, tiny_data, tmp_path):
    copy = tmp_path / "elsewhere.jsonl"
    copy.write_bytes(tiny_data["train"].read_bytes())
    here = run_description(make_config())
    there = run_description(make_config(**{"data.train_file": str(copy), "logging.output_dir": "/x"}))
    assert differences(here, there) == []
    copy.write_text(copy.read_text().replace("cat", "cow"))
    changed = differences(here, run_description(make_config(**{"data.train_file": str(copy),
                                                                "training.beta": 0.3})))
    assert [line.split(":")[0] for line in changed] == ["data.train_file", "training.beta"]


# -- launcher ----------------------------------------------------------------------------------
def test_launch_plan_never_puts_the_secret_on_a_command_line():
    hosts = [Host("127.0.0.1", ["10.0.0.1"]), Host("m3ultra.local", ["10.0.0.2"])]
    addresses, control = ring_addresses(hosts, 32323)
    secret = "9f" * 32
    local, remote = plan(hosts, addresses, control, ["cfg.yaml", "--set", "compute.num_devices=2"],
                         "/venv/bin/python", "/work", secret, None, "/tmp/ring.json")
    assert local.env["MLX_DPO_SECRET"] == secret and local.env["MLX_RANK"] == "0"
    assert local.argv == ["/venv/bin/python", "-m", "mlx_dpo", "train", "cfg.yaml", "--set",
                          "compute.num_devices=2"]
    assert remote.argv[:-1] == ["ssh", "-o", "BatchMode=yes", "m3ultra.local"]
    assert secret not in " ".join(remote.argv) and remote.stdin == (secret + "\n").encode()
    assert '"10.0.0.1:32323"], ["10.0.0.2:32324"' in remote.argv[-1]
    assert "MLX_RANK=1" in remote.argv[-1] and "MLX_DPO_CONTROL_PORT=32325" in remote.argv[-1]
    assert secret not in local.show() + remote.show()


def test_launch_rejects_bad_input_with_exit_code_2(tmp_path, make_config):
    import yaml

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(make_config().to_dict()))
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps([{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}] * 2))
    runner = CliRunner()
    result = runner.invoke(main, ["launch", "--hostfile", str(hosts), "--split", "0.5,0.3,0.2", str(cfg)])
    assert result.exit_code == 2 and "--split: '0.5,0.3,0.2' gives 3 share(s) but the run has 2" in result.output
    result = runner.invoke(main, ["launch", "--hostfile", str(tmp_path / "none.json"), str(cfg)])
    assert result.exit_code == 2 and "hostfile not found" in result.output
    result = runner.invoke(main, ["launch", "--hostfile", str(hosts), "--set", "training.beta=-1", str(cfg)])
    assert result.exit_code == 2 and "training.beta" in result.output
    result = runner.invoke(main, ["launch", "--hostfile", str(hosts), "--python", "/no/such/python", str(cfg)])
    assert result.exit_code == 2 and "--python /no/such/python: no such executable" in result.output
    result = runner.invoke(main, ["launch", "--hostfile", str(hosts), "--resume", "--overwrite", str(cfg)])
    assert result.exit_code == 2 and "pass one" in result.output
    result = runner.invoke(main, ["launch", "--hostfile", str(hosts), "--dry-run", str(cfg)])
    assert result.exit_code == 0 and "<secret>" in result.output and result.output.count("-m mlx_dpo train") == 2


# -- the gradient exchange ---------------------------------------------------------------------
def test_exchange_buckets_keep_every_tensor_in_place():
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_dpo.distributed.exchange import _buckets, sum_over_ranks

    grads = {"a": mx.arange(6, dtype=mx.float32).reshape(2, 3),
             "layers": [{"w": mx.ones((4,)), "h": mx.full((2, 2), 0.5, dtype=mx.float16)},
                        {"w": mx.arange(5, dtype=mx.float32)}]}
    flat = tree_flatten(grads)
    # 24-byte "a" goes alone; w (16 B) and the float16 h (8 B) cannot share; w (20 B) fits no more
    buckets = _buckets(flat, bucket_bytes=24)
    assert [[n for n, _ in b] for b in buckets] == [["a"], ["layers.0.w"], ["layers.0.h"], ["layers.1.w"]]
    packed = _buckets(flat, bucket_bytes=2**20)  # small tensors packed, a new buffer at each dtype change
    assert [[n for n, _ in b] for b in packed] == [["a", "layers.0.w"], ["layers.0.h"], ["layers.1.w"]]
    group = mx.distributed.init()  # one process: the sum is the tree itself
    out = dict(tree_flatten(sum_over_ranks(grads, group, bucket_bytes=2**20)))
    for name, g in flat:
        assert out[name].dtype == g.dtype and out[name].shape == g.shape
        assert mx.array_equal(out[name], g)
