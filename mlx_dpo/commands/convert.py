"""`mlx-dpo convert`: a GGUF file (llama.cpp, Ollama) to an mlx-lm model folder to train."""
from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("gguf_file", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32",
              show_default=True, help="Weight precision of the converted model (float32 trains fastest on CPU).")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Reload the result, continue --prompt greedily, and compare its log-probs with the "
                   "gguf package's own dequantization of the file.")
@click.option("--prompt", default="The capital of France is", show_default=True,
              help="Prompt for the --check generation.")
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it already holds a model.")
def convert(gguf_file: Path, out_dir: Path, dtype: str, check: bool, prompt: str, overwrite: bool):
    """Convert GGUF_FILE (llama, qwen2 or qwen3 architecture; F32/F16/BF16, Q4_0, Q4_1, Q8_0 or
    any type the gguf package dequantizes) to OUT_DIR: config.json, model.safetensors and the
    tokenizer with its chat template, loadable by mlx_lm.load and usable as model.base_model."""
    from ..errors import UserError
    from ..gguf import convert as run_convert
    from ..gguf import verify

    if (out_dir / "model.safetensors").exists() and not overwrite:
        raise UserError(f"{out_dir} already holds a model; pass --overwrite to replace it")
    config = run_convert(gguf_file, out_dir, dtype)
    click.echo(f"wrote {out_dir}: {config['model_type']}, {config['num_hidden_layers']} layers, "
               f"hidden {config['hidden_size']}, vocab {config['vocab_size']}, {dtype}")
    if check:
        report = verify(gguf_file, out_dir, prompt)
        click.echo(f"check: {report['parameters']:,} parameters; greedy continuation of {prompt!r}: "
                   f"{report['continuation']!r}")
        click.echo(f"check: max |log-prob difference| vs the gguf package's dequantization: "
                   f"{report['max_logp_diff']:.2e} (mean NLL of the check sentence {report['mean_nll']:.3f})")
        if report["max_logp_diff"] > 0.05:  # dequantization is exact in float32: this is a wrong weight
            raise UserError(f"{out_dir}: the converted weights disagree with the gguf package's "
                            f"dequantization of {gguf_file} (max |log-prob difference| "
                            f"{report['max_logp_diff']:.2f}); please report it")
