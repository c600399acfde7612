"""Classification-like stages read their label from log-probabilities (issue #15 item 6).

``realign_classify`` (a task category) and ``self_instruct_classify`` (yes /
no) with ``scoring: logprobs`` score each allowed label as the continuation
after the prompt's last line (``Category:`` / ``Is it classification?``)
and take the most probable one, instead of parsing a sampled answer;
``scoring: text`` (and ``auto`` on a backend without prompt log-probs)
keeps the parse path. References: the scripted runs of
``tests/scripted_runs.py`` on the text path (the same labels must come out),
the label rule written by hand (argmax of the summed continuation
log-probs), and the requests the fake saw.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ has no __init__.py
import scripted_runs as sr

from synthfb.data import ROW_ID
from synthfb.rank.label_scores import LabelScorer


def _run(name, scoring, out, kind):
    d, fake = sr.SCRIPTED_RUNS[name]()
    if scoring:
        sr.stage_cfg(d, kind)["scoring"] = scoring
    res = sr.run(d, out, fake)
    assert res.manifest["status"] == "finished"
    [rec] = [s for s in res.manifest["stages"] if s["kind"] == kind]
    return sr.rows(out), rec, fake


def test_raw_context_that_ends_with_the_prefix_is_not_extended():
    sc = LabelScorer(["Yes", "No"], "Is it classification?", chat=False, values=[1, 0])
    [yes, no] = sc.requests("Task: x\nIs it classification?")
    assert yes.prompt == no.prompt == "Task: x\nIs it classification?"
    assert (yes.continuation, no.continuation) == (" Yes", " No")
    [one, _] = LabelScorer(["1", "2"], "Score:", chat=False).requests("Rate it.")
    assert one.prompt == "Rate it.\nScore:"  # a prompt without the prefix still gets it


def test_realign_classify_logprobs_matches_the_text_path(tmp_path):
    text_rows, text_rec, _ = _run("realign", "text", tmp_path / "text", "realign_classify")
    rows, rec, fake = _run("realign", "logprobs", tmp_path / "lp", "realign_classify")
    by_id = {r[ROW_ID]: r["category"] for r in text_rows}
    assert {r[ROW_ID]: r["category"] for r in rows} == by_id
    assert "default" in by_id.values() and len(set(by_id.values())) >= 3
    # every label read: parse rate 1.0; the text path counts the answer that named no category
    assert rec["parse"] == {"outputs": len(rows), "parsed": len(rows), "rate": 1.0}
    assert text_rec["parse"]["parsed"] == text_rec["parse"]["outputs"] - text_rec["counts"]["unknown_category"] < \
        text_rec["parse"]["outputs"]
    # one score request per category per row, the raw prompt ending with its own "Category:" line
    n_cats = len(set(r.continuation for r in fake.score_requests))
    assert n_cats == 37 and len(fake.score_requests) == n_cats * len(rows)
    for req in fake.score_requests:
        assert req.prompt.endswith("\nCategory:") and not req.prompt.endswith("Category:\nCategory:")
        assert req.continuation.startswith(" ") and " " not in req.continuation.strip()
    # category_prob: the chosen name's probability renormalised over the names (the fake: -0.01 vs the rest)
    for r in rows:
        others = [-7.0 - 0.1 * len(c) for c in {q.continuation for q in fake.score_requests}
                  if c.strip() != r["category"]]
        want = math.exp(-0.01) / (math.exp(-0.01) + sum(math.exp(x) for x in others))
        assert r["category_prob"] == pytest.approx(want, rel=1e-9)


def test_realign_classify_takes_the_argmax_by_hand(tmp_path):
    """With log-probs that favour short names (-len), the category is the shortest name (ties: list order)."""
    d, fake = sr.realign()
    sr.stage_cfg(d, "realign_classify")["scoring"] = "logprobs"
    fake.logprobs = lambda ctx, cont: -float(len(cont))
    sr.run(d, tmp_path / "run", fake)
    names = list(dict.fromkeys(q.continuation.strip() for q in fake.score_requests))
    shortest = min(names, key=len)
    assert {r["category"] for r in sr.rows(tmp_path / "run")} == {shortest}


def test_self_instruct_classify_logprobs_matches_the_text_path(tmp_path):
    script = sr.SelfInstructScript()
    d, fake = sr.self_instruct(script=script)
    sr.stage_cfg(d, "self_instruct_classify")["scoring"] = "logprobs"
    res = sr.run(d, tmp_path / "lp", fake)
    [rec] = [s for s in res.manifest["stages"] if s["kind"] == "self_instruct_classify"]
    assert rec["parse"]["rate"] == 1.0 and rec["parse"]["outputs"] > 0
    assert {q.continuation for q in fake.score_requests} == {" Yes", " No"}
    assert all(q.prompt.endswith("Task: " + q.prompt.split("Task: ")[-1].split("\n")[0] + "\nIs it classification?")
               for q in fake.score_requests)
    rows = sr.rows(tmp_path / "lp")
    modes = {r["instruction"]: r["generation_mode"] for r in rows}
    assert modes and all((m == "output_first") == script.is_clf[i] for i, m in modes.items())
    assert set(modes.values()) == {"output_first", "input_first"}


def test_text_path_stays_for_api_backends(tmp_path):
    """``auto`` on a backend without prompt log-probs (the fake's) samples and parses: no score call."""
    _, rec, fake = _run("realign", None, tmp_path / "auto", "realign_classify")
    assert fake.num_score_calls == 0 and "scored_from_logprobs" not in rec["counts"]


# -- self_curate: rating mean (G-Eval) vs mode (the one rating the curator would write) ----------------------------

FLAT = {"1": 0.19, "2": 0.11, "3": 0.18, "4": 0.24, "5": 0.28}
"""Label probabilities like SmolLM2-135M's after the curation chat turn: the top one ~0.28."""


@pytest.mark.parametrize("rating", ["mean", "mode"])
def test_self_curate_rating_mean_or_mode(tmp_path, rating):
    d, fake = sr.backtranslation()
    sr.stage_cfg(d, "self_curate").update(scoring="logprobs", rating=rating)
    fake.logprobs = lambda ctx, cont: math.log(FLAT[cont.split()[-1]])
    res = sr.run(d, tmp_path / "run", fake)
    [rec] = [s for s in res.manifest["stages"] if s["kind"] == "self_curate"]
    mean = sum(int(k) * v for k, v in FLAT.items()) / sum(FLAT.values())  # 3.31, by hand
    assert mean < 4.0  # min_score of the shipped file (A_4)
    assert rec["parse"]["rate"] == 1.0 and rec["rows_in"] > 0
    rows = sr.rows(tmp_path / "run")
    if rating == "mean":  # the expected rating is below A_4: nothing kept, every row counted as below
        assert rows == [] and rec["counts"]["dropped_below_min_score"] == rec["rows_in"]
    else:  # the most probable rating is 5 >= 4: every row kept with score 5
        assert len(rows) == rec["rows_in"] and all(r["curation_score"] == 5.0 for r in rows)
        assert all(r["curation_probs"]["5"] == pytest.approx(0.28) for r in rows)
