"""mlx-dpo's C++ CPU kernels: built on first use against the installed MLX, cached, optional.

MLX offers no way to write a CPU kernel from Python, and its CPU backend runs each op as one pass
over memory: a softmax is five (select, maximum, subtraction, exp, sum), RMSNorm, SwiGLU and RoPE
several each, and attention's products go to OpenBLAS as small matrices whose packing costs as
much as their arithmetic. The files in `csrc/` are MLX primitives that do these in one pass or
one fused loop: causal and shared-prompt attention forward and backward (causal_attention.cpp,
cpu_attention.py calls it), the causal row softmax (attention_softmax.cpp: other head sizes and
the LM head's chunks), RMSNorm, SwiGLU and RoPE (layer_kernels.cpp, through cpu_layers.py), LoRA's
rank-r branch (lora_kernels.cpp, through cpu_lora.py), its frozen products on weights packed once
(frozen_gemm.cpp, with compute.frozen_panels) and AdamW's step (optimizer_kernels.cpp, engines/mlx_fast.py). Together they took the bench's LoRA
step from 3.1-3.3 to 2.3-2.5 s (docs/benchmarks.md, session 11).

Like MLX's own CPU `mx.compile`, which runs `g++` on generated source, this module compiles them
on this machine the first time they are needed (~21 s here; the setup script does it ahead),
with `-march=native`, against the MLX that is installed, through nanobind's sources in MLX's
nanobind domain (`mlx`) so that the kernels take and return `mx.array`s. The shared library is a
per-machine artefact, cached in `native_dir()` (not with the run caches of $MLX_DPO_CACHE_DIR),
keyed by the sources, MLX's and nanobind's versions, the flags and Python's ABI; concurrent
builds (two ranks) take a file lock. A new build removes the others that no process has loaded
for STALE_AFTER_DAYS (earlier versions of mlx-dpo, virtualenvs since deleted).

Everything degrades: no compiler, no nanobind, a failed build or a module whose arrays MLX does
not recognise (a nanobind ABI change) leaves `kernels()` None and every caller on MLX ops, as
`MLX_DPO_NATIVE=0` does on purpose. `status()` says which, for `mlx-dpo doctor`.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import platform
import shlex
import shutil
import string
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from types import ModuleType
from typing import Optional


CSRC = Path(__file__).resolve().parent / "csrc"
MODULE = "_native"
# -ffp-contract=off: no fused multiply-adds, so that the exp's rounding trick stays exact.
# -fno-math-errno: sqrt vectorises (errno is never read; results are IEEE sqrt either way).
# -fno-trapping-math: the loops' selects (the exp's clamp, sigmoid's sign, the masks) become blends;
# GCC otherwise keeps a float comparison as a branch, in case it traps, and without AVX-512's masks
# leaves those loops scalar (SwiGLU ran ~10x slower on an AVX2 machine). Nothing reads the FP flags.
# -fopenmp-simd: the row loops' max and sum reductions vectorise without -ffast-math.
FLAGS = ["-std=c++20", "-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math",
         "-fopenmp-simd", "-fPIC", "-shared",
         "-fvisibility=hidden", "-fno-strict-aliasing", "-DNDEBUG", "-DNB_COMPACT_ASSERTIONS", "-DNB_DOMAIN=mlx"]
# On x86, GCC vectorises loops 256 bits wide even where -march=native has AVX-512; the full width
# took the attention's forward and backward from 88 to 94-98 GFLOP/s at 1024 tokens (exp and masks in
# the row loops; docs/benchmarks.md, session 12).
X86_FLAGS = ["-mprefer-vector-width=512"]

FALLBACK = "attention, norms, SwiGLU, RoPE, LoRA's branch and AdamW run on MLX ops (slower)"
# Each source version, MLX and virtualenv gets its own build (~0.6 MB); when a new one is made, the
# others that no process has loaded for this long are removed.
STALE_AFTER_DAYS = 30

_state: dict = {}


def kernels() -> Optional[ModuleType]:
    """The compiled module, building it if needed; None when it cannot be had (see `status`)."""
    if "module" not in _state:
        _state["module"], _state["status"] = _load()
    return _state["module"]


def status() -> str:
    kernels()
    return _state["status"]


def _load() -> tuple[Optional[ModuleType], str]:
    if os.environ.get("MLX_DPO_NATIVE", "1") == "0":
        return None, f"off (MLX_DPO_NATIVE=0): {FALLBACK}"
    if sys.platform != "linux":
        return None, "not built (Linux only: on macOS training runs on Metal)"
    try:
        path = build()
        module = _import(path)
        _check(module)
    except Exception as exc:  # any failure leaves the MLX-op kernels in place
        return None, f"unavailable ({exc}); {FALLBACK}"
    core = module.frozen_kernels()
    panels = (f"frozen panels on OpenBLAS's {core} micro-kernel" if core
              else "no frozen panels (OpenBLAS's micro-kernel not found)")
    return module, (f"built: attention, RMSNorm, SwiGLU, RoPE, the head's softmax, LoRA, AdamW; "
                    f"register tiles in {module.vector_tiles}; {panels} ({path})")


def build(quiet: bool = False) -> Path:
    """Compile the module unless a build for this source and these versions is cached; its path."""
    import mlx.core as mx

    nanobind_dir = _nanobind_dir()
    compiler = _compiler()
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    mlx_dir = Path(mx.__file__).resolve().parent  # the library links to this MLX by its path
    flags = _flags()
    key = hashlib.sha256("\n".join([
        *(path.read_text() for path in _sources(headers=True)), mx.__version__, str(mlx_dir), str(nanobind_dir),
        _nanobind_version(), suffix, " ".join(flags), compiler,
    ]).encode()).hexdigest()[:16]
    out_dir = native_dir() / key
    target = out_dir / f"{MODULE}{suffix}"
    if target.exists():
        _mark_used(out_dir)
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    with _locked(out_dir / ".lock"):
        if target.exists():  # another process built it while we waited
            _mark_used(out_dir)
            return target
        if not quiet:
            print("mlx-dpo: compiling its C++ CPU kernels for this machine (once, ~10-30 s)...", file=sys.stderr, flush=True)
        partial = out_dir / f"{MODULE}.partial{suffix}"
        command = [*compile_command([nanobind_dir / "src" / "nb_combined.cpp", *_sources()], partial),
                   f"-L{mlx_dir / 'lib'}", "-lmlx", f"-Wl,-rpath,{mlx_dir / 'lib'}"]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            log = out_dir / "build.log"
            log.write_text(" ".join(command) + "\n\n" + done.stdout + done.stderr)
            raise RuntimeError(f"the C++ build failed; its log: {log}")
        partial.replace(target)  # atomic: other processes see the whole library or none
        _mark_used(out_dir)
    _prune_stale_builds(out_dir.parent, keep=out_dir)
    return target


def _mark_used(build_dir: Path) -> None:
    """Its `used` file's time says when a process last loaded this build (a read-only cache: no record)."""
    with contextlib.suppress(OSError):
        (build_dir / "used").touch()


def _prune_stale_builds(root: Path, keep: Path) -> None:
    """Remove the builds under `root` (other than `keep`) not loaded for STALE_AFTER_DAYS. Only folders
    that are builds of this module are touched ($MLX_DPO_NATIVE_DIR may hold other things); a build
    from before the `used` file counts from its folder's time."""
    cutoff = time.time() - STALE_AFTER_DAYS * 86400
    with contextlib.suppress(OSError):
        for build_dir in root.iterdir():
            name = build_dir.name
            is_build = (len(name) == 16 and all(c in string.hexdigits for c in name) and build_dir.is_dir()
                        and (build_dir / ".lock").exists())
            if not is_build or build_dir == keep:
                continue
            marker = build_dir / "used" if (build_dir / "used").exists() else build_dir
            with contextlib.suppress(OSError):
                if marker.stat().st_mtime < cutoff:
                    shutil.rmtree(build_dir)


def compile_command(sources: list[Path], output: Path, flags: Optional[list[str]] = None) -> list[str]:
    """The compiler's command line for `sources` with the module's include paths and flags (by
    default _flags(); tests pass `-c` and report options to see what the compiler made of a file)."""
    import mlx.core as mx

    nanobind_dir = _nanobind_dir()
    mlx_dir = Path(mx.__file__).resolve().parent
    return [_compiler(), *(_flags() if flags is None else flags),
            f"-I{nanobind_dir / 'include'}", f"-I{nanobind_dir / 'ext' / 'robin_map' / 'include'}",
            f"-I{sysconfig.get_paths()['include']}", f"-I{mlx_dir / 'include'}",
            *map(str, sources), "-o", str(output)]


def _compiler() -> str:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not compiler:
        raise RuntimeError("no C++ compiler (g++) on PATH")
    return compiler


def _flags() -> list[str]:
    """FLAGS, then $MLX_DPO_NATIVE_CXXFLAGS (e.g. -mno-avx512f: the plain C++ tiles instead of AVX-512)."""
    arch = X86_FLAGS if platform.machine().lower() in ("x86_64", "amd64") else []
    return FLAGS + arch + shlex.split(os.environ.get("MLX_DPO_NATIVE_CXXFLAGS", ""))


def _sources(headers: bool = False) -> list[Path]:
    """The C++ files built into the module (and, for the cache key, the headers they include)."""
    return sorted(CSRC.glob("*.cpp")) + (sorted(CSRC.glob("*.h")) if headers else [])


def native_dir() -> Path:
    """$MLX_DPO_NATIVE_DIR, else $XDG_CACHE_HOME/mlx-dpo/native, else ~/.cache/mlx-dpo/native."""
    root = os.environ.get("MLX_DPO_NATIVE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlx-dpo" / "native"


def _nanobind_dir() -> Path:
    try:
        import nanobind
    except ImportError as exc:
        raise RuntimeError("nanobind is not installed (pip install nanobind)") from exc
    return Path(nanobind.__file__).resolve().parent


def _nanobind_version() -> str:
    import nanobind

    return getattr(nanobind, "__version__", "?")


def _import(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(MODULE, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check(module: ModuleType) -> None:
    """One tiny call: a nanobind that MLX does not share its types with fails here, not in a step."""
    import mlx.core as mx

    try:
        with mx.stream(mx.cpu):
            weights, _, total = module.causal_softmax(mx.zeros((1, 1, 2, 2)), mx.zeros((1,), dtype=mx.int32), 0)
            mx.eval(weights, total)
    except TypeError as exc:
        raise RuntimeError("its arrays are not MLX's (nanobind version mismatch with MLX's)") from exc
    if total.tolist() != [[[[1.0], [2.0]]]]:
        raise RuntimeError(f"self-check failed: row sums {total.tolist()}")


@contextlib.contextmanager
def _locked(path: Path):
    import fcntl

    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


if __name__ == "__main__":  # python -m mlx_dpo.native: build ahead (the setup script does)
    print(status())
    sys.exit(0 if kernels() is not None else 1)
