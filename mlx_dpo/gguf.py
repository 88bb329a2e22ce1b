"""GGUF (llama.cpp, Ollama) to an mlx-lm model folder: config.json, model.safetensors, tokenizer.

Weights: `mx.load` reads GGUF natively and returns Q4_0/Q4_1/Q8_0 tensors in MLX's affine
quantized layout (weight, scales, biases; groups of 32), which `mx.dequantize` expands; other
quantization types are dequantized by the `gguf` package's reference code. llama.cpp stores
the Q and K projections of llama-architecture models with rows permuted for its RoPE kernel;
`_unpermute` restores Hugging Face's order, which mlx-lm expects.

Tokenizer and chat template: transformers rebuilds a fast tokenizer from the GGUF metadata
(it needs the `gguf` package: `pip install mlx-dpo[gguf]`).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import UserError

# GGUF tensor names (per block: blk.N.<name>) -> mlx-lm / Hugging Face names.
BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# Architectures whose GGUF layout maps onto an mlx-lm model type; permute: Q/K rows reordered.
ARCHITECTURES = {"llama": ("llama", True), "qwen2": ("qwen2", False), "qwen3": ("qwen3", False)}
DTYPES = ("float32", "float16", "bfloat16")
# Tensor types mx.load reads exactly (F32/F16 as stored; Q4_0/Q4_1/Q8_0 as MLX affine triples).
# It reads others through its bundled gguflib: Q6_K rounded to float16, Q4_K wrongly (the second
# 32 weights of every 64 get the first 32's scale and min), the rest not at all.
MLX_EXACT_TYPES = {"F32", "F16", "Q4_0", "Q4_1", "Q8_0"}


def read_gguf(path: Path):
    """(tensors as MLX arrays, possibly quantized triples, metadata)."""
    import mlx.core as mx

    if not path.is_file():
        raise UserError(f"{path}: file not found")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        reader = _gguf_package().GGUFReader(str(path))
    except ValueError as err:
        raise UserError(f"{path}: cannot read this GGUF file ({err})") from None
    if {t.tensor_type.name for t in reader.tensors} <= MLX_EXACT_TYPES:
        try:
            return mx.load(str(path), return_metadata=True)
        except (ValueError, RuntimeError):  # mx.load refuses it: the gguf package reads it below
            pass
    try:
        return ({name: mx.array(a) for name, a in _dequantize(reader).items()}, _metadata(reader))
    except (ValueError, NotImplementedError) as err:
        raise UserError(f"{path}: cannot read this GGUF file ({err})") from None


def dequantized_tensors(path: Path) -> dict[str, np.ndarray]:
    """The gguf package's own dequantization, in numpy (row-major, Hugging Face shapes)."""
    return _dequantize(_gguf_package().GGUFReader(str(path)))


def _dequantize(reader) -> dict[str, np.ndarray]:
    gguf = _gguf_package()
    out = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims fastest first
        out[t.name] = np.asarray(data, dtype=np.float32).reshape(shape)
    return out


def _metadata(reader) -> dict:
    gguf = _gguf_package()
    meta = {}
    for name, field in reader.fields.items():
        if field.types and field.types[0] == gguf.GGUFValueType.ARRAY:
            continue  # tokenizer arrays: transformers reads those itself
        meta[name] = field.contents()
    return meta


def _gguf_package():
    try:
        import gguf
    except ImportError:
        raise UserError("converting GGUF needs the gguf package: pip install 'mlx-dpo[gguf]'") from None
    return gguf


def _scalar(meta: dict, key: str, default=None):
    value = meta.get(key, default)
    if value is None:
        raise UserError(f"GGUF metadata has no {key!r}")
    return value.item() if hasattr(value, "item") else value


def model_config(meta: dict, tensors: dict) -> dict:
    arch = str(_scalar(meta, "general.architecture"))
    if arch not in ARCHITECTURES:
        raise UserError(f"GGUF architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    heads = int(_scalar(meta, f"{arch}.attention.head_count"))
    hidden = int(_scalar(meta, f"{arch}.embedding_length"))
    vocab = tensors["token_embd.weight"].shape[0]
    config = {
        "model_type": ARCHITECTURES[arch][0], "architectures": [_hf_class(arch)],
        "hidden_size": hidden, "num_hidden_layers": int(_scalar(meta, f"{arch}.block_count")),
        "intermediate_size": int(_scalar(meta, f"{arch}.feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_scalar(meta, f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(_scalar(meta, f"{arch}.attention.key_length", hidden // heads)),
        "rms_norm_eps": float(_scalar(meta, f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_scalar(meta, f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_scalar(meta, f"{arch}.context_length", 4096)),
        "vocab_size": int(vocab), "tie_word_embeddings": "output.weight" not in tensors,
        "hidden_act": "silu", "torch_dtype": "float32",
    }
    for key in ("bos_token_id", "eos_token_id"):
        if f"tokenizer.ggml.{key}" in meta:
            config[key] = int(_scalar(meta, f"tokenizer.ggml.{key}"))
    return config


def _hf_class(arch: str) -> str:
    return {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[arch]


def hf_name(name: str) -> Optional[str]:
    """GGUF tensor name -> mlx-lm name; None for tensors mlx-lm does not use (rope_freqs)."""
    stem, _, leaf = name.rpartition(".")
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)", stem)
    if match and match.group(2) in BLOCK_NAMES:
        return f"model.layers.{match.group(1)}.{BLOCK_NAMES[match.group(2)]}.{leaf}"
    if stem in TOP_NAMES:
        return f"{TOP_NAMES[stem]}.{leaf}"
    return None


def _unpermute(w, heads: int):
    """Undo llama.cpp's Q/K row permutation: its convert script views each head's rows as
    (2, d/2) and swaps to (d/2, 2) (interleaved RoPE pairs); this swaps them back."""
    rest = w.shape[1:]
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def dense_weights(tensors: dict, config: dict, arch: str, dtype: str = "float32") -> dict:
    """mlx-lm weights, dequantized and cast to `dtype`."""
    import mlx.core as mx

    out = {}
    for name, value in tensors.items():
        if name.endswith((".scales", ".biases")) and name.rsplit(".", 1)[0] + ".weight" in tensors:
            continue  # consumed with their weight
        base = name.rsplit(".", 1)[0]
        if f"{base}.scales" in tensors:
            # float32 scales: dequantizing in their float16 would round every weight to fp16.
            scales = tensors[f"{base}.scales"].astype(mx.float32)
            biases = tensors[f"{base}.biases"].astype(mx.float32)
            in_features = scales.shape[-1] * 32  # GGUF block quants: 32 weights per group
            bits = value.shape[-1] * 32 // in_features
            value = mx.dequantize(value, scales, biases, group_size=32, bits=bits)
        target = hf_name(name)
        if target is None:
            continue
        if ARCHITECTURES[arch][1] and target.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config["num_attention_heads"] if "q_proj" in target else config["num_key_value_heads"]
            value = _unpermute(value, heads)
        out[target] = value.astype(getattr(mx, dtype))
    return out


def convert(gguf_path: Path, out_dir: Path, dtype: str = "float32") -> dict:
    """Write an mlx-lm folder; returns its config."""
    import mlx.core as mx

    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    tensors, meta = read_gguf(gguf_path)
    config = model_config(meta, tensors)
    weights = dense_weights(tensors, config, str(_scalar(meta, "general.architecture")), dtype)
    config["torch_dtype"] = dtype
    tokenizer = load_tokenizer(gguf_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save_pretrained(str(out_dir))
    return config


def load_tokenizer(gguf_path: Path):
    import importlib.util

    _gguf_package()
    if importlib.util.find_spec("torch") is None:  # transformers' GGUF reader imports torch
        raise UserError("rebuilding the tokenizer from a GGUF file needs torch (transformers' GGUF reader "
                        "imports it): pip install torch (on Linux, the CPU build: "
                        "pip install torch --index-url https://download.pytorch.org/whl/cpu)")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as err:  # transformers raises many types for an unsupported vocabulary
        raise UserError(f"{gguf_path}: the tokenizer in this GGUF cannot be rebuilt by transformers "
                        f"({type(err).__name__}: {err})") from None


VERIFY_TEXT = "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France."


def verify(gguf_path: Path, out_dir: Path, prompt: str, max_tokens: int = 16) -> dict:
    """Check a converted folder: greedy continuation of `prompt`, and the largest difference
    between its token log-probs and those of a model built from the gguf package's own
    dequantization of the file (an independent reading of the same bytes)."""
    import mlx.core as mx
    import mlx_lm
    from mlx.utils import tree_flatten

    from .logprobs import token_logps

    model, tokenizer = mlx_lm.load(str(out_dir))
    continuation = mlx_lm.generate(model, tokenizer, prompt=prompt, max_tokens=max_tokens, verbose=False)
    config = json.loads((out_dir / "config.json").read_text())
    arch = next(a for a, (t, _) in ARCHITECTURES.items() if t == config["model_type"])
    reference = {n: mx.array(v) for n, v in dequantized_tensors(gguf_path).items()}
    weights = dense_weights(reference, config, arch, "float32")
    ref_model, _ = mlx_lm.load(str(out_dir))
    ref_model.load_weights(list(weights.items()))
    ids = mx.array([tokenizer.encode(VERIFY_TEXT)])
    got, want = (token_logps(m(ids[:, :-1]).astype(mx.float32), ids[:, 1:]) for m in (model, ref_model))
    params = sum(v.size for _, v in tree_flatten(model.parameters()))
    return {"continuation": continuation, "max_logp_diff": float(mx.abs(got - want).max()),
            "mean_nll": float(-want.mean()), "parameters": int(params)}
