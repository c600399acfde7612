"""What a preference-ending stage emits (issue #15 item 1): ``emit: pairs``
(default), ``unpaired`` (TRL's unpaired format, ``prompt``/``completion``/
``label``, read by KTOTrainer) and ``ranked`` (``prompt``/``completions``/
``scores``/``ranks`` for a K-way reward model).

References are independent of the code under test: the same scripted run in
``pairs`` mode (each unpaired row pair must be that run's chosen/rejected,
each ranked row's best/worst must be its chosen/rejected and its scores its
``all_scores``), the scripted judges' hand-set qualities, and the rank rule
written out (rank 1 = best, a tie shares the best rank of its group). The
KTO step (TRL 1.16 ``KTOTrainer`` on the unpaired rows unchanged) is in
``tests/test_every_pipeline_trains.py``.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ has no __init__.py
import scripted_runs as sr

from synthfb.data import ROW_ID
from synthfb.data.trl import ranks_of, trl_ranked, trl_unpaired
from synthfb.engine import Pipeline

KINDS = {"judge_pairs": "judge_pairs", "onpolicy_pairs": "onpolicy_pairs", "cai_preferences": "cai_label"}


def _run(name: str, emit: str | None, out: Path) -> list[dict]:
    d, fake = sr.SCRIPTED_RUNS[name]()
    if emit is not None:
        sr.stage_cfg(d, KINDS[name])["emit"] = emit
    res = sr.run(d, out, fake)
    assert res.manifest["status"] == "finished"
    return sr.rows(out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cache: dict[tuple[str, str | None], list[dict]] = {}

    def get(name: str, emit: str | None) -> list[dict]:
        if (name, emit) not in cache:
            cache[name, emit] = _run(name, emit, tmp_path_factory.mktemp(f"{name}-{emit}") / "run")
        return cache[name, emit]

    return get


def _source_id(row_id: str) -> str:
    return row_id.rsplit("/", 1)[0]


def _text(msgs) -> str:
    return msgs if isinstance(msgs, str) else msgs[-1]["content"]


# -- the helpers --------------------------------------------------------------------------------------------------

def test_ranks_of_by_hand():
    assert ranks_of([3.0, 5.0, 3.0, -1.0]) == [2, 1, 2, 4]
    assert ranks_of([0.5, 0.5]) == [1, 1]
    assert ranks_of([1.0, 2.0, 3.0]) == [3, 2, 1]
    with pytest.raises(ValueError, match="NaN"):
        ranks_of([1.0, math.nan])


def test_trl_unpaired_and_ranked_shapes():
    kto = trl_unpaired("Q?", "good", "bad", "conversational", system="Be brief.")
    assert kto == [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q?"}],
                    "completion": [{"role": "assistant", "content": "good"}], "label": True},
                   {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q?"}],
                    "completion": [{"role": "assistant", "content": "bad"}], "label": False}]
    assert trl_unpaired("Q?", "good", "bad", "standard") == [
        {"prompt": "Q?", "completion": "good", "label": True}, {"prompt": "Q?", "completion": "bad", "label": False}]
    r = trl_ranked("Q?", ["a", "b", "c"], [1, 3, 1], "standard")
    assert r == {"prompt": "Q?", "completions": ["a", "b", "c"], "scores": [1.0, 3.0, 1.0], "ranks": [2, 1, 2]}
    r = trl_ranked("Q?", ["a", "b"], [0.0, 1.0])
    assert r["completions"] == [[{"role": "assistant", "content": "a"}], [{"role": "assistant", "content": "b"}]]
    with pytest.raises(ValueError, match="one score each"):
        trl_ranked("Q?", ["a", "b"], [1.0])


@pytest.mark.parametrize("name", list(KINDS))
def test_emit_declares_its_columns(name):
    d, _ = sr.SCRIPTED_RUNS[name]()
    modes = ("pairs", "unpaired") if name == "cai_preferences" else ("pairs", "unpaired", "ranked")
    for emit in modes:
        sr.stage_cfg(d, KINDS[name])["emit"] = emit
        p = Pipeline.from_dict(d, sr.PIPELINES, source=name)
        cols: list[str] = []
        for st in p.stages:
            cols = st.output_columns(cols)
        want = {"pairs": {"prompt", "chosen", "rejected"}, "unpaired": {"prompt", "completion", "label"},
                "ranked": {"prompt", "completions", "scores", "ranks"}}[emit]
        assert want <= set(cols), (emit, cols)
        others = {"pairs": {"completion", "label", "completions", "ranks"},
                  "unpaired": {"chosen", "rejected", "completions", "ranks", "score_margin"},
                  "ranked": {"chosen", "rejected", "completion", "label", "score_margin"}}[emit]
        assert not others & set(cols), (emit, sorted(others & set(cols)))


def test_cai_label_refuses_ranked():
    d, _ = sr.SCRIPTED_RUNS["cai_preferences"]()
    sr.stage_cfg(d, "cai_label")["emit"] = "ranked"
    with pytest.raises(Exception, match="emit"):
        Pipeline.from_dict(d, sr.PIPELINES, source="cai_preferences")


# -- unpaired: two rows per pair, the pair's chosen (true) and rejected (false) ------------------------------------

@pytest.mark.parametrize("name", list(KINDS))
def test_unpaired_rows_are_the_pairs_split(runs, name):
    pairs, unpaired = runs(name, None), runs(name, "unpaired")
    assert pairs and len(unpaired) == 2 * len(pairs)
    by_id: dict[str, list[dict]] = {}
    for r in unpaired:
        assert isinstance(r["label"], bool)
        by_id.setdefault(_source_id(r[ROW_ID]), []).append(r)
    assert set(by_id) == {p[ROW_ID] for p in pairs}
    for p in pairs:
        good, bad = sorted(by_id[p[ROW_ID]], key=lambda r: not r["label"])
        assert (good["label"], bad["label"]) == (True, False)
        assert good["prompt"] == bad["prompt"] == p["prompt"]
        assert good["completion"] == p["chosen"] and bad["completion"] == p["rejected"]
        assert good["score"] == pytest.approx(p["score_chosen"]) and bad["score"] == pytest.approx(p["score_rejected"])
        assert good["score"] > bad["score"]


# -- ranked: every scored candidate, ranks agree with scores ------------------------------------------------------

@pytest.mark.parametrize("name", ["judge_pairs", "onpolicy_pairs"])
def test_ranked_rows_ranks_agree_with_scores(runs, name):
    pairs, ranked = runs(name, None), runs(name, "ranked")
    assert [r[ROW_ID] for r in ranked] == [p[ROW_ID] for p in pairs]
    for p, r in zip(pairs, ranked):
        k = len(r["completions"])
        assert k >= 2 and len(r["scores"]) == len(r["ranks"]) == k
        assert r["prompt"] == p["prompt"]
        for i in range(k):
            for j in range(k):  # the rank order is the score order, ties share a rank
                assert (r["scores"][i] > r["scores"][j]) == (r["ranks"][i] < r["ranks"][j])
                assert (r["scores"][i] == r["scores"][j]) == (r["ranks"][i] == r["ranks"][j])
        assert min(r["ranks"]) == 1
        best = [c for c, rk in zip(r["completions"], r["ranks"]) if rk == 1]
        worst = [c for c, rk in zip(r["completions"], r["ranks"]) if rk == max(r["ranks"])]
        assert p["chosen"] in best and p["rejected"] in worst
        assert max(r["scores"]) == pytest.approx(p["score_chosen"])
        assert min(r["scores"]) == pytest.approx(p["score_rejected"])
        assert type(r["completions"][0]) is type(p["chosen"])  # each completion has the form of `chosen`


def test_ranked_onpolicy_follows_the_scripted_quality(runs):
    """The A/B judge prefers the higher hand-set quality: ranks are the qualities' order."""
    for r in runs("onpolicy_pairs", "ranked"):
        q = [sr.quality(_text(c)) for c in r["completions"]]
        assert r["ranks"] == [1 + sum(o > v for o in q) for v in q]


def test_ranked_judge_leaves_out_unscored_candidates(runs):
    """judge_pairs ranks the candidates that got a score; their scores are the parsed judgements' means."""
    for r in runs("judge_pairs", "ranked"):
        texts = [_text(c) for c in r["completions"]]
        assert set(texts) <= set(sr.CANDIDATES)
        for t, s in zip(texts, r["scores"]):
            vals = [float(x.split("Score: ")[1]) for x in ([sr.JUDGEMENTS[t]] if isinstance(sr.JUDGEMENTS[t], str)
                                                             else sr.JUDGEMENTS[t])
                    if "Score: " in x and 0 <= float(x.split("Score: ")[1]) <= 5]
            assert s == pytest.approx(sum(vals) / len(vals))
