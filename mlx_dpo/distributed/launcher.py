"""Starting every rank: local processes for 127.0.0.1/localhost, ssh for the other hosts.

Why not mlx.launch itself: it exits 0 even when a rank fails, and passes environment values
on the ssh command line (visible in `ps`), which would leak the shared secret. This keeps its
hostfile format and its MLX_HOSTFILE layout, and adds: the secret delivered privately (a
local rank's environment, a remote rank's ssh stdin), a remote rank stopped when the
launcher's ssh connection goes, and the launcher's exit code = the first failing rank's.
Rank 0's output goes straight to the terminal (progress bar included); others are prefixed.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from ..errors import UserError
from .hostfile import Host
from .secret import SECRET_ENV, SECRET_FILE_ENV

FAILED_GRACE = 10.0  # seconds


@dataclass
class RankCommand:
    rank: int
    host: Host
    argv: list[str]
    env: dict = field(default_factory=dict)  # added to a local rank's environment
    stdin: Optional[bytes] = None  # written to a remote rank's ssh stdin (the secret)

    def show(self) -> str:
        where = "local" if self.host.is_local else f"ssh {self.host.ssh}"
        env = " ".join(f"{k}={'<secret>' if k == SECRET_ENV else v}" for k, v in sorted(self.env.items()))
        command = self.argv[-1] if not self.host.is_local else shlex.join(self.argv)
        return f"rank {self.rank} ({where}): {env + ' ' if env else ''}{command}"


def plan(hosts: list[Host], addresses: list[list[str]], control_port: int, train_args: list[str],
         python: str, cwd: str, secret: Optional[str], secret_file: Optional[str],
         ring_file: str) -> list[RankCommand]:
    """One command per rank; `ring_file` holds MLX_HOSTFILE's content for the local ranks."""
    ring = json.dumps(addresses)
    secret_env = {SECRET_FILE_ENV: secret_file} if secret_file else {SECRET_ENV: secret}
    commands = []
    for rank, host in enumerate(hosts):
        env = {"MLX_RANK": str(rank), "MLX_DPO_CONTROL_PORT": str(control_port)}
        if host.is_local:
            argv = [python, "-m", "mlx_dpo", "train", *train_args]
            commands.append(RankCommand(rank, host, argv, {**env, "MLX_HOSTFILE": ring_file, **secret_env}))
            continue
        script = _remote_script(env, ring, python, cwd, train_args, secret_file)
        ssh = ["ssh", "-o", "BatchMode=yes", host.ssh, script]
        commands.append(RankCommand(rank, host, ssh, stdin=None if secret_file else (secret + "\n").encode()))
    return commands


def _remote_script(env: dict, ring: str, python: str, cwd: str, train_args: list[str],
                   secret_file: Optional[str]) -> str:
    q = shlex.quote
    lines = [f"cd {q(cwd)} || exit 2"]
    if secret_file:
        lines.append(f"export {SECRET_FILE_ENV}={q(secret_file)}")
    else:  # the first stdin line: never on a command line
        lines.append(f"IFS= read -r {SECRET_ENV} && export {SECRET_ENV}")
    lines += [f"export {k}={q(v)}" for k, v in env.items()]
    lines += ['MLX_HOSTFILE=$(mktemp) || exit 2', f"printf '%s' {q(ring)} > \"$MLX_HOSTFILE\"",
              "export MLX_HOSTFILE",
              # stdin stays open while the launcher runs; its end means the launcher is gone. (A
              # background job's stdin is /dev/null unless given explicitly: hence fd 3.)
              "exec 3<&0", "( cat <&3 > /dev/null; kill -TERM $$ ) > /dev/null 2>&1 &",
              f"exec {q(python)} -m mlx_dpo train {shlex.join(train_args)} < /dev/null 3<&-"]
    return "sh -c " + q("\n".join(lines))  # sh: whatever the remote login shell is


def check_tools(hosts: list[Host], python: str) -> None:
    """Fail before starting anything when a rank could not even be started."""
    remote = [h.ssh for h in hosts if not h.is_local]
    if remote and shutil.which("ssh") is None:
        raise UserError(f"ssh is not on PATH, and hosts {', '.join(remote)} are reached with ssh")
    if any(h.is_local for h in hosts) and shutil.which(python) is None:
        raise UserError(f"--python {python}: no such executable here")


def write_ring_file(addresses: list[list[str]]) -> str:
    fd, path = tempfile.mkstemp(prefix="mlx-dpo-ring-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(addresses, f)
    return path


def run_ranks(commands: list[RankCommand], cwd: str, echo: Callable[[str], None] = print) -> int:
    """Start every rank, relay output, wait; the exit code of the first rank that failed (or 0)."""
    procs = [_start(c, cwd) for c in commands]
    relays = [threading.Thread(target=_relay, args=(p, c.rank), daemon=True)
              for p, c in zip(procs, commands) if c.rank != 0]
    for t in relays:
        t.start()
    try:
        codes = _wait_all(procs)
    except KeyboardInterrupt:  # the ranks got the same Ctrl-C: they save and stop; wait for them
        echo("launch: waiting for the ranks to stop (Ctrl-C again to kill them)")
        try:
            codes = _wait_all(procs)
        except KeyboardInterrupt:
            for p in procs:
                _stop(p)
            codes = [p.wait() for p in procs]
    for p in procs:
        if p.stdin:
            p.stdin.close()
    for t in relays:
        t.join(timeout=5)
    for c, code in zip(commands, codes):
        if code != 0:
            echo(f"launch: rank {c.rank} ({c.host.ssh}) exited with code {code}")
    return next((_exit_code(code) for code in codes if code != 0), 0)


def _wait_all(procs: list[subprocess.Popen]) -> list[int]:
    """Wait for every rank. Once one has failed, the others get FAILED_GRACE seconds to notice
    (a rank still waiting for peers to join would otherwise wait out compute.join_timeout)."""
    failed_at = None
    while any(p.poll() is None for p in procs):
        if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > FAILED_GRACE:
            for p in procs:
                _stop(p)
            failed_at = float("inf")  # signalled once
        time.sleep(0.1)
    return [p.returncode for p in procs]


def _start(command: RankCommand, cwd: str) -> subprocess.Popen:
    out = None if command.rank == 0 else subprocess.PIPE
    if command.host.is_local:
        return subprocess.Popen(command.argv, cwd=cwd, env={**os.environ, **command.env},
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT if out else None)
    proc = subprocess.Popen(command.argv, stdin=subprocess.PIPE, stdout=out,
                            stderr=subprocess.STDOUT if out else None)
    if command.stdin:
        proc.stdin.write(command.stdin)
        proc.stdin.flush()  # the pipe stays open: closing it stops the remote rank
    return proc


def _relay(proc: subprocess.Popen, rank: int) -> None:
    for raw in iter(proc.stdout.readline, b""):
        line = raw.decode(errors="replace").rstrip("\r\n").split("\r")[-1]
        if line:
            sys.stderr.write(f"[rank {rank}] {line}\n")
            sys.stderr.flush()


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        if proc.stdin:
            proc.stdin.close()
        proc.send_signal(signal.SIGTERM)


def _exit_code(code: int) -> int:
    return code if code > 0 else 128 - code  # killed by signal N: the shell's 128+N
