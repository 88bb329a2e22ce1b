"""`mlx-dpo doctor`: what this machine offers for training, and whether a config can run here.

The system part reports facts (OS, chip, memory, MLX and its default device, the BLAS in use
with a measured matmul rate, CUDA, environment variables). With a config it adds verdicts:
input files, device and engine, model files, a memory estimate, devices for data
parallelism, and the batch size `training.batch_size` resolves to. A verdict of FAIL means
the config cannot run on this machine; the command then exits with code 1.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

from .blas_kernels import cpu_level, cpuinfo_fields
from .hardware import DeviceInfo, blas_name, cuda_device, detect_device, prepare_runtime

# Variables that change how mlx-dpo, MLX, BLAS, PyTorch or the Hub behave.
ENV_PREFIXES = ("MLX_", "MLX_DPO_", "METAL_", "CUDA_", "NCCL_", "PYTORCH_", "HF_", "TRANSFORMERS_", "MALLOC_")
ENV_NAMES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE", "LD_PRELOAD", "WORLD_SIZE", "RANK",
             "LOCAL_RANK", "XDG_CACHE_HOME", "WANDB_MODE", "GLIBC_TUNABLES")
SLOW_BLAS_GFLOPS = 20.0  # MLX's bundled reference BLAS measures ~5 here; OpenBLAS ~100-200


@dataclass
class Finding:
    section: str
    name: str
    value: str
    status: str = "info"  # info, ok, warn or fail


def system_findings(measure: bool = True) -> list[Finding]:
    import mlx.core as mx

    device = detect_device()
    out = [Finding("system", "os", f"{platform.platform()} (Python {platform.python_version()})"),
           Finding("system", "chip", _chip_line(device)),
           Finding("system", "memory", f"{device.memory_gb:.1f} GB"
                   + (" (unified)" if device.kind == "metal" else "")),
           Finding("mlx", "version", f"mlx {mx.__version__}, mlx-lm {_version('mlx-lm')}"),
           Finding("mlx", "default device", f"{mx.default_device()} (Metal "
                   f"{'available' if device.kind == 'metal' else 'not available'})")]
    out.append(Finding("mlx", "memory allocator", prepare_runtime()["malloc"]))
    out.append(_native_finding())
    out.append(_blas_finding(measure))
    if measure and device.kind == "metal":
        out.append(Finding("blas", "Metal matmul", f"{measure_gflops(mx.gpu):.0f} GFLOP/s (1024^3 float32)"))
    out += cuda_findings()
    out += [Finding("env", k, v) for k, v in sorted(relevant_env().items())] or \
        [Finding("env", "(none)", "no relevant variables set")]
    return out


def _native_finding() -> Finding:
    """mlx-dpo's C++ CPU kernels (native.py): built (ok), switched off or not for this OS (info),
    or failed to build (warn: those layers then run on MLX ops, slower)."""
    from . import native

    if native.kernels() is not None:
        status = "ok"
    else:
        status = "warn" if native.status().startswith("unavailable") else "info"
    return Finding("mlx", "C++ kernels", native.status(), status)


def _chip_line(device: DeviceInfo) -> str:
    if device.kind == "metal":
        return f"{device.name} (Apple GPU, Metal)"
    return f"{cpu_identity()} ({os.cpu_count()} cores, {platform.machine()})"


# blas_kernels.cpu_level's levels, as the doctor names them.
VECTOR_NAMES = {3: "AVX-512", 2: "AVX2", 1: "AVX"}


def cpu_identity(cpuinfo: str | None = None) -> str:
    """The CPU's name, with what tells apart machines that a virtual machine names alike (a cloud's
    "AMD EPYC" has been Zen 3 without AVX-512 and Zen 4 with it, and the C++ kernels' speed
    follows): its family and model and its widest vector registers, from /proc/cpuinfo (or the
    given text). Elsewhere, the name alone."""
    fields = cpuinfo_fields(cpuinfo)
    if "model name" not in fields:
        return "unknown CPU" if fields else _cpu_name_without_cpuinfo()
    parts = [fields["model name"]]
    if "cpu family" in fields and "model" in fields:
        parts.append(f"family {fields['cpu family']} model {fields['model']}")
    vectors = VECTOR_NAMES.get(cpu_level(set(fields.get("flags", "").split())))
    if vectors:
        parts.append(vectors)
    return ", ".join(parts)


def _cpu_name_without_cpuinfo() -> str:
    """macOS's brand string; elsewhere whatever the platform module knows."""
    if sys.platform == "darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                  text=True, timeout=5).stdout.strip() or "unknown CPU"
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or "unknown CPU"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def measure_gflops(device=None, n: int = 1024, repeats: int = 5) -> float:
    """Best-of-`repeats` rate of an n^3 float32 matmul on an MLX device (default: the CPU)."""
    import mlx.core as mx

    device = device or mx.cpu
    a = mx.random.normal((n, n), stream=device)
    b = mx.random.normal((n, n), stream=device)
    mx.eval(mx.matmul(a, b, stream=device))  # warm-up: first-call setup is not the BLAS
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(mx.matmul(a, b, stream=device))
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def _blas_finding(measure: bool) -> Finding:
    name = blas_name()
    if not measure:
        return Finding("blas", "in use", name)
    rate = measure_gflops()
    slow = rate < SLOW_BLAS_GFLOPS and sys.platform != "darwin"
    hint = " - slow: install OpenBLAS (apt-get install libopenblas0-pthread)" if slow else ""
    return Finding("blas", "in use", f"{name}: {rate:.1f} GFLOP/s (1024^3 float32 on the CPU){hint}",
                   "warn" if slow else "ok")


def cuda_findings() -> list[Finding]:
    if importlib.util.find_spec("torch") is None:
        return [Finding("cuda", "PyTorch", "not installed (the CUDA engine needs pip install 'mlx-dpo[cuda]')")]
    gpu = cuda_device()
    import torch

    out = [Finding("cuda", "PyTorch", f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'none'}), "
                                      f"transformers {_version('transformers')}")]
    if gpu is None:
        return out + [Finding("cuda", "available", "no (no NVIDIA driver, or a CPU-only PyTorch)")]
    count = torch.cuda.device_count()
    out.append(Finding("cuda", "available", f"yes: {count} device(s)"))
    for i in range(count):
        props = torch.cuda.get_device_properties(i)
        out.append(Finding("cuda", f"cuda:{i}", f"{props.name}, {props.total_memory / 2**30:.1f} GB"))
    return out


def relevant_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if k.startswith(ENV_PREFIXES) or k in ENV_NAMES}


def exit_code(findings: list[Finding]) -> int:
    return 1 if any(f.status == "fail" for f in findings) else 0


def format_findings(findings: list[Finding]) -> list[str]:
    titles = {"system": "System", "mlx": "MLX", "blas": "BLAS", "cuda": "CUDA", "env": "Environment",
              "config": "Config"}
    lines, section = [], None
    for f in findings:
        if f.section != section:
            section = f.section
            lines.append(f"{titles.get(section, section)}:")
        mark = {"ok": "ok", "warn": "WARN", "fail": "FAIL"}.get(f.status, "")
        lines.append(f"  {f.name:<21} {f.value}" + (f"  [{mark}]" if mark else ""))
    failed = [f for f in findings if f.status == "fail"]
    if any(f.section == "config" for f in findings):
        lines.append("verdict: " + ("this config cannot run here: " + "; ".join(f.name for f in failed)
                                    if failed else "this config can run here"))
    return lines


def as_json(findings: list[Finding]) -> list[dict]:
    return [asdict(f) for f in findings]
