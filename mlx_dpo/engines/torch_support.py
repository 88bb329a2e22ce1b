"""Whether the optional PyTorch engine can be used here, without importing torch."""
from __future__ import annotations

import importlib.util

from ..errors import UserError

INSTALL_HINT = "pip install 'mlx-dpo[cuda]' (PyTorch and transformers)"


def torch_missing() -> list[str]:
    """The PyTorch engine's packages that are not installed."""
    return [name for name in ("torch", "transformers") if importlib.util.find_spec(name) is None]


def require_torch() -> None:
    missing = torch_missing()
    if missing:
        raise UserError(f"the PyTorch engine needs {' and '.join(missing)}: {INSTALL_HINT}")
