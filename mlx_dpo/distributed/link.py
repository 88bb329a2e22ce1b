"""The control link: one small authenticated TCP connection from every rank to rank 0.

MLX's ring carries the gradients but cannot say who is on the other end, nor tell a dead
peer from a slow one while this rank is computing. The link, opened before the ring:
  - proves the shared secret both ways (challenge-response, secret.py) and checks that the
    peer connects from its hostfile address and runs the same settings (agreement.py);
  - then stays open: a peer process that ends closes it at once, so a survivor learns within
    moments which rank it lost, even in the middle of a long step. Clean ends say "bye".
Only rank 0 listens, on its hostfile address; the others connect from theirs.
"""
from __future__ import annotations

import errno
import json
import secrets as _secrets
import socket
import threading
import time
from typing import Callable, Optional

from ..errors import UserError
from .agreement import differences
from .hostfile import RingLayout
from .secret import SECRET_ENV, proof, verify

PROTOCOL = "mlx-dpo-link/1"
HANDSHAKE_SECONDS = 10.0  # a silent stranger cannot hold rank 0's door longer than this
MAX_LINE = 1 << 20


class Rejected(Exception):
    """A connection rank 0 turns away (it keeps waiting for the real rank)."""


class Channel:
    """Newline-delimited JSON over one TCP socket."""

    def __init__(self, sock: socket.socket):
        self.sock, self._buffer = sock, b""

    def send(self, message: dict) -> None:
        self.sock.sendall(json.dumps(message).encode() + b"\n")

    def recv(self, timeout: Optional[float] = None) -> Optional[dict]:
        """The next message; None when the peer closed the connection."""
        self.sock.settimeout(timeout)
        while b"\n" not in self._buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self._buffer += chunk
            if len(self._buffer) > MAX_LINE:
                raise Rejected("message too long")
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            message = json.loads(line)
        except json.JSONDecodeError:
            raise Rejected("not speaking the mlx-dpo link protocol") from None
        if not isinstance(message, dict):
            raise Rejected("not speaking the mlx-dpo link protocol")
        return message

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class Link:
    """The open connections (rank 0: one per peer; others: one to rank 0) and their watchers."""

    def __init__(self, layout: RingLayout, channels: dict[int, Channel], session: bytes):
        self.layout, self.channels, self.session = layout, channels, session
        self._closing = False

    def watch(self, on_gone: Callable[[int, str], None]) -> None:
        """Call on_gone(rank, why) from a background thread if a peer ends without "bye"."""
        for rank, channel in self.channels.items():
            threading.Thread(target=self._watch_one, args=(rank, channel, on_gone), daemon=True,
                             name=f"mlx-dpo-link-{rank}").start()

    def _watch_one(self, rank: int, channel: Channel, on_gone) -> None:
        while True:
            try:
                message = channel.recv()
            except (OSError, Rejected):
                message = None
            if self._closing:
                return
            if message is None:
                on_gone(rank, "ended (its connection closed)")
                return
            if "bye" in message:
                return
            if "stop" in message:
                on_gone(rank, f"stopped: {message['stop']}")
                return

    def close(self, error: Optional[str] = None) -> None:
        """Tell the peers this rank is done (cleanly, or with `error`), then hang up."""
        self._closing = True
        for channel in self.channels.values():
            try:
                channel.send({"stop": error} if error else {"bye": True})
            except OSError:
                pass
            channel.close()


def open_link(layout: RingLayout, secret: bytes, description: dict, timeout: float,
              echo: Callable[[str], None]) -> Link:
    if layout.rank == 0:
        return _serve(layout, secret, description, timeout, echo)
    return _join(layout, secret, description, timeout)


# -- rank 0 ---------------------------------------------------------------------------------
def _serve(layout, secret, description, timeout, echo) -> Link:
    ip, port = layout.control
    try:
        server = socket.create_server((ip, port), family=_family(ip))
    except OSError as err:
        raise UserError(f"rank 0 cannot listen on {ip}:{port} (its hostfile address; control port): "
                        f"{err.strerror}. Is another run using the port? Choose another base with --port") from None
    server.settimeout(0.5)
    session = _secrets.token_bytes(16)
    channels: dict[int, Channel] = {}
    rejected: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        while len(channels) < layout.world - 1:
            if time.monotonic() > deadline:
                raise UserError(_missing(layout, channels, rejected, timeout))
            try:
                sock, address = server.accept()
            except socket.timeout:
                continue
            channel = Channel(sock)
            try:
                rank = _admit(channel, address[0], layout, secret, session, description, channels)
            except (Rejected, OSError) as why:
                why = why if isinstance(why, Rejected) else Rejected(f"connection error: {why}")
                rejected.append(f"{address[0]}: {why}")
                echo(f"control link: rejected a connection from {address[0]}: {why}")
                _try_send(channel, {"error": str(why)})
                channel.close()
                continue
            channel.send({"admitted": True})
            channels[rank] = channel
    except BaseException:
        for channel in channels.values():
            channel.close()
        raise
    finally:
        server.close()
    return Link(layout, channels, session)


def _admit(channel, source_ip, layout, secret, session, description, joined) -> int:
    hello = channel.recv(HANDSHAKE_SECONDS)
    if not hello or hello.get("protocol") != PROTOCOL:
        raise Rejected("not speaking the mlx-dpo link protocol")
    rank, nonce = hello.get("rank"), _hex(hello.get("nonce"))
    if not isinstance(rank, int) or not 0 < rank < layout.world or nonce is None:
        raise Rejected(f"claims an impossible rank {rank!r}")
    if source_ip not in layout.ips(rank):
        raise Rejected(f"claims rank {rank} but connects from {source_ip}, not from its hostfile "
                       f"address {', '.join(sorted(layout.ips(rank)))}")
    if rank in joined:
        raise Rejected(f"rank {rank} has already joined")
    channel.send({"nonce": session.hex(), "proof": proof(secret, "rank0", session, nonce, rank).hex()})
    reply = channel.recv(HANDSHAKE_SECONDS) or {}
    claimed = _hex(reply.get("proof"))
    if claimed is None or not verify(secret, claimed, "joiner", session, nonce, rank):
        raise Rejected("wrong shared secret")
    diffs = differences(description, reply.get("description") or {})
    if diffs:
        text = "; ".join(diffs)
        _try_send(channel, {"error": f"settings differ from rank 0's: {text}"})
        raise UserError(f"rank {rank} runs different settings or inputs than rank 0 (here = rank 0): "
                        f"{text}. Start every rank with the same config, data and model")
    return rank


def _missing(layout, channels, rejected, timeout) -> str:
    missing = [layout.describe(r) for r in range(1, layout.world) if r not in channels]
    text = f"{', '.join(missing)} did not join within {timeout:g} s (compute.join_timeout)"
    if rejected:
        text += f"; rejected: {'; '.join(rejected)}"
    return text + ". Are all ranks started, with the same shared secret?"


# -- other ranks ----------------------------------------------------------------------------
def _join(layout, secret, description, timeout) -> Link:
    target, rank = layout.control, layout.rank
    channel = Channel(_connect(target, layout.ip(rank), timeout))
    where = f"rank 0 at {target[0]}:{target[1]}"
    try:
        nonce = _secrets.token_bytes(16)
        channel.send({"protocol": PROTOCOL, "rank": rank, "nonce": nonce.hex()})
        answer = _expect(channel, where)
        session, claimed = _hex(answer.get("nonce")), _hex(answer.get("proof"))
        if session is None or claimed is None or not verify(secret, claimed, "rank0", session, nonce, rank):
            raise UserError(f"the process at {target[0]}:{target[1]} does not know the shared secret: it is not "
                            f"this run's rank 0 (a stranger, or a different {SECRET_ENV}); nothing was sent to it")
        channel.send({"proof": proof(secret, "joiner", session, nonce, rank).hex(), "description": description})
        _expect(channel, where)
    except BaseException:
        channel.close()
        raise
    return Link(layout, {0: channel}, session)


def _connect(target: tuple[str, int], source_ip: str, timeout: float) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection(target, timeout=HANDSHAKE_SECONDS, source_address=(source_ip, 0))
        except OSError as err:
            if err.errno == errno.EADDRNOTAVAIL:
                raise UserError(f"this machine has no address {source_ip}, which the hostfile gives "
                                "this rank") from None
            if time.monotonic() > deadline:
                raise UserError(f"rank 0 did not answer at {target[0]}:{target[1]} within {timeout:g} s "
                                f"(compute.join_timeout): {err}. Is rank 0 started, and the address "
                                "reachable?") from None
            time.sleep(0.2)


def _expect(channel: Channel, where: str) -> dict:
    try:
        message = channel.recv(HANDSHAKE_SECONDS)
    except (OSError, Rejected) as err:
        raise UserError(f"{where}: handshake failed: {err}") from None
    if message is None:
        raise UserError(f"{where} closed the connection during the handshake")
    if "error" in message:
        raise UserError(f"{where} refused this rank: {message['error']}")
    return message


def _hex(value) -> Optional[bytes]:
    try:
        return bytes.fromhex(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _try_send(channel: Channel, message: dict) -> None:
    try:
        channel.send(message)
    except OSError:
        pass


def _family(ip: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET
