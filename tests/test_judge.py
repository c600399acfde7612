"""Self-Rewarding additive judge: score parsing, averaging, pairs."""

from __future__ import annotations

import json
import math

import pytest

from synthfb.engine import Pipeline, run_pipeline
from synthfb.stages.judge import mean_scores, parse_score


@pytest.mark.parametrize("text,want", [
    ("Relevant and useful. Score: 4", (4.0, None)),
    ("Score: 2 for now... after more thought, Score: 5", (5.0, None)),
    ("**Score:** 3.5", (3.5, None)),
    ("score = 4/5", (4.0, None)),
    ("Final SCORE:3", (3.0, None)),
    ("Score: 7", (None, "out_of_range")),
    ("I would give it four points.", (None, "no_score")),
    ("Score: four", (None, "no_score")),
    ("", (None, "no_score")),
    (None, (None, "no_score")),
])
def test_parse_score(text, want):
    assert parse_score(text) == want


def test_mean_scores_hand_computed():
    scores, parsed, counts = mean_scores([
        ["Score: 4", "Score: 5", "junk"],   # mean of the two that parse
        ["Score: 2", "Score: 2", "Score: 3"],
        None,                               # request failed
        ["nothing", "Score: 9"],            # nothing usable
    ])
    assert scores[:2] == [4.5, pytest.approx(7 / 3)]
    assert math.isnan(scores[2]) and math.isnan(scores[3])
    assert parsed == [2, 3, 0, 0]
    assert counts == {"judgements": 8, "unparseable_judgements_no_score": 2,
                      "unparseable_judgements_out_of_range": 1, "unscored_candidates": 2}


@pytest.mark.timeout(600)
def test_judge_pairs_on_tiny_counts_unparseable(tmp_path, vllm_tiny):
    """The text path (`scoring: text`, as for API models): the random tiny model never
    writes "Score: N", every judgement is counted as unparseable, no prompt yields a
    pair, and nothing crashes or retries."""
    data = tmp_path / "c.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"Question {i}?",
                                        "responses": ["one", "two", "three"]}) + "\n" for i in range(3)))
    pipe = Pipeline.from_dict({"name": "judge", "stages": [
        {"stage": "load", "path": str(data), "id_column": "id"},
        {"stage": "judge_pairs", "scoring": "text", "samples": 2, "sampling": {"max_tokens": 12}}]}, tmp_path)
    res = run_pipeline(pipe, tmp_path / "out", generators={"default": vllm_tiny}, progress=False)
    counts = res.manifest["stages"][-1]["counts"]
    assert res.num_rows == 0
    assert counts["judgements"] == 3 * 3 * 2
    unparseable = sum(v for k, v in counts.items() if k.startswith("unparseable_judgements_"))
    assert unparseable == counts["judgements"]
    assert counts["unscored_candidates"] == 9 and counts["dropped_too_few_scored"] == 3


def test_judge_config_errors(tmp_path):
    data = tmp_path / "c.jsonl"
    data.write_text(json.dumps({"prompt": "q", "responses": ["a", "b"]}) + "\n")
    with pytest.raises(ValueError, match="min_scored"):
        Pipeline.from_dict({"name": "j", "stages": [{"stage": "load", "path": str(data)},
                                                    {"stage": "judge_pairs", "min_scored": 1}]}, tmp_path)
