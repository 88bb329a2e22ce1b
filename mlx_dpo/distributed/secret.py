"""The shared secret and the proofs built from it (HMAC-SHA256).

MLX's ring backend accepts whoever connects first; the secret lets every rank prove, before
any training data or gradient flows, that its peers were started by the same user. The proof
binds a role, fresh nonces and the rank, so a recorded proof is useless in another session.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path
from typing import Optional

from ..errors import UserError

SECRET_ENV = "MLX_DPO_SECRET"
SECRET_FILE_ENV = "MLX_DPO_SECRET_FILE"
MIN_LENGTH = 16

HOW_TO = (f"set {SECRET_ENV} to the same random string on every rank, or {SECRET_FILE_ENV} to a file "
          "holding it (mode 600); `mlx-dpo launch` makes and delivers one for you")


def new_secret() -> str:
    return secrets.token_hex(32)


def load_secret(env: Optional[dict] = None) -> bytes:
    """The secret from the file named by MLX_DPO_SECRET_FILE, else from MLX_DPO_SECRET: the order
    in which `mlx-dpo launch` picks it, so that with both set every rank reads what the launcher
    handed to the machines it reaches over ssh (the file's name, never the variable)."""
    env = os.environ if env is None else env
    value, where = env.get(SECRET_ENV), SECRET_ENV
    if env.get(SECRET_FILE_ENV):
        path = Path(env[SECRET_FILE_ENV]).expanduser()
        value, where = _read_secret_file(path), str(path)
    if not value:
        raise UserError(f"a run on several machines needs a shared secret: {HOW_TO}")
    value = value.strip()
    if len(value) < MIN_LENGTH:
        raise UserError(f"{where}: the shared secret is {len(value)} characters; use at least {MIN_LENGTH} "
                        "(e.g. python -c 'import secrets; print(secrets.token_hex(32))')")
    return value.encode()


def _read_secret_file(path: Path) -> str:
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise UserError(f"{SECRET_FILE_ENV}={path}: cannot read the secret file: {err.strerror}") from None
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UserError(f"{path}: the secret file is readable by other users; run: chmod 600 {path}")
    return text


def proof(secret: bytes, *parts) -> bytes:
    """HMAC-SHA256 over the parts (strings, ints or bytes), unambiguously separated."""
    mac = hmac.new(secret, digestmod=hashlib.sha256)
    for part in parts:
        data = part if isinstance(part, bytes) else str(part).encode()
        mac.update(len(data).to_bytes(4, "big") + data)
    return mac.digest()


def verify(secret: bytes, claimed: bytes, *parts) -> bool:
    return hmac.compare_digest(proof(secret, *parts), claimed)
