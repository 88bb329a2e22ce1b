"""`python -m mlx_dpo ...` is the `mlx-dpo` command; torchrun launches it this way (`-m mlx_dpo`)."""
from .cli import main

main()
