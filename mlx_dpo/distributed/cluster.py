"""Joining a run on several machines, and keeping it honest while it trains.

`join_cluster` (before any model loads): read the ring layout, refuse a group smaller than
asked for, authenticate every peer over the control link, form MLX's ring, and check over the
ring itself that its peers are the authenticated ones. `Cluster.training` (around the loop):
start every rank from rank 0's state, measure the split if asked, and turn a lost or frozen
peer into a clear message and a prompt exit instead of a hang.
"""
from __future__ import annotations

import faulthandler
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

from .. import checkpoint
from ..config import Config
from ..errors import TrainingStopped, UserError
from ..trainer import Ranks
from .agreement import run_description
from .hostfile import RingLayout, layout_from_env
from .link import Link, open_link
from .secret import load_secret, proof, verify
from .split import format_split, measure_split, parse_split
from .sync import exchange_ring_proofs, sync_from_rank0
from .watchdog import WatchedEngine, Watchdog, die

# After a peer's link drops: time for this rank's own ring error to end it cleanly. MLX does
# not always raise: collectives queued behind the failed one can wait forever.
GRACE_SECONDS = 1.5
LAUNCH_HINT = "start every rank with: mlx-dpo launch --hostfile hosts.json CONFIG (docs/distributed.md)"


def join_cluster(cfg: Config, echo: Callable[[str], None] = print) -> Optional["Cluster"]:
    """The MLX ring group this process belongs to, or None when it trains alone."""
    layout = layout_from_env()
    wanted = cfg.compute.num_devices
    if layout is None:
        if wanted == 1 or _torch_group(cfg):
            return None
        raise UserError(f"{cfg.source}: compute.num_devices is {wanted} but this process was started alone "
                        "(no MLX_HOSTFILE); MLX would silently form a group of one, so the run refuses to "
                        f"start. {LAUNCH_HINT[0].upper()}{LAUNCH_HINT[1:]}")
    if wanted != layout.world:
        raise UserError(f"{cfg.source}: compute.num_devices is {wanted} but the ring hostfile (MLX_HOSTFILE) "
                        f"lists {layout.world} ranks; make them agree (mlx-dpo launch sets it for you)")
    if _torch_group(cfg):
        raise UserError(f"{cfg.source}: the MLX ring trains the MLX engine; set compute.engine to mlx or auto")
    shares = parse_split(cfg.compute.split, layout.world, f"{cfg.source}: compute.split")
    secret = load_secret()
    echo(f"rank {layout.rank} of {layout.world}: joining the run (control link "
         f"{layout.control[0]}:{layout.control[1]})")
    link = open_link(layout, secret, run_description(cfg), cfg.compute.join_timeout, echo)
    try:
        group = _form_ring(layout, cfg.compute.join_timeout)
        _check_ring(group, layout, secret, link.session, cfg.compute.join_timeout)
    except BaseException as err:
        link.close(str(err) or type(err).__name__)
        raise
    return Cluster(cfg, layout, group, link, shares)


def _torch_group(cfg: Config) -> bool:
    """torchrun's group (the PyTorch engine) is set up by engines/torch_dist.py, not here."""
    return "WORLD_SIZE" in os.environ or cfg.compute.engine == "torch" or cfg.compute.device == "cuda"


def _form_ring(layout: RingLayout, timeout: float):
    import mlx.core as mx

    # init() holds the GIL while it connects, so no Python thread can time it out; a peer
    # that vanished after the link handshake would hang it. faulthandler's C timer can.
    with open(os.devnull, "w") as sink:
        faulthandler.dump_traceback_later(timeout, exit=True, file=sink)
        try:
            group = mx.distributed.init(strict=True, backend="ring")
        except RuntimeError as err:
            raise UserError(f"MLX could not form the ring over {layout.addresses}: {err}") from None
        finally:
            faulthandler.cancel_dump_traceback_later()
    if group.size() != layout.world or group.rank() != layout.rank:
        raise UserError(f"asked for {layout.world} ranks (MLX_HOSTFILE) but MLX formed a group of "
                        f"{group.size()} with this process as rank {group.rank()}: refusing to start")
    return group


def _check_ring(group, layout: RingLayout, secret: bytes, session: bytes, timeout: float) -> None:
    watchdog = Watchdog(timeout, "the ring peers", lambda: "Nothing was trained.")
    try:
        with watchdog.waiting(0):
            proofs = exchange_ring_proofs(proof(secret, "ring", session, layout.rank), group, layout.world)
    finally:
        watchdog.stop()
    for rank, claimed in enumerate(proofs):
        if not verify(secret, claimed, "ring", session, rank):
            raise UserError(f"the ring peer in the place of {layout.describe(rank)} failed the shared-secret "
                            "check: a process outside this run is connected to the ring; refusing to train")


class Cluster:
    def __init__(self, cfg: Config, layout: RingLayout, group, link: Link, shares: Optional[list[float]]):
        self.cfg, self.layout, self.group, self.link, self.shares = cfg, layout, group, link, shares
        self.problem: Optional[str] = None  # set by the link watcher: which peer went, and how
        self._done = False

    @property
    def rank(self) -> int:
        return self.layout.rank

    @property
    def ranks(self) -> Ranks:
        even = [1.0 / self.layout.world] * self.layout.world
        return Ranks(self.rank, list(self.shares or even))

    def attach(self, engine) -> None:
        if not hasattr(engine, "group"):
            raise UserError("the MLX ring trains the MLX engine only; set compute.engine to mlx or auto")
        engine.group = self.group

    def quiet(self, echo: Callable[[str], None]) -> Callable[[str], None]:
        """Rank 0 speaks for the run; the others only report errors (as exceptions)."""
        return echo if self.rank == 0 else (lambda line: None)

    @contextmanager
    def training(self, trainer, echo: Callable[[str], None]):
        """Around Trainer.train(): one starting state, the split, and the peer watchdogs."""
        engine = trainer.engine
        watchdog = Watchdog(self.cfg.compute.peer_timeout, self._peers(), lambda: self._resume_hint(trainer))
        trainer.engine = WatchedEngine(engine, watchdog, lambda: trainer.state.step + 1)
        restore, trainer.restore = trainer.restore, lambda folder: self._restore(engine, watchdog, trainer, folder)
        self.link.watch(lambda rank, why: self._peer_gone(rank, why, trainer))
        error = None
        try:
            with watchdog.waiting(trainer.state.step):
                sync_from_rank0(engine, trainer.state, self.group, self.rank)
            trainer.ranks = self._split(trainer, echo)
            yield
        except RuntimeError as err:
            if "[ring]" not in str(err):
                error = f"{type(err).__name__}: {err}"
                raise
            error = self._lost(trainer, err)
            raise TrainingStopped(error) from None
        except BaseException as err:
            error = str(err) or type(err).__name__
            raise
        finally:
            self._done = True
            watchdog.stop()
            self.link.close(error)
            trainer.engine, trainer.restore = engine, restore

    def _restore(self, engine, watchdog: Watchdog, trainer, folder: Optional[Path]) -> None:
        """A rollback (kl_guard.py): only rank 0 has the checkpoint on its disk, so it loads it and
        every rank takes its weights, optimizer state and RunState, as at the start."""
        if self.rank == 0:
            engine.load_state(folder)
        with watchdog.waiting(trainer.state.step):
            sync_from_rank0(engine, trainer.state, self.group, self.rank)

    def _split(self, trainer, echo) -> Ranks:
        if self.shares is None:
            self.shares = measure_split(trainer.engine, trainer.train_data.pairs, trainer.batch_size,
                                        trainer._pad_id, self.rank, self.layout.world,
                                        self.cfg.compute.split_probe_steps, echo)
        else:
            echo(f"compute.split: {format_split(self.shares)} of every global batch "
                 f"({trainer.batch_size * self.layout.world} pairs per micro-batch over {self.layout.world} ranks)")
        return self.ranks

    # -- faults ---------------------------------------------------------------------------
    def _peer_gone(self, rank: int, why: str, trainer) -> None:
        """From the link watcher: give this rank's own ring error a moment, then stop anyway."""
        self.problem = f"{self.layout.describe(rank)} {why}"

        def stop_if_still_running():
            time.sleep(GRACE_SECONDS)
            if not self._done:
                die(self._message(trainer))

        threading.Thread(target=stop_if_still_running, daemon=True).start()

    def _lost(self, trainer, err: Exception) -> str:
        deadline = time.monotonic() + GRACE_SECONDS
        while self.problem is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return self._message(trainer, err)

    def _message(self, trainer, err: Optional[Exception] = None) -> str:
        what = self.problem or f"the connection to {self._peers()} ({err})"
        return f"lost {what} at step {trainer.state.step + 1}. {self._resume_hint(trainer)}"

    def _peers(self) -> str:
        return " and ".join(self.layout.describe(r) for r in range(self.layout.world) if r != self.rank)

    def _resume_hint(self, trainer) -> str:
        if self.rank != 0:
            return "Rank 0 keeps the checkpoints; restart the run with --resume."
        latest = checkpoint.latest_checkpoint(Path(self.cfg.logging.output_dir))
        if latest is None:
            return "No checkpoint was saved yet; start the run again."
        return f"The last checkpoint ({latest.name}) is intact: continue with --resume."
