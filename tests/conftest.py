"""Fixtures: tiny random models and preference files, built offline in a temp folder."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

import mlx_dpo  # noqa: F401  (prepares the runtime before mlx loads)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Reference log-probs and batch-size caches go to a temp folder, never the user's ~/.cache."""
    import os

    os.environ["MLX_DPO_CACHE_DIR"] = str(tmp_path_factory.mktemp("mlx-dpo-cache"))

WORDS = ("the a cat dog sun sky blue red tree water plant how why what is do i explain please "
         "thanks sure here steps first then finally no idea go away whatever help you can with "
         "answer question good bad yes maybe user assistant system").split()
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_tokenizer(folder: Path, chat_template: str | None = CHATML, extra_words=()):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    # dict.fromkeys: one-letter words ("a", "i") are also in the letters; ids must stay
    # contiguous, or some id reaches vocab_size and the embedding lookup reads out of bounds.
    tokens = dict.fromkeys(specials + sorted(set(WORDS) | set(extra_words))
                           + list("abcdefghijklmnopqrstuvwxyz.,?!\n"))
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.add_special_tokens(specials)  # matched whole, before the pre-tokenizer splits "<|"
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>",
                                   unk_token="<unk>")
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(folder)
    return fast


def build_model(folder: Path, chat_template: str | None = CHATML, seed: int = 0, hidden: int = 32,
                layers: int = 2, extra_words=()) -> Path:
    """A random llama in mlx-lm format (config.json, model.safetensors, tokenizer files)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(folder, chat_template, extra_words)
    config = dict(model_type="llama", hidden_size=hidden, num_hidden_layers=layers, intermediate_size=2 * hidden,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=len(tok),
                  rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=True,
                  eos_token_id=tok.eos_token_id, torch_dtype="float32")
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def make_pairs(n: int, seed: int = 0) -> list[dict]:
    """Learnable synthetic preferences: chosen answers are polite, rejected are curt."""
    rng = random.Random(seed)
    topics = ["cat", "dog", "sun", "sky", "tree", "water", "plant"]
    out = []
    for i in range(n):
        t = rng.choice(topics)
        prompt = f"how do i help the {t} ?" if i % 2 else f"explain the {t} please"
        chosen = f"sure here steps first the {t} then {rng.choice(['water', 'sun', 'help'])} finally good ."
        rejected = rng.choice(["no idea .", "go away .", f"whatever {t} .", "maybe bad ."])
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                    "score_chosen": 8.0, "score_rejected": 3.0})
    return out


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("data")
    return {"train": write_jsonl(folder / "train.jsonl", make_pairs(64, seed=1)),
            "val": write_jsonl(folder / "val.jsonl", make_pairs(16, seed=2))}


@pytest.fixture
def make_config(tiny_model, tiny_data, tmp_path):
    """A Config for a fast run on the tiny model; keyword overrides as {"section.key": value}."""
    from mlx_dpo.config import config_from_dict

    def make(**overrides):
        raw = {"model": {"base_model": str(tiny_model), "lora_rank": 4},
               "data": {"train_file": str(tiny_data["train"]), "validation_file": str(tiny_data["val"]),
                        "max_prompt_length": 32, "max_response_length": 32},
               "training": {"learning_rate": 1e-3, "batch_size": 4, "max_steps": 4, "logging_steps": 1,
                            "eval_steps": 100, "save_steps": 100, "seed": 0},
               "optimization": {"lr_scheduler": "constant", "weight_decay": 0.0},
               "logging": {"output_dir": str(tmp_path / "out")}}
        for key, value in overrides.items():
            section, name = key.split("__") if "__" in key else key.split(".")
            raw.setdefault(section, {})[name] = value
        return config_from_dict(raw, source="test.yaml")

    return make
