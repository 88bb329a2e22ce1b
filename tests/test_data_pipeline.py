"""Records, tokenization and batching: schema errors with file:line, the prompt/completion
boundary, truncation policy, length grouping and rank shards."""
import json

import numpy as np
import pytest

from conftest import write_jsonl
from mlx_dpo.data.batching import collate, epoch_order, shard, split_sizes
from mlx_dpo.data.records import RecordError, read_pairs
from mlx_dpo.data.tokenize import PairEncoder, encode_pairs

GOOD = {"prompt": "why is the sky blue ?", "chosen": "sure here the sun .", "rejected": "no idea ."}
CONV = {"prompt": [{"role": "user", "content": "why is the sky blue ?"}],
        "chosen": [{"role": "assistant", "content": "sure here the sun ."}],
        "rejected": [{"role": "assistant", "content": "no idea ."}]}


@pytest.mark.parametrize("line, reason", [
    ('{"prompt": "a", "chosen": "b"', "not valid JSON"),
    (b'{"prompt": "\xff", "chosen": "b", "rejected": "c"}', "not valid UTF-8"),
    ('["prompt", "chosen"]', "expected a JSON object, got list"),
    ('{"prompt": "a", "chosen": "b"}', "missing field(s) rejected"),
    ('{"prompt": "a", "chosen": 3, "rejected": "c"}', "field 'chosen' must be a string"),
    ('{"prompt": "a", "chosen": " ", "rejected": "c"}', "empty completion"),
    ('{"prompt": "a", "chosen": "same", "rejected": "same"}', "chosen is identical to rejected"),
    ('{"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "user", "content": "b"}], '
     '"rejected": [{"role": "assistant", "content": "c"}]}', "must have role 'assistant'"),
    ('{"prompt": "\\ud800", "chosen": "b", "rejected": "c"}', "not valid Unicode"),
])
def test_bad_record_stops_with_file_line_and_reason(tmp_path, line, reason):
    path = tmp_path / "pairs.jsonl"
    raw = line if isinstance(line, bytes) else line.encode()
    path.write_bytes(json.dumps(GOOD).encode() + b"\n\n" + raw + b"\n")
    with pytest.raises(RecordError) as err:
        read_pairs(path)
    assert str(err.value).startswith(f"{path}:3: ") and reason in str(err.value)
    skipped = read_pairs(path, on_bad="skip")
    assert len(skipped.pairs) == 1 and [e.line for e in skipped.bad] == [3]


def test_both_forms_are_read_and_extra_keys_kept(tmp_path):
    result = read_pairs(write_jsonl(tmp_path / "p.jsonl", [dict(GOOD, score_chosen=9), CONV]))
    assert [p.conversational for p in result.pairs] == [False, True]
    assert result.pairs[0].extra == {"score_chosen": 9}


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from mlx_lm import load

    return load(str(tiny_model))[1]


def test_chat_template_boundary_and_eos(tokenizer, tmp_path):
    enc = PairEncoder(tokenizer, 64, 64)
    assert enc.use_template
    pairs = read_pairs(write_jsonl(tmp_path / "p.jsonl", [GOOD, CONV])).pairs
    standard, conversational = [enc.encode(p) for p in pairs]
    # the two forms of the same exchange give the same tokens
    assert (standard.prompt, standard.chosen) == (conversational.prompt, conversational.chosen)
    prompt_text = tokenizer.decode(standard.prompt)
    assert prompt_text.replace(" ", "").startswith("<|im_start|>user") and prompt_text.rstrip().endswith("assistant")
    assert standard.chosen[-1] == tokenizer.eos_token_id
    assert "sure here the sun" in tokenizer.decode(standard.chosen)
    assert "<|im_start|>" not in tokenizer.decode(standard.chosen)


def test_no_template_mode_encodes_raw_text(tokenizer, tmp_path):
    enc = PairEncoder(tokenizer, 64, 64, chat_template="off")
    pair = read_pairs(write_jsonl(tmp_path / "p.jsonl", [GOOD])).pairs[0]
    e = enc.encode(pair)
    assert e.prompt == tokenizer.encode(GOOD["prompt"])
    assert e.chosen == tokenizer.encode(GOOD["chosen"], add_special_tokens=False) + [tokenizer.eos_token_id]


def test_truncation_keeps_prompt_end_and_completion_start(tokenizer, tmp_path):
    long = dict(GOOD, prompt=" ".join(["the"] * 50) + " why", chosen="sure " + "here " * 40)
    pairs = read_pairs(write_jsonl(tmp_path / "p.jsonl", [long, GOOD])).pairs
    full = PairEncoder(tokenizer, 1000, 1000).encode(pairs[0])
    data = encode_pairs(pairs, PairEncoder(tokenizer, 20, 8))
    cut = data.pairs[0]
    assert data.truncated == 1 and cut.truncated and not data.pairs[1].truncated
    assert cut.prompt == full.prompt[-20:] and cut.chosen == full.chosen[:8]
    tiny = PairEncoder(tokenizer, 1, 1).encode(pairs[0])
    assert len(tiny.chosen) == 1 and len(tiny.rejected) == 1  # never empty


def test_collate_masks_exactly_the_completion_tokens(tokenizer, tmp_path):
    pairs = read_pairs(write_jsonl(tmp_path / "p.jsonl", [GOOD, CONV])).pairs
    enc = [PairEncoder(tokenizer, 64, 64).encode(p) for p in pairs]
    batch = collate(enc, pad_id=0)
    assert batch.inputs.shape[0] == 4 and batch.inputs.shape[1] % 16 == 0
    for row, (p, completion) in enumerate([(enc[0], enc[0].chosen), (enc[1], enc[1].chosen),
                                           (enc[0], enc[0].rejected), (enc[1], enc[1].rejected)]):
        assert batch.targets[row][batch.mask[row] == 1].tolist() == completion
        assert batch.inputs[row, :len(p.prompt)].tolist() == p.prompt


def test_length_grouping_cuts_padding_and_is_deterministic():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 500, size=2000).tolist()
    grouped = epoch_order(lengths, 8, seed=1, epoch=0)
    assert [b.tolist() for b in grouped] == [b.tolist() for b in epoch_order(lengths, 8, seed=1, epoch=0)]
    assert sorted(np.concatenate(grouped).tolist()) == list(range(2000))
    random_batches = np.array_split(rng.permutation(2000), 250)
    lengths = np.array(lengths)

    def padding(batches):
        return sum(len(b) * lengths[b].max() - lengths[b].sum() for b in batches)
    assert padding(grouped) < 0.2 * padding(random_batches)


def test_shards_follow_weights_never_overlap_and_give_each_rank_a_pair():
    assert split_sizes(20, [0.65, 0.35]) == [13, 7]
    assert split_sizes(2, [0.65, 0.35]) == [1, 1]
    assert sum(split_sizes(7, [0.9, 0.1])) == 7 and min(split_sizes(7, [0.9, 0.1])) >= 1
    idx = np.arange(20)
    a, b = shard(idx, [0.65, 0.35], 0), shard(idx, [0.65, 0.35], 1)
    assert len(a) == 13 and len(b) == 7 and not set(a) & set(b) and len(set(a) | set(b)) == 20


def test_shared_prompt_grouping_pads_less_than_total_length():
    from mlx_dpo.data.batching import PAD_MULTIPLE, grouping_keys
    from mlx_dpo.data.tokenize import EncodedPair

    rng = np.random.default_rng(0)
    pairs = [EncodedPair([1] * int(p), [2] * int(c), [3] * int(r))
             for p, c, r in rng.integers(10, 300, size=(2000, 3))]

    def shared_grid(batches):  # completion.shared_plan's widths: [prompt | chosen | rejected] per pair
        up = lambda n: -(-n // PAD_MULTIPLE) * PAD_MULTIPLE  # noqa: E731
        return sum(len(b) * (up(max(len(pairs[i].prompt) for i in b))
                             + 2 * up(max(max(len(pairs[i].chosen), len(pairs[i].rejected)) for i in b)))
                   for b in batches)
    by_total = epoch_order(grouping_keys(pairs, shared_prompt=False), 4, seed=1, epoch=0)
    by_layout = epoch_order(grouping_keys(pairs, shared_prompt=True), 4, seed=1, epoch=0)
    assert sorted(np.concatenate(by_layout).tolist()) == list(range(2000))
    assert grouping_keys(pairs, shared_prompt=False) == [p.length for p in pairs]
    assert shared_grid(by_layout) < 0.93 * shared_grid(by_total)
