"""The peer watchdog: a rank waiting too long in one exchange stops instead of hanging.

A frozen peer (a sleeping laptop, SIGSTOP, a wedged GPU) keeps its TCP connections open, so
MLX's ring waits for it forever. Every collective the trainer issues goes through
`WatchedEngine`, which arms a deadline; a background thread checks it. MLX releases the GIL
while it waits on a socket, so the thread runs. It cannot unwind a thread stuck inside MLX,
so it prints the reason and ends the process; checkpoints are written atomically, so none
is damaged (rank 0 is never inside a save while it waits on a peer).
"""
from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable, Optional

EXIT_CODE = 1


def die(message: str) -> None:
    """Print `error: message` and end the process now, from any thread."""
    try:
        sys.stderr.write(f"error: {message}\n")
        sys.stderr.flush()
        sys.stdout.flush()
    finally:
        os._exit(EXIT_CODE)


class Watchdog:
    def __init__(self, timeout: float, peers: str, resume_hint: Callable[[], str],
                 on_stall: Callable[[str], None] = die, poll: float = 0.2):
        self.timeout, self.peers, self.resume_hint, self.on_stall = timeout, peers, resume_hint, on_stall
        self._since: Optional[float] = None
        self._step = 0
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(poll,), daemon=True, name="mlx-dpo-watchdog")
        self._thread.start()

    @contextmanager
    def waiting(self, step: int):
        """Arm the deadline for one exchange with the peers at training step `step`."""
        self._step, self._since = step, time.monotonic()
        try:
            yield
        finally:
            self._since = None

    def stop(self) -> None:
        self._stopped.set()

    def _run(self, poll: float) -> None:
        while not self._stopped.wait(poll):
            since = self._since
            if since is not None and time.monotonic() - since > self.timeout:
                self._stopped.set()
                self.on_stall(f"peer stalled at step {self._step}: {self.peers} sent nothing for "
                              f"{self.timeout:g} s (compute.peer_timeout); this rank stops. {self.resume_hint()}")


class WatchedEngine:
    """The engine, with every exchange with the peers under the watchdog's deadline."""

    def __init__(self, engine, watchdog: Watchdog, current_step: Callable[[], int]):
        self._engine, self._watchdog, self._step = engine, watchdog, current_step

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def apply_update(self, *args, **kwargs):
        with self._watchdog.waiting(self._step()):
            return self._engine.apply_update(*args, **kwargs)

    def all_reduce_sum(self, values):
        with self._watchdog.waiting(self._step()):
            return self._engine.all_reduce_sum(values)
