"""`data score` on the tiny model: completion log-probs as training computes them, implicit
rewards against a reference, adapters, and the gap that `data validate --scores` takes from them."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import make_pairs, write_jsonl
from mlx_dpo.cli import main


def score(*args):
    result = CliRunner().invoke(main, ["data", "score", *map(str, args)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def read(path):
    return [json.loads(line) for line in open(path)]


def manual_logp(model, tokenizer, pair, which):
    """log p(completion | prompt) summed over completion tokens, with numpy, one sequence."""
    import mlx.core as mx

    from mlx_dpo.data.records import Pair
    from mlx_dpo.data.tokenize import PairEncoder

    enc = PairEncoder(tokenizer, 512, 1024).encode(Pair(pair["prompt"], pair["chosen"], pair["rejected"]))
    completion = enc.chosen if which == "chosen" else enc.rejected
    seq = enc.prompt + completion
    logits = np.array(model(mx.array([seq[:-1]]))[0], dtype=np.float64)
    logsm = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    start = len(enc.prompt) - 1  # logits at position t predict token t + 1
    return sum(logsm[t, seq[t + 1]] for t in range(start, len(seq) - 1))


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    rows = make_pairs(7, seed=5)
    rows[3]["chosen"] = "sure here steps first the cat then water finally good . " * 3  # a longer row
    return write_jsonl(tmp_path_factory.mktemp("score") / "pairs.jsonl", rows), rows


def test_logps_match_a_manual_computation_in_file_order(tmp_path, tiny_model, pairs_file):
    from mlx_dpo.data.scoring import load_scoring_model

    path, rows = pairs_file
    out = tmp_path / "s.jsonl"
    result = score(path, "--model", tiny_model, "--out", out, "--batch-size", 3)
    assert result.exit_code == 0, result.output
    scored = read(out)
    assert [r["line"] for r in scored] == list(range(1, 8))
    assert "reward_margin" not in scored[0]  # no reference, no rewards
    model, tokenizer = load_scoring_model(str(tiny_model))
    for row, pair in zip(scored, rows):
        assert row["logp_chosen"] == pytest.approx(manual_logp(model, tokenizer, pair, "chosen"), abs=1e-3)
        assert row["logp_rejected"] == pytest.approx(manual_logp(model, tokenizer, pair, "rejected"), abs=1e-3)


def test_reference_equal_to_model_gives_zero_rewards(tmp_path, tiny_model, pairs_file):
    path, _ = pairs_file
    out = tmp_path / "s.jsonl"
    result = score(path, "--model", tiny_model, "--reference", tiny_model, "--out", out, "--beta", 0.5)
    assert result.exit_code == 0 and "reward margin: mean 0.0000" in result.output
    row = read(out)[0]
    assert row["beta"] == 0.5 and row["reward_chosen"] == 0.0 and row["reward_margin"] == 0.0


def test_separate_reference_rewards(tmp_path, tiny_model, pairs_file):
    """reward = beta * (logp under the model - logp under the reference), each scored alone."""
    from conftest import build_model

    path, _ = pairs_file
    other = build_model(tmp_path / "other", seed=1)  # same tokenizer, other weights
    a, b, both = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "both.jsonl"
    assert score(path, "--model", tiny_model, "--out", a).exit_code == 0
    assert score(path, "--model", other, "--out", b).exit_code == 0
    assert score(path, "--model", tiny_model, "--reference", other, "--beta", 0.2, "--out", both).exit_code == 0
    for ra, rb, r in zip(read(a), read(b), read(both)):
        assert r["reward_chosen"] == pytest.approx(0.2 * (ra["logp_chosen"] - rb["logp_chosen"]), abs=1e-4)
        assert r["reward_rejected"] == pytest.approx(0.2 * (ra["logp_rejected"] - rb["logp_rejected"]), abs=1e-4)
        assert r["reward_margin"] == pytest.approx(r["reward_chosen"] - r["reward_rejected"])
    assert any(abs(r["reward_margin"]) > 1e-3 for r in read(both))


def make_adapter(tiny_model, folder):
    """LoRA adapters in mlx-lm's format with a non-zero B, so the adapted model differs."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = load(str(tiny_model))
    lora = {"rank": 4, "scale": 20.0, "dropout": 0.0}
    model.freeze()  # only the LoRA matrices stay trainable, as in training
    linear_to_lora_layers(model, 2, lora)
    mx.random.seed(0)
    weights = {k: (mx.random.normal(v.shape) * 0.05 if k.endswith("lora_b") else v)
               for k, v in tree_flatten(model.trainable_parameters())}
    folder.mkdir()
    mx.save_safetensors(str(folder / "adapters.safetensors"), weights)
    (folder / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": lora}))
    return folder


def test_adapter_with_its_base_as_reference(tmp_path, tiny_model, pairs_file):
    path, _ = pairs_file
    adapter = make_adapter(tiny_model, tmp_path / "adapter")
    base, adapted = tmp_path / "base.jsonl", tmp_path / "adapted.jsonl"
    assert score(path, "--model", tiny_model, "--out", base).exit_code == 0
    result = score(path, "--model", tiny_model, "--adapter", adapter, "--reference", tiny_model, "--out", adapted)
    assert result.exit_code == 0, result.output
    for b, a in zip(read(base), read(adapted)):
        # The reference is the base model: adapters switched off inside the same weights.
        assert a["ref_logp_chosen"] == pytest.approx(b["logp_chosen"], abs=1e-4)
        assert a["logp_chosen"] != pytest.approx(b["logp_chosen"], abs=1e-3)
        assert a["reward_margin"] == pytest.approx(
            0.1 * ((a["logp_chosen"] - a["ref_logp_chosen"]) - (a["logp_rejected"] - a["ref_logp_rejected"])))

    report = json.loads(CliRunner().invoke(main, ["data", "validate", str(path), "--scores", str(adapted),
                                                  "--benchmark", str(path), "--json"]).output)
    gap = report["gap"]
    assert gap["source"].startswith("model scores (adapted.jsonl") and gap["scored_pairs"] == 7
    expected = max(0.0, float(np.mean([np.tanh(r["reward_margin"] / 2) for r in read(adapted)])))
    assert report["avg_gap"] == pytest.approx(expected)


def test_config_limits_truncate_like_training(tmp_path, tiny_model, pairs_file):
    path, _ = pairs_file
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model: {{base_model: {tiny_model}}}\n"
                   f"data: {{train_file: {path}, max_prompt_length: 8, max_response_length: 6}}\n")
    out = tmp_path / "s.jsonl"
    result = score(path, "--model", tiny_model, "--config", cfg, "--out", out)
    assert result.exit_code == 0 and "7 truncated" in result.output
    assert all(r["tokens_chosen"] <= 6 and r["truncated"] for r in read(out))


def test_unusable_inputs_exit_2(tmp_path, tiny_model, pairs_file):
    path, _ = pairs_file
    missing = score(path, "--model", tmp_path / "no-model", "--out", tmp_path / "s.jsonl")
    assert missing.exit_code == 2 and "cannot load model" in missing.output
    bad = write_jsonl(tmp_path / "bad.jsonl", ["{nope"])
    result = score(bad, "--model", tiny_model, "--out", tmp_path / "s.jsonl")
    assert result.exit_code == 2 and "bad.jsonl:1: not valid JSON" in result.output


def test_full_finetune_folder_is_scored_against_the_separate_reference(tmp_path, tiny_model, pairs_file, make_config):
    """A full fine-tune's folder replaces the weights: 'adapters off' would score it against itself."""
    from mlx_dpo.run import run_training

    cfg = make_config(**{"model.finetune": "full", "training.max_steps": 3, "training.learning_rate": 1e-2})
    run_training(cfg, echo=lambda _: None, progress=False)
    path, _ = pairs_file
    out = tmp_path / "s.jsonl"
    adapter = f"{cfg.logging.output_dir}/checkpoint-3"
    result = score(path, "--model", tiny_model, "--adapter", adapter, "--reference", tiny_model, "--out", out)
    assert result.exit_code == 0, result.output
    assert any(abs(r["reward_margin"]) > 1e-3 for r in read(out))
