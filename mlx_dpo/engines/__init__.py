"""Compute engines: what the trainer asks for (log-probs, a step, state) and how it is done.

`compute.device` picks one: auto tries Metal, then CUDA, then the CPU.
"""
from __future__ import annotations

from ..config import Config
from ..errors import UserError
from ..hardware import DeviceInfo, cuda_device, detect_device


def available_devices() -> list[str]:
    found = []
    if detect_device().kind == "metal":
        found.append("metal")
    if cuda_device() is not None:
        found.append("cuda")
    found.append("cpu")
    return found


def select_device(cfg: Config) -> DeviceInfo:
    wanted = cfg.compute.device
    found = available_devices()
    if wanted == "auto":
        wanted = found[0]
    if wanted not in found:
        hint = (" CUDA needs an NVIDIA driver and PyTorch built for CUDA: pip install 'mlx-dpo[cuda]'."
                if wanted == "cuda" else "")
        raise UserError(f"{cfg.source}: compute.device is {wanted!r} but this machine has no such "
                        f"device; devices found: {', '.join(found)} (or use compute.device: auto).{hint}")
    if wanted == "cuda":
        return cuda_device()
    info = detect_device()
    return info if info.kind == wanted else DeviceInfo("cpu", "cpu", info.memory_gb)


def engine_kind(cfg: Config, device: DeviceInfo) -> str:
    """compute.engine resolved: auto is MLX on Metal and CPU, PyTorch on CUDA."""
    kind = cfg.compute.engine
    if kind == "auto":
        kind = "torch" if device.kind == "cuda" else "mlx"
    if kind == "mlx" and device.kind == "cuda":
        raise UserError(f"{cfg.source}: compute.engine mlx cannot drive a CUDA GPU here; "
                        "use compute.engine: torch (or auto)")
    if kind == "torch" and device.kind == "metal":
        raise UserError(f"{cfg.source}: compute.engine torch runs on CUDA or the CPU, not Metal; "
                        "use compute.engine: mlx (or auto), or compute.device: cpu")
    return kind


def make_engine(cfg: Config, device: DeviceInfo):
    if engine_kind(cfg, device) == "torch":
        from .torch_support import require_torch

        require_torch()
        from .torch_engine import TorchEngine

        return TorchEngine(cfg, device.kind)
    import mlx.core as mx

    from .mlx_engine import MLXEngine

    mx.set_default_device(mx.gpu if device.kind == "metal" else mx.cpu)
    return MLXEngine(cfg, device.kind)
