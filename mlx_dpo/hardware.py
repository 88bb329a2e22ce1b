"""Runtime environment and hardware facts: env vars, BLAS choice, chip detection, batch table.

`prepare_runtime()` must run before the first `import mlx`: MLX reads its Metal env vars at
start-up, and the BLAS symbols it links are bound when libmlx is loaded. The package's
`__init__` calls it, so importing `mlx_dpo` first is enough.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import blas_kernels

# Metal allocator settings the workflow asks for; a user's own value always wins.
METAL_ENV_DEFAULTS = {"MLX_METAL_PREALLOCATE": "1", "MLX_METAL_FAST_SYNCH": "1"}
# MLX's evaluator orders a graph breadth-first in windows of this many arrays (default 20). With
# the default, the parts of a batch on different CPU streams (engines/cpu_streams.py) are queued
# one after the other and barely overlap: a LoRA step of SmolLM2-135M measured 9.5 s at 20 and
# 4.1 s at 2000 (5.5 s on one stream), peak memory 2.5 GB either way.
CPU_ENV_DEFAULTS = {"MLX_BFS_MAX_WIDTH": "2000"}
# MLX keeps freed buffers for reuse only up to its cache limit, 32 MiB by default on the CPU;
# larger ones go back to the OS, and each step page-faults its big arrays in again. With
# MLX_DPO_CPU_CACHE_FRACTION=F (0 < F < 1), up to F of RAM is allowed until the first training
# step has run; from then on the limit follows the largest step's working set (`fit_cpu_cache`):
# MLX reuses a cached buffer only for a request of nearly its size, so a larger cache would fill
# with buffers of other shapes and count as resident memory for nothing. It paid when a step
# wrote a (tokens x vocabulary) logits array (27,000 faults, ~67 ms, for one of 112 MB); since
# the head runs in vocabulary chunks (head_logps.py) the bench's LoRA step takes the same time
# with MLX's default (3.91 against 3.89 s, 3.96 against 4.20 s in two bench runs; `mlx-cache`
# row) at 0.11-0.14 GB less resident memory, so MLX's default is the default (F = 0). What the
# sized cache still bought at 1024 tokens (~8%) went with glibc's trimming (_keep_freed_heap):
# 12.87-13.80 s with F = 0.25 against 13.23-14.29 s without, for 0.5 GB more peak RSS
# (docs/benchmarks.md).
CPU_CACHE_FRACTION = float(os.environ.get("MLX_DPO_CPU_CACHE_FRACTION", "0"))

# Where Debian/Ubuntu/Fedora put an optimized BLAS exporting the CBLAS symbols MLX calls.
OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/local/lib/libopenblas.so.0",
)

# Per-device micro-batch sizes (pairs) for `training.batch_size: auto`. The two Apple values
# come from the workflow's checklist; the others are conservative starting points for a
# ~1B-parameter LoRA run at 1.5k tokens, documented in docs/config.md.
BATCH_TABLE = {
    "Apple M4 Max": 32,
    "Apple M3 Ultra": 4,
    "Apple M4 Pro": 16,
    "Apple M3 Max": 16,
    "Apple M2 Ultra": 8,
    "Apple M2 Max": 8,
    "Apple M1 Max": 4,
    "Apple M1 Ultra": 4,
    "cpu": 4,
}
DEFAULT_BATCH = 4

_runtime: dict = {}


def prepare_runtime() -> dict:
    """Set Metal env defaults and, on Linux, bind MLX to an optimized BLAS. Idempotent."""
    if _runtime:
        return _runtime
    for key, value in METAL_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if sys.platform != "darwin":
        for key, value in CPU_ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
    _runtime["blas"] = _preload_blas()
    _runtime["malloc"] = _keep_freed_heap()
    return _runtime


def _preload_blas() -> str:
    """MLX's Linux CPU wheel bundles the reference BLAS (~5 GFLOP/s on a 1024^3 sgemm here).
    Loading OpenBLAS with RTLD_GLOBAL before libmlx makes `cblas_sgemm` resolve to it
    (~180 GFLOP/s measured), with kernels for the CPU's instruction set (blas_kernels.py).
    macOS uses Accelerate and needs nothing."""
    if sys.platform == "darwin":
        return "Accelerate"
    if os.environ.get("MLX_DPO_BLAS") == "bundled":
        return "bundled reference BLAS (MLX_DPO_BLAS=bundled)"
    if "mlx.core" in sys.modules:
        return "unknown (mlx was imported before mlx_dpo)"
    custom = os.environ.get("MLX_DPO_BLAS")
    for path in ([custom] if custom else []) + list(OPENBLAS_CANDIDATES):
        if path and Path(path).exists():
            replaced = blas_kernels.choose_coretype(path)
            try:
                library = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            kernels = blas_kernels.loaded_kernels(library)
            detail = f", kernels {kernels}" if kernels else ""
            if replaced:
                detail += f" (set by mlx-dpo: on its own OpenBLAS picks {replaced} on this CPU)"
            name = "OpenBLAS" if hasattr(library, "openblas_get_config") else "BLAS"  # MLX_DPO_BLAS may name another
            return f"{name} ({os.path.realpath(path)}{detail})"
    return "bundled reference BLAS (slow: install libopenblas0-pthread)"


# mallopt(3)'s parameters, as glibc's malloc.h numbers them; a trim threshold of -1 never trims.
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
NEVER_TRIM = -1


def glibc_mallopt():
    """glibc's `mallopt(param, value)` through ctypes (nonzero on success), or None on another C library."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return mallopt


def _keep_freed_heap() -> str:
    """On glibc, keep freed memory in the heap for the next step's arrays instead of giving it back.

    Arrays too large for MLX's own CPU cache (32 MiB in all by default) are freed to malloc; glibc
    gives each large freed block back to the kernel (unmapped, or trimmed from the heap's top), so
    the next step faults its pages in again, zero-filled: at 1024 tokens a LoRA step of
    SmolLM2-135M took ~150,000 page faults and 1.5 s of system time. Every block now comes from the
    heap, and is reused at any size: glibc's mmap for blocks of 32 MiB and more is off, which full
    fine-tuning needs (its tied embedding's gradient, 113 MB per CPU stream, took ~55,000 faults a
    step; session 16's A/B in docs/benchmarks.md). The heap is never trimmed (M_TRIM_THRESHOLD -1,
    mallopt(3)): a 2 GiB threshold, the largest positive value, still gave back the ~4 GB that a
    4-pair step at 1024 tokens frees when a shorter batch comes between two long ones, and the next
    long step faulted 1.1 million pages in again (~7% of its time; docs/benchmarks.md, session 23).
    The peak RSS is unchanged (see docs/benchmarks.md): a freed block is reused, not kept beside a
    new one; the resident size between steps stays at the peak. A user's own MALLOC_* or
    GLIBC_TUNABLES settings win; MLX_DPO_MALLOC=system leaves glibc's defaults (setting any MALLOC_*
    threshold would not: it switches glibc's sliding thresholds off); other C libraries are left
    alone. Should the heap be unable to grow, glibc still maps."""
    if not sys.platform.startswith("linux") or os.environ.get("MLX_DPO_MALLOC") == "system":
        return "system default"
    if "GLIBC_TUNABLES" in os.environ or any(key.startswith("MALLOC_") for key in os.environ):
        return "glibc, user settings"
    mallopt = glibc_mallopt()
    if mallopt is None:
        return "not glibc: default"
    if not (mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, NEVER_TRIM)):
        return "glibc default (mallopt refused)"
    return "glibc, heap kept, no block mapped apart"


@contextlib.contextmanager
def openblas_threads(count: int):
    """OpenBLAS's thread count set to `count` for the block; nothing happens without OpenBLAS.

    Used where the caller already runs several threads that each call BLAS (MLX's CPU streams,
    PyTorch's OpenMP pool): OpenBLAS's own pool would otherwise fight them for the cores.
    """
    try:
        lib = ctypes.CDLL(None)
        get, set_ = lib.openblas_get_num_threads, lib.openblas_set_num_threads
    except (AttributeError, OSError):
        yield
        return
    before = get()
    set_(count)
    try:
        yield
    finally:
        set_(before)


def cpu_cache_ceiling() -> int:
    """The most MLX's CPU buffer cache may hold, in bytes: CPU_CACHE_FRACTION of RAM."""
    return int(_system_memory_gb() * CPU_CACHE_FRACTION * 2**30)


# The ceiling keep_cpu_buffers raised MLX's cache limit to (None: it raised nothing, so
# fit_cpu_cache leaves the limit to whoever set it).
_raised_cache_limit: Optional[int] = None


def keep_cpu_buffers() -> None:
    """On the CPU, let MLX's buffer cache hold a step's arrays (see CPU_CACHE_FRACTION)."""
    import mlx.core as mx

    global _raised_cache_limit
    if mx.default_device() != mx.cpu or not CPU_CACHE_FRACTION:  # 0: MLX's own limit, untouched
        return
    wanted = cpu_cache_ceiling()
    previous = mx.set_cache_limit(wanted)
    if previous > wanted:  # never lower a limit someone already raised
        mx.set_cache_limit(previous)
    else:
        _raised_cache_limit = wanted


def fit_cpu_cache(margin: float = 1.25) -> None:
    """After a training step on the CPU: cap MLX's buffer cache at the largest working set a step
    has had so far (MLX's peak memory minus what stays alive between steps) times `margin`, never
    below MLX's default. The next step of a similar shape finds its buffers cached; a larger
    batch raises the cap; buffers beyond it go back to the OS instead of staying resident."""
    import mlx.core as mx

    if _raised_cache_limit and mx.default_device() == mx.cpu:
        working = mx.get_peak_memory() - mx.get_active_memory()
        mx.set_cache_limit(min(_raised_cache_limit, max(int(working * margin), 32 * 2**20)))


def cache_root() -> Path:
    """Where mlx-dpo keeps caches (batch sizes, reference log-probs): $MLX_DPO_CACHE_DIR,
    else $XDG_CACHE_HOME/mlx-dpo, else ~/.cache/mlx-dpo."""
    root = os.environ.get("MLX_DPO_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlx-dpo"


def blas_name() -> str:
    return prepare_runtime()["blas"]


@dataclass(frozen=True)
class DeviceInfo:
    kind: str  # "metal", "cuda" or "cpu"
    name: str  # e.g. "Apple M4 Max", "NVIDIA H100", "cpu (x86_64)"
    memory_gb: float


def metal_available() -> bool:
    import mlx.core as mx

    return bool(getattr(mx, "metal", None)) and mx.metal.is_available()


def detect_device() -> DeviceInfo:
    """The MLX device this process trains on: the Apple GPU when Metal is there, else the CPU."""
    import mlx.core as mx

    if metal_available():
        info = mx.device_info()
        name = str(info.get("device_name") or _apple_chip_name())
        return DeviceInfo("metal", name, info.get("memory_size", 0) / 2**30)
    return DeviceInfo("cpu", f"cpu ({platform.machine()})", _system_memory_gb())


def cuda_device() -> "DeviceInfo | None":
    """The first CUDA GPU PyTorch can use (e.g. "NVIDIA H100 80GB HBM3"), or None.

    torch is imported only when an NVIDIA driver is present: importing it costs seconds,
    and a CPU-only or missing torch means no CUDA anyway."""
    import importlib.util
    import shutil

    if not (Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi")):
        return None
    if importlib.util.find_spec("torch") is None:
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return DeviceInfo("cuda", props.name, props.total_memory / 2**30)


def _apple_chip_name() -> str:
    import subprocess

    try:
        out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"],
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "Apple Silicon"
    except (OSError, subprocess.SubprocessError):
        return "Apple Silicon"


def _system_memory_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return 0.0


def table_batch_size(device: DeviceInfo) -> int:
    """The batch size for `training.batch_size: auto` from the per-chip table."""
    if device.kind == "cpu":
        return BATCH_TABLE["cpu"]
    for chip, size in BATCH_TABLE.items():
        if device.name.startswith(chip):
            return size
    return DEFAULT_BATCH
