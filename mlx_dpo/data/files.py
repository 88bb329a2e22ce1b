"""Write line-selected copies of a JSONL file, atomically; refuse outputs that would destroy data.

`data clean` and `data split` copy the records they keep byte for byte (extra fields and
formatting survive). An output appears only when every output is complete: each is written
to a temp file beside it, fsynced, then renamed; on any error the temp files are removed.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

from ..errors import UserError


def check_outputs(source, outputs: Sequence, overwrite: bool = False) -> None:
    """Refuse an output that is the input, or that exists unless `overwrite` (--force).

    Called before any work, so a refused command has written nothing and spent no time.
    """
    for out in outputs:
        if Path(out).resolve() == Path(source).resolve():
            raise UserError(f"output {out} would overwrite the input; choose another path")
        if Path(out).exists() and not overwrite:
            raise UserError(f"{out} exists; pass --force to overwrite it")


def copy_lines(path, routes: dict, targets: Sequence[str]) -> dict:
    """Copy line `n` of `path` (1-based) to `routes[n]`, for every n in `routes`.

    `targets` lists every output, so that one that gets no line is still created (empty).
    Returns the number of lines written per target.
    """
    umask = os.umask(0)
    os.umask(umask)
    handles, counts = {}, {str(t): 0 for t in targets}
    try:
        for target in counts:
            folder = Path(target).resolve().parent
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".jsonl", dir=folder)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would surprise a user
            handles[target] = (os.fdopen(fd, "wb"), tmp)
        with open(path, "rb") as source:
            for number, raw in enumerate(source, start=1):
                target = routes.get(number)
                if target is not None:
                    handles[target][0].write(raw if raw.endswith(b"\n") else raw + b"\n")
                    counts[target] += 1
        for handle, _ in handles.values():
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
        for target, (_, tmp) in handles.items():
            os.replace(tmp, target)
    finally:
        for handle, tmp in handles.values():
            handle.close()
            if os.path.exists(tmp):
                os.unlink(tmp)
    return counts
