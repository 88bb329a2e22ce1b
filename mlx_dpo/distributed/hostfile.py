"""Where the ranks are: the launch hostfile (mlx.launch's JSON format) and the ring layout.

The launch hostfile names every machine once, in rank order:

    {"backend": "ring", "hosts": [{"ssh": "m4max.local", "ips": ["10.0.0.1"]},
                                  {"ssh": "m3ultra.local", "ips": ["10.0.0.2"]}]}

From it the launcher derives MLX's ring hostfile (MLX_HOSTFILE: per rank, a list of "ip:port"
addresses, each bound by that rank only) and every rank reads it back as a `RingLayout`.
Port plan: the ring addresses take consecutive ports from the base port; the control link
(authentication, liveness) takes the next one, on rank 0's first address.
"""
from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import UserError

DEFAULT_PORT = 32323  # mlx.launch's default starting port
LOCAL_NAMES = ("127.0.0.1", "localhost", "::1")  # started as local processes, not over ssh


@dataclass
class Host:
    ssh: str
    ips: list[str]

    @property
    def is_local(self) -> bool:
        return self.ssh in LOCAL_NAMES


@dataclass
class RingLayout:
    """This process's view of the ring: its rank and every rank's addresses."""
    rank: int
    addresses: list[list[str]]  # per rank: "ip:port" strings
    control_port: int

    @property
    def world(self) -> int:
        return len(self.addresses)

    def ip(self, rank: int) -> str:
        return split_address(self.addresses[rank][0])[0]

    def ips(self, rank: int) -> set[str]:
        return {split_address(a)[0] for a in self.addresses[rank]}

    @property
    def control(self) -> tuple[str, int]:
        return self.ip(0), self.control_port

    def describe(self, rank: int) -> str:
        return f"rank {rank} ({self.ip(rank)})"


def read_hostfile(path: str | Path) -> tuple[list[Host], dict]:
    """The hosts of a launch hostfile and its other keys; errors name the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: hostfile not found (see configs/hosts.example.json)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON: {err}") from None
    extra: dict = {}
    if isinstance(data, dict):
        extra = {k: v for k, v in data.items() if k != "hosts"}
        data = data.get("hosts")
    if not isinstance(data, list) or len(data) < 2:
        raise UserError(f"{path}: hosts must be a list of at least two machines, each "
                        '{"ssh": NAME, "ips": [IP, ...]}')
    backend = extra.get("backend", "ring")
    if backend != "ring":
        raise UserError(f"{path}: backend {backend!r} is not supported; mlx-dpo trains over the ring backend "
                        "(TCP): remove the key or set \"backend\": \"ring\"")
    return [_read_host(path, i, h) for i, h in enumerate(data)], extra


def _read_host(path: Path, i: int, raw) -> Host:
    where = f"{path}: hosts[{i}]"
    if not isinstance(raw, dict) or not isinstance(raw.get("ssh"), str) or not raw["ssh"]:
        raise UserError(f"{where}: expected {{\"ssh\": NAME, \"ips\": [IP, ...]}} with a non-empty ssh name")
    ips = raw.get("ips")
    if not isinstance(ips, list) or not ips:
        raise UserError(f"{where}.ips: a list of at least one IP address is required (the ring backend "
                        "binds and connects to IP addresses, not host names)")
    for ip in ips:
        try:
            ipaddress.ip_address(ip)
        except (TypeError, ValueError):
            raise UserError(f"{where}.ips: {ip!r} is not an IP address") from None
    return Host(raw["ssh"], list(ips))


def ring_addresses(hosts: list[Host], port: int) -> tuple[list[list[str]], int]:
    """MLX_HOSTFILE's content (one address per IP, consecutive ports) and the control port."""
    addresses, next_port = [], port
    for host in hosts:
        addresses.append([join_address(ip, next_port + k) for k, ip in enumerate(host.ips)])
        next_port += len(host.ips)
    if next_port > 65535:
        raise UserError(f"--port {port}: the run needs ports {port}..{next_port}, beyond 65535")
    return addresses, next_port


def layout_from_env(env: Optional[dict] = None) -> Optional[RingLayout]:
    """The ring layout MLX will use (MLX_HOSTFILE + MLX_RANK), or None for a single process."""
    env = os.environ if env is None else env
    path = env.get("MLX_HOSTFILE")
    if not path:
        return None
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
        addresses = json.loads(text) if text else []
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"MLX_HOSTFILE={path}: cannot read the ring hostfile: {err}") from None
    if not (isinstance(addresses, list) and all(isinstance(a, list) and a for a in addresses)):
        raise UserError(f"MLX_HOSTFILE={path}: expected a list of per-rank address lists, "
                        '[["ip:port"], ["ip:port"]]')
    if len(addresses) < 2:
        return None  # what mlx.launch writes for one host
    rank = env.get("MLX_RANK", "")
    if not rank.isdigit() or int(rank) >= len(addresses):
        raise UserError(f"MLX_RANK={rank!r}: expected a rank from 0 to {len(addresses) - 1} "
                        f"(MLX_HOSTFILE lists {len(addresses)} ranks)")
    ports = [split_address(a)[1] for rank_addrs in addresses for a in rank_addrs]
    control = int(env.get("MLX_DPO_CONTROL_PORT") or max(ports) + 1)
    return RingLayout(int(rank), addresses, control)


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise UserError(f"ring address {address!r}: expected ip:port")
    return host, int(port)


def join_address(ip: str, port: int) -> str:
    return f"{ip}:{port}"  # mlx.launch's spelling, IPv6 included
