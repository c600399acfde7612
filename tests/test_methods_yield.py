"""bench/methods_yield.py and its table: every stage of the issue-14 pipelines gets figures.

The scripted runs of ``tests/scripted_runs.py`` (fake model, no engine) go
through the bench's ``stage_line``: no model stage of these pipelines may
print '?' (no parse figure), and the figures the new stages record
(``outputs`` / ``parsed`` in their counts, the run record's ``parse``) are
checked against what the fake was scripted to answer.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ has no __init__.py
import scripted_runs
from scripted_runs import run

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name: str):
    env = dict(os.environ)  # the bench sets engine variables on import; keep them out of this session
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))
        os.environ.clear()
        os.environ.update(env)


Y = _load("default_model_yield")
M = _load("methods_yield")


def _columns(line: str) -> list[str]:
    # pipeline, stage, rows in, outputs, parsed, rate, kept, src
    return line.split()[:8]


def test_every_method_pipeline_is_shipped_and_scripted():
    for name in M.METHODS:
        assert (Y.PIPELINES / f"{name}.yaml").is_file() and name in scripted_runs.SCRIPTED_RUNS


@pytest.mark.parametrize("name", M.METHODS)
def test_every_stage_prints_figures(tmp_path, name):
    d, fake = scripted_runs.SCRIPTED_RUNS[name]()
    res = run(d, tmp_path / "run", fake)
    assert res.num_rows > 0
    for rec in res.manifest["stages"]:
        line, rate = Y.stage_line(name, rec)
        cols = _columns(line)
        assert cols[:3] == [name, rec["kind"], str(rec["rows_in"])] and cols[6] == str(rec["rows_out"])
        if rec.get("model"):
            assert "?" not in cols, line  # a model stage without outputs/parsed figures
            assert rate is not None and 0 < rate <= 1
        else:
            assert cols[3:6] == ["-", "-", "-"] and rate is None


def _parse(tmp_path, name: str) -> dict[str, dict]:
    d, fake = scripted_runs.SCRIPTED_RUNS[name]()
    res = run(d, tmp_path / "run", fake)
    return {r["kind"]: r for r in res.manifest["stages"]}


def test_consistency_records_its_parse_figure(tmp_path):
    # 7 problems x 2 replies; problem 5's reply has no program (unparsed); problem 4's program raises
    # (parsed: a drop) and problem 2's text answer disagrees (parsed: a drop)
    rec = _parse(tmp_path, "consistency")["consistency"]
    assert rec["parse"] == {"outputs": 14, "parsed": 13, "rate": round(13 / 14, 4)}
    assert Y.figures(rec) == (14, 13, "stage")


def test_kpdds_stages_record_their_parse_figures(tmp_path):
    st = _parse(tmp_path, "kpdds")
    seeds = st["load"]["rows_out"]
    # extraction: one seed's answer is not JSON
    assert st["kpdds_extract"]["parse"]["outputs"] == seeds and st["kpdds_extract"]["parse"]["parsed"] == seeds - 1
    # questions: every fifth scripted answer has no <Q> tags (6 questions wanted, 4 per step: 4 + 2 + 1 asked)
    assert (st["kpdds_questions"]["parse"]["outputs"], st["kpdds_questions"]["parse"]["parsed"]) == (7, 6)
    assert st["kpdds_questions"]["rows_out"] == 6
    # scores all read; question 1 scored 0.5 is a drop (threshold), not a parse failure
    assert (st["kpdds_score"]["parse"]["outputs"], st["kpdds_score"]["parse"]["parsed"]) == (6, 6)
    # 10 solutions per kept question, all with an answer; the arithmetic error is a filter
    n = st["kpdds_score"]["rows_out"]
    assert (st["kpdds_solve"]["parse"]["outputs"], st["kpdds_solve"]["parse"]["parsed"]) == (10 * n, 10 * n)
    assert st["kpdds_solve"]["counts"]["solutions_with_arithmetic_error"] == n


def test_rso_and_best_of_n_record_their_parse_figures(tmp_path):
    rso = _parse(tmp_path / "rso", "rso_pairs")
    prompts = rso["load"]["rows_out"]
    assert rso["rso_pairs"]["parse"] == {"outputs": 8 * prompts, "parsed": 8 * prompts, "rate": 1.0}
    bon = _parse(tmp_path / "bon", "best_of_n")
    prompts = bon["load"]["rows_out"]
    # text scoring on the fake: 3 judgements per sample; none of the password prompt's 8 x 3 parse
    assert bon["best_of_n"]["parse"]["outputs"] == 8 * 3 * prompts
    assert bon["best_of_n"]["parse"]["parsed"] == 8 * 3 * (prompts - 1)


def test_small_shrinks_the_kpdds_questions_target():
    pipe = Y.small(Y.PIPELINES / "kpdds.yaml", 2)
    [q] = [s for s in pipe.stages if s.kind == "kpdds_questions"]
    assert (q.config.num_questions, q.config.questions_per_step, q.config.max_steps) == (2, 2, 3)
    assert pipe.stages[0].config.limit is None  # the whole seed pool builds the co-occurrence matrix


def test_a_model_stage_that_got_no_rows_shows_zero_outputs():
    rec = {"kind": "kpdds_score", "model": {"name": "default"}, "rows_in": 0, "rows_out": 0, "counts": {},
           "parse": None, "failures": []}
    line, rate = Y.stage_line("kpdds", rec)
    assert _columns(line)[2:7] == ["0", "0", "0", "n/a", "0"] and rate is None
    rec["rows_in"] = 3  # rows, but no figure: unknown
    assert _columns(Y.stage_line("kpdds", rec)[0])[3:6] == ["?", "?", "?"]
