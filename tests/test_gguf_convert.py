"""`mlx-dpo convert`: a tiny GGUF written here (llama.cpp's layout: permuted Q/K rows, block
quantization, BPE tokenizer in the metadata) comes back as the model it was made from."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

gguf = pytest.importorskip("gguf")

import mlx.core as mx  # noqa: E402

from mlx_dpo.cli import main  # noqa: E402

TEXTS = ["the cat sat on the mat", "paris is the capital of france", "a dog and a cat went to the park",
         "question: what is the capital of france? answer: paris"] * 4
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CONFIG = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
              rope_theta=10000.0, max_position_embeddings=128, tie_word_embeddings=False)
# Tensor storage per GGUF name pattern: exact types prove the mapping, quantized ones the dequantizer.
QTYPES = {"blk.0.attn_q": "F32", "blk.0.attn_k": "F32", "blk.1.attn_q": "Q8_0", "blk.1.attn_k": "Q4_1",
          "blk.0.ffn_up": "Q4_0", "blk.1.ffn_down": "F16"}


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXTS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   chat_template=TEMPLATE)


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert script: each head's rows (2, d/2) stored as (d/2, 2)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(hf: str) -> str:
    from mlx_dpo.gguf import BLOCK_NAMES, TOP_NAMES

    stem, leaf = hf.rsplit(".", 1)
    for g, h in TOP_NAMES.items():
        if stem == h:
            return f"{g}.{leaf}"
    layer, rest = stem.removeprefix("model.layers.").split(".", 1)
    return f"blk.{layer}.{next(g for g, h in BLOCK_NAMES.items() if h == rest)}.{leaf}"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(gguf path, original float32 weights by mlx-lm name, original tokenizer)."""
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    tokenizer = _tokenizer()
    config = dict(CONFIG, vocab_size=len(tokenizer))
    mx.random.seed(3)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    weights = {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())}
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_context_length(128)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    _add_tokenizer(writer, tokenizer)
    for name, w in weights.items():
        stored = _permute(w, 4 if "q_proj" in name else 2) if name.endswith(("q_proj.weight", "k_proj.weight")) else w
        gname = _gguf_name(name)
        qtype = QTYPES.get(gname.rsplit(".", 1)[0], "F32")
        if qtype == "F16":
            writer.add_tensor(gname, stored.astype(np.float16))
        elif qtype == "F32":
            writer.add_tensor(gname, stored)
        else:
            kind = getattr(gguf.GGMLQuantizationType, qtype)
            writer.add_tensor(gname, gguf.quants.quantize(stored, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, weights, tokenizer


def _add_tokenizer(writer, tokenizer) -> None:
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1])
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    specials = {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([t for t, _ in vocab])
    writer.add_token_types([3 if t in specials else 1 for t, _ in vocab])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_chat_template(TEMPLATE)


@pytest.fixture(scope="module")
def converted(tiny_gguf, tmp_path_factory):
    path, _, _ = tiny_gguf
    out = tmp_path_factory.mktemp("converted") / "model"
    result = CliRunner().invoke(main, ["convert", str(path), str(out)])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_converted_weights_are_the_originals(tiny_gguf, converted):
    _, original, _ = tiny_gguf
    out, _ = converted
    got = {k: np.array(v) for k, v in mx.load(str(out / "model.safetensors")).items()}
    assert got.keys() == original.keys()
    for name, want in original.items():
        gname = _gguf_name(name).rsplit(".", 1)[0]
        qtype = QTYPES.get(gname, "F32")
        # F32 exact (Q/K included: the permutation is undone); quantized within the type's error.
        tol = {"F32": 0.0, "F16": 1e-3, "Q8_0": 0.02, "Q4_1": 0.2, "Q4_0": 0.25}[qtype]
        np.testing.assert_allclose(got[name], want, atol=tol, rtol=0, err_msg=f"{name} ({qtype})")


def test_converted_model_matches_the_gguf_package_dequantization(converted):
    _, output = converted
    assert "max |log-prob difference| vs the gguf package's dequantization: 0.00e+00" in output


def test_converted_tokenizer_and_chat_template(tiny_gguf, converted):
    import mlx_lm

    _, _, original = tiny_gguf
    out, _ = converted
    model, tok = mlx_lm.load(str(out))
    for text in ("paris is the capital of france", "the dog sat on the park mat"):
        assert tok.encode(text, add_special_tokens=False) == original.encode(text, add_special_tokens=False)
    messages = [{"role": "user", "content": "the cat"}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        original.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["num_key_value_heads"] == 2


def test_bad_input_is_a_clear_error(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"this is not a gguf file at all")
    result = CliRunner().invoke(main, ["convert", str(junk), str(tmp_path / "out")])
    assert result.exit_code == 2 and "junk.gguf" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(main, ["convert", str(tmp_path / "missing.gguf"), str(tmp_path / "out")])
    assert result.exit_code == 2 and "not found" in result.output


def test_refuses_to_overwrite_a_model(converted, tiny_gguf):
    out, _ = converted
    result = CliRunner().invoke(main, ["convert", str(tiny_gguf[0]), str(out), "--no-check"])
    assert result.exit_code == 2 and "--overwrite" in result.output


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
def test_k_quant_tensors_are_read_exactly(tmp_path, qtype):
    """MLX's own GGUF reader decodes Q4_K wrongly (the second 32 weights of every 64 take the first
    32's scale) and rounds Q6_K to float16: K-quants must come from the gguf package, bit for bit."""
    from mlx_dpo.gguf import dequantized_tensors, read_gguf

    kind = getattr(gguf.GGMLQuantizationType, qtype)
    block, size = gguf.GGML_QUANT_SIZES[kind]  # 256 weights in 144 (Q4_K) or 210 (Q6_K) bytes
    rows, blocks = 8, 2
    raw = np.random.default_rng(0).integers(0, 256, (rows, blocks, size), dtype=np.uint8)
    scales = np.full((rows, blocks, 2), 0.01, dtype=np.float16).view(np.uint8)  # finite super-block scales
    if qtype == "Q4_K":
        raw[:, :, :4] = scales.reshape(rows, blocks, 4)  # d, dmin come first
    else:
        raw[:, :, -2:] = scales[..., 0:1, :].reshape(rows, blocks, 2)  # d comes last
    path = tmp_path / f"{qtype}.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("blk.0.ffn_up.weight", raw.reshape(rows, blocks * size), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tensors, _ = read_gguf(path)
    want = dequantized_tensors(path)["blk.0.ffn_up.weight"]
    got = np.array(tensors["blk.0.ffn_up.weight"], dtype=np.float32)
    assert want.shape == got.shape == (rows, blocks * block)
    assert np.abs(want).max() > 0.01  # real weights, not zeros
    np.testing.assert_array_equal(got, want)
