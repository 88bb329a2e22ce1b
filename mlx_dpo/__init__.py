"""mlx-dpo: Direct Preference Optimization on MLX.

Importing the package prepares the runtime (Metal env vars, optimized BLAS) before MLX loads.
"""
from .hardware import prepare_runtime as _prepare_runtime

_prepare_runtime()

__version__ = "0.1.0"
from .training_metrics import validate_dpo_pairs  # noqa: E402,F401 - the workflow's Stage 2 API
from .training_metrics import check_quality_gates, enforce_gates  # noqa: E402,F401 - stages 5 and 7 (#4)
