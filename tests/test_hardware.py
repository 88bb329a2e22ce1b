"""Runtime preparation happens before MLX loads: env defaults, optimized BLAS, batch table."""
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_dpo import blas_kernels
from mlx_dpo.hardware import OPENBLAS_CANDIDATES, DeviceInfo, table_batch_size

PROBE = ("import os, mlx_dpo, mlx.core as mx; from mlx_dpo.hardware import blas_name; "
         "print(os.environ['MLX_METAL_PREALLOCATE'], os.environ['MLX_METAL_FAST_SYNCH']); print(blas_name()); "
         "print(any('/libopenblas' in l for l in open('/proc/self/maps')) if os.path.exists('/proc/self/maps') else 'n/a')")

HAS_OPENBLAS = sys.platform == "linux" and any(Path(p).exists() for p in OPENBLAS_CANDIDATES)


def run_probe(env_extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLX_METAL", "MLX_DPO"))}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def test_metal_env_defaults_are_set_but_user_values_win():
    assert run_probe({})[0] == "1 1"
    assert run_probe({"MLX_METAL_PREALLOCATE": "0"})[0] == "0 1"


@pytest.mark.skipif(not HAS_OPENBLAS, reason="OpenBLAS is not installed (scripts/setup.sh installs it on Linux)")
def test_linux_uses_openblas_when_installed_and_can_opt_out():
    name, mapped = run_probe({})[1:]
    assert name.startswith("OpenBLAS") and mapped == "True"
    name, mapped = run_probe({"MLX_DPO_BLAS": "bundled"})[1:]
    assert name.startswith("bundled") and mapped == "False"


@pytest.mark.skipif(sys.platform != "linux", reason="MLX_DPO_BLAS binds a library on Linux only")
def test_a_library_other_than_openblas_is_not_called_openblas():
    # any shared library will do for the name: Python's own _ctypes extension stands in for BLIS
    # or MKL, which CI lacks
    import _ctypes

    other = _ctypes.__file__
    name = run_probe({"MLX_DPO_BLAS": other})[1]
    assert name == f"BLAS ({os.path.realpath(other)})"


def test_kernel_choice_follows_the_cpu_flags():
    avx512 = {"avx", "avx2", "fma", "avx512f", "avx512dq", "avx512cd", "avx512bw", "avx512vl"}
    assert blas_kernels.better_kernels("Prescott", avx512) == "SkylakeX"
    assert blas_kernels.better_kernels("Haswell", avx512) == "SkylakeX"
    assert blas_kernels.better_kernels("Cooperlake", avx512) is None
    assert blas_kernels.better_kernels("Nehalem", {"avx", "avx2", "fma"}) == "Haswell"
    assert blas_kernels.better_kernels("Zen", {"avx", "avx2", "fma"}) is None
    assert blas_kernels.better_kernels("Prescott", set()) is None  # flags unknown: leave it


def test_a_fallback_to_generic_kernels_is_overridden_but_a_users_choice_wins(monkeypatch):
    monkeypatch.delenv("OPENBLAS_CORETYPE", raising=False)
    monkeypatch.setattr(blas_kernels.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(blas_kernels, "probe_kernels", lambda library: "Prescott")
    monkeypatch.setattr(blas_kernels, "cpu_flags", lambda: {"avx", "avx2", "fma"})
    assert blas_kernels.choose_coretype("libopenblas.so.0") == "Prescott"
    assert os.environ["OPENBLAS_CORETYPE"] == "Haswell"
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Sandybridge")
    assert blas_kernels.choose_coretype("libopenblas.so.0") is None
    assert os.environ["OPENBLAS_CORETYPE"] == "Sandybridge"


@pytest.mark.skipif(not HAS_OPENBLAS or platform.machine() != "x86_64", reason="needs OpenBLAS on x86-64")
def test_loaded_openblas_runs_kernels_of_the_cpus_instruction_set():
    """On a CPU newer than the installed OpenBLAS (this project's machine: Debian 12's 0.3.21 on
    a family-6 model-207 Xeon) the library alone picks Prescott kernels; mlx-dpo must not."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    code = ("import ctypes, mlx_dpo; from mlx_dpo.hardware import blas_name; print(blas_name()); "
            "f = ctypes.CDLL(None).openblas_get_corename; f.restype = ctypes.c_char_p; print(f().decode())")
    name, kernels = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                   text=True, check=True).stdout.splitlines()
    assert f"kernels {kernels}" in name
    level = blas_kernels.KERNEL_LEVELS.get(kernels.lower(), 0)
    assert level >= blas_kernels.cpu_level(blas_kernels.cpu_flags()), name


def test_batch_table():
    assert table_batch_size(DeviceInfo("metal", "Apple M4 Max", 128)) == 32
    assert table_batch_size(DeviceInfo("metal", "Apple M3 Ultra", 192)) == 4
    assert table_batch_size(DeviceInfo("cpu", "cpu (x86_64)", 24)) == 4


HEAP_PROBE = """
import resource, mlx_dpo, mlx.core as mx
from mlx_dpo.hardware import prepare_runtime
mx.set_cache_limit(0)  # every freed buffer goes back to malloc, as large ones do in training
pages = []
# 20 MiB twice, 64 MiB twice, then 2.25 GiB twice (beyond glibc's largest positive trim threshold)
for size in (5 * 2**20, 5 * 2**20, 16 * 2**20, 16 * 2**20, 576 * 2**20, 576 * 2**20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = mx.ones((size,)); mx.eval(a); del a
    pages.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(prepare_runtime()["malloc"]); print(*pages)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's heap settings are Linux-only")
def test_freed_buffers_stay_in_the_heap_unless_opted_out():
    """A 20 MiB buffer freed and allocated again is not faulted in again (~5120 pages both times
    with glibc's defaults, which unmap it on free), nor is one of 64 MiB, above the largest size
    glibc's defaults ever serve from the heap (32 MiB); a full fine-tune's embedding gradient is
    such a block. Nor is one of 2.25 GiB: a trim threshold of 2 GiB (the largest positive one)
    gave it back, as it gave back what a 4-pair step at 1024 tokens frees."""
    import os

    def run(env_extra):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLX_DPO", "MALLOC_", "GLIBC_TUNABLES"))}
        out = subprocess.run([sys.executable, "-c", HEAP_PROBE], env={**env, **env_extra},
                             capture_output=True, text=True, check=True).stdout.splitlines()
        return out[0], [int(p) for p in out[1].split()]

    setting, (first, again, big, big_again, huge, huge_again) = run({})
    assert setting.startswith("glibc, heap kept") and first > 4000 and again < 0.05 * first
    assert big > 4000 and big_again < 0.05 * big
    assert huge > 500_000 and huge_again < 0.05 * huge
    setting, (first, again, big, big_again, huge, huge_again) = run({"MLX_DPO_MALLOC": "system"})
    assert setting == "system default" and again > 0.5 * first and big_again > 0.5 * big
    assert huge_again > 0.5 * huge
    setting, _ = run({"MALLOC_ARENA_MAX": "2"})
    assert setting == "glibc, user settings"
