"""Preference gap from annotation scores and from model reward margins."""
import json
import math

import pytest

from mlx_dpo.data.gap import AnnotationGap, ModelGap, ScoresError, parse_scale
from mlx_dpo.errors import UserError


def test_annotation_gap_arithmetic():
    """Scale 1-10 (width 9): (10 - 1) / 9 = 1.0, (7 - 4) / 9 = 1/3, (3 - 6) / 9 = -1/3.
    Mean = (1 + 1/3 - 1/3) / 3 = 1/3; one pair is inverted."""
    gap = AnnotationGap((1, 10))
    for line, (c, r) in enumerate([(10, 1), (7, 4), (3, 6)], start=1):
        gap.add({"score_chosen": c, "score_rejected": r}, line)
    assert gap.stats.average == pytest.approx(1 / 3)
    assert (gap.stats.inverted, gap.stats.ties, gap.stats.unscored) == (1, 0, 0)


def test_average_is_floored_at_zero_and_nan_without_scores():
    gap = AnnotationGap((0, 1))
    gap.add({"score_chosen": 0.2, "score_rejected": 0.9}, 1)  # -0.7
    assert gap.stats.average == 0.0
    empty = AnnotationGap()
    empty.add({"other": 1}, 1)
    assert math.isnan(empty.stats.average) and not empty.stats.available and empty.stats.unscored == 1


@pytest.mark.parametrize("extra, reason", [
    ({"score_chosen": 5}, "has score_chosen but not its partner"),
    ({"score_chosen": "9", "score_rejected": 1}, "must be finite numbers"),
    ({"score_chosen": True, "score_rejected": 1}, "must be finite numbers"),
    ({"score_chosen": float("nan"), "score_rejected": 1}, "must be finite numbers"),
    ({"score_chosen": 10 ** 400, "score_rejected": 1}, "must be finite numbers"),
    ({"score_chosen": 11, "score_rejected": 1}, "outside the declared scale 1-10"),
])
def test_unusable_scores_are_reported_with_their_line(extra, reason):
    gap = AnnotationGap((1, 10))
    gap.add(extra, 7)
    [(line, message)] = gap.stats.problems
    assert line == 7 and reason in message
    assert not gap.stats.available


@pytest.mark.parametrize("text, scale", [("1:10", (1, 10)), ("0-1", (0, 1)), ("-5:5", (-5, 5)), ("0,100", (0, 100))])
def test_parse_scale(text, scale):
    assert parse_scale(text) == scale


@pytest.mark.parametrize("text", ["10:1", "a:b", "5", "1:inf"])
def test_parse_scale_rejects(text):
    with pytest.raises(UserError, match="score scale"):
        parse_scale(text)


def test_model_gap_is_tanh_of_half_margin(tmp_path):
    """Bradley-Terry: P(chosen wins) = sigmoid(m); gap = 2 sigmoid(m) - 1 = tanh(m / 2).
    Margins 2 and 0: (tanh(1) + 0) / 2 = 0.3808."""
    path = tmp_path / "scores.jsonl"
    path.write_text(json.dumps({"id": "aa", "reward_margin": 2.0}) + "\n"
                    + json.dumps({"id": "bb", "reward_chosen": 0.5, "reward_rejected": 0.5}) + "\n")
    gap = ModelGap(path)
    gap.add("aa", 1)
    gap.add("bb", 2)
    gap.add("cc", 3)  # not in the file
    assert gap.stats.average == pytest.approx(math.tanh(1.0) / 2)
    assert gap.stats.unscored == 1 and gap.stats.ties == 1


def test_model_gap_matches_by_line_without_ids(tmp_path):
    path = tmp_path / "scores.jsonl"
    path.write_text(json.dumps({"line": 4, "reward_margin": -1.0}) + "\n")
    gap = ModelGap(path)
    gap.add("whatever", 4)
    assert gap.stats.gaps == [pytest.approx(math.tanh(-0.5))] and gap.stats.inverted == 1


@pytest.mark.parametrize("content, message", [
    ('{"id": "a", "logp_chosen": -3, "logp_rejected": -4}\n', "no reward margin.*--reference"),
    ("not json\n", r"scores\.jsonl:1: not valid JSON"),
    ('{"reward_margin": 1}\n', "needs an `id`"),
    ("\n", "no scores"),
])
def test_bad_scores_files(tmp_path, content, message):
    path = tmp_path / "scores.jsonl"
    path.write_text(content)
    with pytest.raises(ScoresError, match=message):
        ModelGap(path)
    with pytest.raises(ScoresError, match="not found"):
        ModelGap(tmp_path / "missing.jsonl")
