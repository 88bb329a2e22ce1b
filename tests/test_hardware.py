"""Runtime preparation happens before MLX loads: env defaults, optimized BLAS, batch table."""
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_dpo.hardware import OPENBLAS_CANDIDATES, DeviceInfo, table_batch_size

PROBE = ("import os, mlx_dpo, mlx.core as mx; from mlx_dpo.hardware import blas_name; "
         "print(os.environ['MLX_METAL_PREALLOCATE'], os.environ['MLX_METAL_FAST_SYNCH']); print(blas_name()); "
         "print(any('/libopenblas' in l for l in open('/proc/self/maps')) if os.path.exists('/proc/self/maps') else 'n/a')")


def run_probe(env_extra):
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLX_METAL", "MLX_DPO"))}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def test_metal_env_defaults_are_set_but_user_values_win():
    assert run_probe({})[0] == "1 1"
    assert run_probe({"MLX_METAL_PREALLOCATE": "0"})[0] == "0 1"


@pytest.mark.skipif(sys.platform != "linux" or not any(Path(p).exists() for p in OPENBLAS_CANDIDATES),
                    reason="OpenBLAS is not installed (scripts/setup.sh installs it on Linux)")
def test_linux_uses_openblas_when_installed_and_can_opt_out():
    name, mapped = run_probe({})[1:]
    assert name.startswith("OpenBLAS") and mapped == "True"
    name, mapped = run_probe({"MLX_DPO_BLAS": "bundled"})[1:]
    assert name.startswith("bundled") and mapped == "False"


def test_batch_table():
    assert table_batch_size(DeviceInfo("metal", "Apple M4 Max", 128)) == 32
    assert table_batch_size(DeviceInfo("metal", "Apple M3 Ultra", 192)) == 4
    assert table_batch_size(DeviceInfo("cpu", "cpu (x86_64)", 24)) == 4


HEAP_PROBE = """
import resource, mlx_dpo, mlx.core as mx
from mlx_dpo.hardware import prepare_runtime
mx.set_cache_limit(0)  # every freed buffer goes back to malloc, as large ones do in training
pages = []
for _ in range(2):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = mx.ones((5 * 2**20,)); mx.eval(a); del a  # 20 MiB
    pages.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(prepare_runtime()["malloc"]); print(*pages)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's heap settings are Linux-only")
def test_freed_buffers_stay_in_the_heap_unless_opted_out():
    """A 20 MiB buffer freed and allocated again is not faulted in again (~5120 pages both times
    with glibc's defaults, which unmap it on free)."""
    import os

    def run(env_extra):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLX_DPO", "MALLOC_", "GLIBC_TUNABLES"))}
        out = subprocess.run([sys.executable, "-c", HEAP_PROBE], env={**env, **env_extra},
                             capture_output=True, text=True, check=True).stdout.splitlines()
        return out[0], [int(p) for p in out[1].split()]

    setting, (first, again) = run({})
    assert setting.startswith("glibc, heap kept") and first > 4000 and again < 0.05 * first
    setting, (first, again) = run({"MLX_DPO_MALLOC": "system"})
    assert setting == "system default" and again > 0.5 * first
    setting, _ = run({"MALLOC_ARENA_MAX": "2"})
    assert setting == "glibc, user settings"
