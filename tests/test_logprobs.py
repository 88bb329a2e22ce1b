"""Log-probs and KL against a direct numpy computation."""
import mlx.core as mx
import numpy as np

from mlx_dpo.logprobs import sequence_logps, token_kl


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_sequence_logps_sum_masked_targets():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 7)).astype(np.float32)
    targets = rng.integers(0, 7, size=(3, 5))
    mask = np.array([[0, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]], dtype=np.float32)
    expected = (np.take_along_axis(log_softmax(logits), targets[..., None], -1)[..., 0] * mask).sum(-1)
    got = sequence_logps(mx.array(logits), mx.array(targets), mx.array(mask))
    assert np.allclose(np.array(got), expected, atol=1e-5)


def test_token_kl_is_exact_over_vocabulary_and_zero_for_equal_models():
    rng = np.random.default_rng(1)
    p, q = rng.normal(size=(2, 4, 6)), rng.normal(size=(2, 4, 6))
    mask = np.array([[1, 1, 0, 0], [0, 1, 1, 1]], dtype=np.float32)
    lp, lq = log_softmax(p), log_softmax(q)
    expected = ((np.exp(lp) * (lp - lq)).sum(-1) * mask).sum(-1)
    got = token_kl(mx.array(p, dtype=mx.float32), mx.array(q, dtype=mx.float32), mx.array(mask))
    assert np.allclose(np.array(got), expected, atol=1e-5)
    same = token_kl(mx.array(p, dtype=mx.float32), mx.array(p, dtype=mx.float32), mx.array(mask))
    assert np.abs(np.array(same)).max() < 1e-6
