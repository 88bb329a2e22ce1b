"""Compute engines: what the trainer asks for (log-probs, a step, state) and how it is done.

`compute.device` picks one: auto tries Metal, then CUDA, then the CPU.
"""
from __future__ import annotations

from ..config import Config
from ..errors import UserError
from ..hardware import DeviceInfo, detect_device


def available_devices() -> list[str]:
    found = []
    if detect_device().kind == "metal":
        found.append("metal")
    found.append("cpu")
    return found


def select_device(cfg: Config) -> DeviceInfo:
    wanted = cfg.compute.device
    found = available_devices()
    if wanted == "auto":
        wanted = found[0]
    if wanted not in found:
        raise UserError(f"{cfg.source}: compute.device is {wanted!r} but this machine has no such "
                        f"device; devices found: {', '.join(found)} (or use compute.device: auto)")
    info = detect_device()
    return info if info.kind == wanted else DeviceInfo("cpu", "cpu", info.memory_gb)


def make_engine(cfg: Config, device: DeviceInfo):
    import mlx.core as mx

    from .mlx_engine import MLXEngine

    mx.set_default_device(mx.gpu if device.kind == "metal" else mx.cpu)
    return MLXEngine(cfg, device.kind)
