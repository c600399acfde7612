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
