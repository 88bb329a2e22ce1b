#!/usr/bin/env python
"""Build the tiny offline SFT-baseline LM (mlx-lm llama format) used by smoke tests.

Steps: train a ~512-token byte-level BPE on the smoke training text, build a
2-layer llama in MLX, SFT it on prompt+chosen AND prompt+rejected equally (so it
speaks the data's language but prefers neither style), save float32 weights,
then reload with mlx_lm (and with transformers, when torch is installed) to
check that the folder is a valid model for both.
"""

import argparse
import json
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT / "mlx_dpo" / "assets" / "smoke"
DEFAULT_OUT = ROOT / "mlx_dpo" / "assets" / "tiny-model"

EOS, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

# ChatML-style, except that an assistant turn ends with eos_token rather than
# <|im_end|>: rendering [user, assistant] then equals the generation prompt
# + response + eos, which is exactly how DPO completions are tokenised, so the
# SFT baseline stops generating at eos.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' + message['content'] + eos_token }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

ARCH = dict(
    model_type="llama", hidden_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    intermediate_size=128, rms_norm_eps=1e-5, rope_theta=10000.0,
    max_position_embeddings=256, tie_word_embeddings=True,
)


def read_pairs(data_dir: Path, split: str) -> list[dict]:
    with (data_dir / f"{split}.jsonl").open() as f:
        return [json.loads(line) for line in f]


def bpe_corpus(pairs: list[dict]) -> list[str]:
    """Turn texts with their role header, so "user"/"assistant", which appear in
    every formatted example, get merged into single tokens too."""
    texts = []
    for p in pairs:
        texts += [f"user\n{p['prompt']}", f"assistant\n{p['chosen']}",
                  f"assistant\n{p['rejected']}"]
    return texts


def train_bpe(texts: list[str], vocab_size: int):
    """Byte-level BPE: the full 256-byte alphabet is kept so any text encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def wrap_tokenizer(tok):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=EOS,
        additional_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE, model_max_length=ARCH["max_position_embeddings"],
    )


def model_config(tokenizer) -> dict:
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    return dict(
        ARCH, architectures=["LlamaForCausalLM"], vocab_size=len(tokenizer),
        hidden_act="silu", attention_bias=False, mlp_bias=False,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
        torch_dtype="float32",
    )


def build_model(config: dict, seed: int):
    from mlx_lm.models.llama import Model, ModelArgs

    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(config))
    model.set_dtype(mx.float32)
    return model


def encode_examples(tokenizer, pairs: list[dict]) -> list[list[int]]:
    """Both responses of every pair, in the chat format used for DPO."""
    seqs = []
    for pair in pairs:
        for response in (pair["chosen"], pair["rejected"]):
            msgs = [{"role": "user", "content": pair["prompt"]},
                    {"role": "assistant", "content": response}]
            text = tokenizer.apply_chat_template(msgs, tokenize=False)
            seqs.append(tokenizer.encode(text, add_special_tokens=False))
    return seqs


def pad_batch(seqs: list[list[int]], pad_id: int):
    width = max(map(len, seqs))
    ids = np.full((len(seqs), width), pad_id, dtype=np.int32)
    for i, seq in enumerate(seqs):
        ids[i, : len(seq)] = seq
    lengths = np.array([len(s) for s in seqs], dtype=np.int32)
    return mx.array(ids), mx.array(lengths)


def lm_loss(model, ids, lengths):
    """Mean next-token cross-entropy; padding is masked by length, not by id,
    because the pad id is also eos, which is a real target."""
    logits = model(ids[:, :-1])
    targets = ids[:, 1:]
    mask = mx.arange(targets.shape[1])[None, :] < (lengths[:, None] - 1)
    ce = nn.losses.cross_entropy(logits, targets) * mask
    return ce.sum() / mask.sum()


def length_bucketed_batches(seqs, batch_size: int, rng):
    """Endless shuffled batches of similar-length sequences: the CPU wheel's
    reference BLAS makes every padded token expensive."""
    while True:
        order = rng.permutation(len(seqs))
        chunk = batch_size * 16
        batches = []
        for c in range(0, len(order), chunk):
            part = sorted(order[c : c + chunk], key=lambda i: len(seqs[i]))
            batches += [part[b : b + batch_size] for b in range(0, len(part), batch_size)]
        for b in rng.permutation(len(batches)):
            yield [seqs[i] for i in batches[b]]


def sft(model, seqs, pad_id, args) -> float:
    """AdamW, warmup + cosine decay; returns the mean loss of the last 10% of steps."""
    warmup = max(1, args.steps // 20)
    schedule = optim.join_schedules(
        [optim.linear_schedule(args.lr * 0.01, args.lr, warmup),
         optim.cosine_decay(args.lr, args.steps - warmup, args.lr * 0.1)], [warmup])
    opt = optim.AdamW(learning_rate=schedule, weight_decay=0.01)
    step_fn = nn.value_and_grad(model, lm_loss)
    batches = length_bucketed_batches(seqs, args.batch_size, np.random.default_rng(args.seed))
    losses = []
    for step in range(1, args.steps + 1):
        loss, grads = step_fn(model, *pad_batch(next(batches), pad_id))
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state, loss)
        losses.append(loss.item())
        if step % 50 == 0 or step == args.steps:
            print(f"  step {step:4d}  loss {np.mean(losses[-50:]):.4f}", flush=True)
    return float(np.mean(losses[-max(1, args.steps // 10):]))


def save(model, tokenizer, config: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    # "pt" format metadata keeps transformers' safetensors loader happy too.
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights,
                        metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    # Template inside tokenizer_config.json (not a separate .jinja file), so
    # tools that only read tokenizer_config still find it.
    tokenizer.save_pretrained(str(out_dir), save_jinja_files=False)


def check_reload(out_dir: Path, text: str) -> np.ndarray:
    """Reload through mlx_lm.load, as users will, and return logits for `text`."""
    import mlx_lm

    model, tok = mlx_lm.load(str(out_dir))
    ids = tok.encode(text, add_special_tokens=False)
    return np.array(model(mx.array([ids])).astype(mx.float32))


def check_hf(out_dir: Path, text: str, mlx_logits: np.ndarray):
    """Max |HF - MLX| logit difference, or None when torch is not installed."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        return None
    tok = AutoTokenizer.from_pretrained(str(out_dir))
    model = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32)
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        hf_logits = model(ids).logits.numpy()
    return float(np.abs(hf_logits - mlx_logits).max())


def summarize(model, tokenizer, loss: float, out_dir: Path, seconds: float):
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(f"params: {n_params:,}  vocab: {len(tokenizer)}  "
          f"final SFT loss: {loss:.4f}  SFT time: {seconds:.1f}s")
    for path in sorted(out_dir.iterdir()):
        print(f"  {path.name:28s} {path.stat().st_size:>9,d} bytes")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    pairs = read_pairs(args.data_dir, "train")
    tokenizer = wrap_tokenizer(train_bpe(bpe_corpus(pairs), args.vocab_size))
    config = model_config(tokenizer)
    model = build_model(config, args.seed)
    seqs = encode_examples(tokenizer, pairs)
    print(f"SFT on {len(seqs)} sequences (max {max(map(len, seqs))} tokens)")
    start = time.perf_counter()
    loss = sft(model, seqs, tokenizer.pad_token_id, args)
    seconds = time.perf_counter() - start
    save(model, tokenizer, config, args.out_dir)
    probe = tokenizer.apply_chat_template(
        [{"role": "user", "content": pairs[0]["prompt"]}],
        tokenize=False, add_generation_prompt=True) + pairs[0]["chosen"]
    mlx_logits = check_reload(args.out_dir, probe)
    diff = check_hf(args.out_dir, probe, mlx_logits)
    print("HF vs MLX max |logit diff|: "
          + ("skipped (torch not installed)" if diff is None else f"{diff:.2e}"))
    if diff is not None and diff > 1e-3:
        raise SystemExit("transformers and mlx-lm disagree on this checkpoint")
    summarize(model, tokenizer, loss, args.out_dir, seconds)


if __name__ == "__main__":
    main()
