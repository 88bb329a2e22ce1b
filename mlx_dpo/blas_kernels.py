"""OpenBLAS's kernel choice on x86-64: keep it from falling back to generic code on a new CPU.

OpenBLAS as distributions ship it (built with DYNAMIC_ARCH) picks its kernels when it loads,
from the CPU's family and model numbers. A release older than the CPU does not know its model
and falls back to "Prescott", plain SSE3 kernels. Debian 12's OpenBLAS 0.3.21 does so on a Xeon
of family 6, model 207: MLX's fp32 2048^3 matmul then ran at 56-64 GFLOP/s on 2 cores, against
229-285 with the AVX-512 kernels the same library ships (docs/benchmarks.md).

OpenBLAS reads OPENBLAS_CORETYPE as it loads, so `choose_coretype` runs before mlx-dpo loads it:
a child process loads the library and reports the kernels it picked (~30 ms); when they are of
an older instruction set than the CPU's flags allow, OPENBLAS_CORETYPE is set to the best kernel
set the CPU runs. A user's own OPENBLAS_CORETYPE always wins.
"""
from __future__ import annotations

import ctypes
import os
import platform
import subprocess
import sys
from typing import Optional

# OpenBLAS's x86-64 kernel sets by the instruction set they need: 3 AVX-512, 2 AVX2 with FMA,
# 1 AVX; any other name (Prescott, Core2, Nehalem, Atom, ...) counts as 0.
KERNEL_LEVELS = {
    "skylakex": 3, "cooperlake": 3, "sapphirerapids": 3,
    "haswell": 2, "zen": 2,
    "sandybridge": 1, "bulldozer": 1, "piledriver": 1, "steamroller": 1, "excavator": 1,
}
# The kernel set to ask for at each level; the AVX-512 one is in every release since 0.3.0.
KERNELS_FOR_LEVEL = {3: "SkylakeX", 2: "Haswell", 1: "Sandybridge"}
AVX512_FLAGS = {"avx512f", "avx512dq", "avx512cd", "avx512bw", "avx512vl"}

_PROBE = ("import ctypes, sys; f = ctypes.CDLL(sys.argv[1]).openblas_get_corename; "
          "f.restype = ctypes.c_char_p; print(f().decode())")


def cpu_level(flags: set[str]) -> int:
    """The highest kernel level (see KERNEL_LEVELS) these /proc/cpuinfo flags can run."""
    if AVX512_FLAGS <= flags:
        return 3
    if {"avx2", "fma"} <= flags:
        return 2
    return 1 if "avx" in flags else 0


def cpu_flags() -> set[str]:
    """The first CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    return set(cpuinfo_fields().get("flags", "").split())


def cpuinfo_fields(cpuinfo: Optional[str] = None) -> dict[str, str]:
    """The first processor's "name : value" lines of /proc/cpuinfo (or of the given text), names
    in lower case; empty where there is no /proc/cpuinfo."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as info:
                cpuinfo = info.read()
        except OSError:
            return {}
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            break
        name, _, value = line.partition(":")
        fields.setdefault(name.strip().lower(), value.strip())
    return fields


def probe_kernels(library: str) -> Optional[str]:
    """The kernel set `library` picks on its own, asked in a child process (None if unknown)."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}  # no thread pool for a probe
    env.pop("OPENBLAS_CORETYPE", None)
    try:
        out = subprocess.run([sys.executable, "-S", "-c", _PROBE, library], env=env,
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    name = out.stdout.strip()
    return name if out.returncode == 0 and name else None


def better_kernels(picked: str, flags: set[str]) -> Optional[str]:
    """The kernel set to ask for instead of `picked`, or None when `picked` is already the best
    instruction set the CPU runs (or the CPU's flags are unknown)."""
    level = cpu_level(flags)
    return KERNELS_FOR_LEVEL[level] if level > KERNEL_LEVELS.get(picked.lower(), 0) else None


def choose_coretype(library: str) -> Optional[str]:
    """Before `library` (an OpenBLAS) is loaded: set OPENBLAS_CORETYPE when it would pick
    kernels below the CPU's instruction set. Returns the kernel set it would have picked when
    it set one, else None."""
    if os.environ.get("OPENBLAS_CORETYPE") or platform.machine() not in ("x86_64", "AMD64"):
        return None
    picked = probe_kernels(library)
    wanted = better_kernels(picked, cpu_flags()) if picked else None
    if wanted is None:
        return None
    os.environ["OPENBLAS_CORETYPE"] = wanted
    return picked


def loaded_kernels(library: ctypes.CDLL) -> Optional[str]:
    """The kernel set a loaded OpenBLAS runs (None for a BLAS that does not say)."""
    try:
        name = library.openblas_get_corename
    except AttributeError:
        return None
    name.restype = ctypes.c_char_p
    return name().decode()
