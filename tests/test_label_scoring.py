"""Scores read from label log-probabilities (G-Eval): the shared math, and the
log-prob paths of judge_pairs and self_curate on the scripted fake model,
checked against hand computations."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import datasets
import pytest

from synthfb.engine import Pipeline, run_pipeline
from synthfb.engine.runner import parse_rate
from synthfb.llm.types import ScoreResult
from synthfb.rank.label_scores import LabelScorer, expected_value, normalise, resolve_scoring

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ has no __init__.py
from fakes import FakeGenerator  # noqa: E402


def _log(p: float) -> float:
    return math.log(p) if p > 0 else -math.inf


# -- the shared math --------------------------------------------------------------------------------------

def test_geval_unit_from_the_spec():
    """specs/methods-2.md 9.4: {1: .05, 2: .10, 3: .50, 4: .30, 5: .05} -> 3.20, and still 3.20 with 10% of
    the mass leaked to other tokens (renormalised over the labels)."""
    probs = [0.05, 0.10, 0.50, 0.30, 0.05]
    sc = LabelScorer(["1", "2", "3", "4", "5"])
    for scale in (1.0, 0.9):
        got = sc.read([math.log(p * scale) for p in probs])
        assert got.score == pytest.approx(3.20)
        assert list(got.probs.values()) == pytest.approx(probs)
        assert got.mass == pytest.approx(scale)
        assert got.top == 3.0 and got.ok
    assert expected_value(probs, [1, 2, 3, 4, 5]) == pytest.approx(3.20)


def test_normalise_is_stable_and_handles_no_mass():
    assert normalise([-1000.0, -1000.0 + math.log(3)]) == pytest.approx([0.25, 0.75])  # no underflow
    assert normalise([0.0, -math.inf]) == [1.0, 0.0]
    assert all(math.isnan(x) for x in normalise([-math.inf, -math.inf]))
    got = LabelScorer(["0", "1"]).read([ScoreResult(-math.inf, [-math.inf])] * 2)
    assert not got.ok and math.isnan(got.score)


def test_continuations_and_contexts():
    chat = LabelScorer(["1", "2"], "Score:", chat=True)
    assert chat.continuations() == ["Score: 1", "Score: 2"]
    [a, b] = chat.requests("Rate this.")
    assert a.messages == [{"role": "user", "content": "Rate this."}] and a.prompt is None
    assert (a.continuation, b.continuation) == ("Score: 1", "Score: 2")
    raw = LabelScorer(["1", "2"], "Score:", chat=False)
    [a, b] = raw.requests("Rate this.")
    assert a.prompt == "Rate this.\nScore:" and a.messages is None
    assert (a.continuation, b.continuation) == (" 1", " 2")
    with pytest.raises(ValueError, match="distinct"):
        LabelScorer(["1", "1"])
    with pytest.raises(ValueError, match="not numbers"):
        LabelScorer(["good", "bad"])


def test_resolve_scoring():
    assert resolve_scoring("auto", "vllm") == resolve_scoring("auto", "transformers") == "logprobs"
    assert resolve_scoring("auto", "openai") == resolve_scoring("auto", "fake") == "text"
    assert resolve_scoring("logprobs", "openai") == "logprobs" and resolve_scoring("text", "vllm") == "text"
    with pytest.raises(ValueError, match="scoring"):
        resolve_scoring("sometimes", "vllm")


def test_parse_rate_record():
    assert parse_rate({"outputs": 8, "parsed": 6, "dropped_x": 1}) == {"outputs": 8, "parsed": 6, "rate": 0.75}
    assert parse_rate({"outputs": 0}) == {"outputs": 0, "parsed": 0, "rate": None}
    assert parse_rate({"dropped_x": 1}) is None


# -- judge_pairs on log-probs -------------------------------------------------------------------------------

# probabilities of the totals 0..5 per candidate; A leaks half its mass to other tokens
JUDGE_P = {"Answer A.": [0.0, 0.0, 0.05, 0.10, 0.15, 0.20],   # renormalised: .1 .2 .3 .4 -> 4.0
           "Answer B.": [0.1, 0.2, 0.4, 0.2, 0.1, 0.0],      # 0.2 + 0.8 + 0.6 + 0.4 -> 2.0
           "Answer C.": [0.05] * 6}                          # uniform -> 2.5


def _judge_logprob(context, continuation):
    [msg] = context
    resp = re.findall(r"<response>(.*?)</response>", msg["content"], re.DOTALL)[-1]
    m = re.fullmatch(r"Score: ([0-5])", continuation)
    assert m, continuation
    return _log(JUDGE_P[resp][int(m.group(1))])


def _judge_run(tmp_path, fake, rows=3, **cfg):
    data = tmp_path / "c.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"Question {i}?",
                                        "responses": ["Answer A.", "Answer B.", "Answer C."]}) + "\n"
                            for i in range(rows)))
    pipe = Pipeline.from_dict({"name": "judge", "chunk_size": 2, "stages": [
        {"stage": "load", "path": str(data), "id_column": "id"}, {"stage": "judge_pairs", **cfg}]}, tmp_path)
    return run_pipeline(pipe, tmp_path / "out", generators={"default": fake}, progress=False)


def test_judge_pairs_logprobs_hand_computed(tmp_path):
    fake = FakeGenerator(backend="vllm", logprobs=_judge_logprob)  # auto -> logprobs on a local engine
    res = _judge_run(tmp_path, fake)
    assert fake.num_generate_calls == 0
    assert fake.num_score_calls == 2  # one batched call per chunk (chunk_size 2, 3 rows)
    assert [len(c) for c in fake.score_calls] == [2 * 3 * 6, 1 * 3 * 6]
    req = fake.score_requests[0]
    assert [r.continuation for r in fake.score_requests[:6]] == [f"Score: {k}" for k in range(6)]
    text = req.messages[0]["content"]
    assert text.endswith('give your total on a line of the form "Score: <total points>".')
    assert "justify" not in text
    rec = res.manifest["stages"][-1]
    assert rec["counts"]["judgements"] == rec["counts"]["outputs"] == rec["counts"]["parsed"] == 9
    assert rec["counts"]["scored_from_logprobs"] == 9
    assert rec["parse"] == {"outputs": 9, "parsed": 9, "rate": 1.0}
    ds = datasets.load_from_disk(str(res.dataset_dir))
    assert len(ds) == 3
    for r in ds:
        assert r["all_scores"] == pytest.approx([4.0, 2.0, 2.5])
        assert (r["score_chosen"], r["score_rejected"]) == (pytest.approx(4.0), pytest.approx(2.0))
        assert r["score_margin"] == pytest.approx(2.0)
        assert r["chosen"][0]["content"] == "Answer A." and r["rejected"][0]["content"] == "Answer B."
        assert r["judgements_parsed"] == [1, 1, 1]
        pa = r["score_probs"][0]
        assert [pa[str(k)] for k in range(6)] == pytest.approx([0, 0, 0.1, 0.2, 0.3, 0.4])
        assert r["provenance"][-1]["sampling"] == json.dumps(
            {"frequency_penalty": 0.0, "max_tokens": 1, "n": 1, "presence_penalty": 0.0, "seed": None, "stop": [],
             "temperature": 0.0, "top_p": 1.0}, sort_keys=True)
    card = (res.out_dir / "README.md").read_text()
    assert "- stage 1 `judge_pairs`: 9 of 9 parsed (100.0%), scores read from log-probabilities" in card


def test_judge_pairs_logprobs_raw_prompt_and_ties(tmp_path):
    """chat: false scores " N" after "...\\nScore:"; equal expected scores are a tie and dropped."""
    def lp(context, continuation):
        assert isinstance(context, str) and context.endswith("\nScore:")
        assert re.fullmatch(r" [0-5]", continuation)
        return -1.0  # every candidate uniform: 2.5 each
    fake = FakeGenerator(backend="vllm", logprobs=lp)
    res = _judge_run(tmp_path, fake, rows=2, chat=False)
    rec = res.manifest["stages"][-1]
    assert res.num_rows == 0 and rec["counts"]["dropped_tie"] == 2
    assert rec["parse"]["rate"] == 1.0


def test_judge_pairs_text_path_is_kept(tmp_path):
    """scoring: text samples judgements and parses them even on a local engine (and auto does so on API
    backends); no score call is made."""
    def judge(req, k):
        resp = re.findall(r"<response>(.*?)</response>", req.messages[0]["content"])[-1]
        return {"Answer A.": "Good.\nScore: 5", "Answer B.": "Score: 1", "Answer C.": "no score"}[resp]
    for backend, cfg in (("vllm", {"scoring": "text"}), ("openai", {})):
        fake = FakeGenerator(judge, backend=backend)
        (tmp_path / backend).mkdir()
        res = _judge_run(tmp_path / backend, fake, rows=2, samples=2, **cfg)
        rec = res.manifest["stages"][-1]
        assert fake.num_score_calls == 0 and rec["counts"]["judgements"] == 2 * 3 * 2
        assert rec["parse"] == {"outputs": 12, "parsed": 8, "rate": round(8 / 12, 4)}
        ds = datasets.load_from_disk(str(res.dataset_dir))
        assert "score_probs" not in ds.column_names
        assert [r["all_scores"] for r in ds] == [[5.0, 1.0, None]] * 2


# -- self_curate on log-probs -------------------------------------------------------------------------------

# probabilities of the ratings 1..5 per answer
CURATE_P = {"Answer one.": [0.0, 0.0, 0.1, 0.5, 0.4],     # 0.3 + 2.0 + 2.0 = 4.3, most probable 4
            "Answer two.": [0.02] * 5,                    # 10% of the mass, uniform: 3.0
            "Answer three.": [0.0, 0.0, 0.0, 0.4, 0.6]}   # 1.6 + 3.0 = 4.6, most probable 5


def _curate_run(tmp_path, fake, **cfg):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"id": f"r{i}", "instruction": f"Do task {i}.", "output": out}) + "\n"
                            for i, out in enumerate(CURATE_P)))
    pipe = Pipeline.from_dict({"name": "cur", "stages": [
        {"stage": "load", "path": str(data), "id_column": "id"}, {"stage": "self_curate", **cfg}]}, tmp_path)
    return run_pipeline(pipe, tmp_path / "out", generators={"default": fake}, progress=False)


def _answer(text: str) -> str:
    return re.findall(r"Answer: (.*?)(?:\n|$)", text)[-1]


def test_self_curate_logprobs_completion_mode(tmp_path):
    seen = []

    def lp(context, continuation):
        assert isinstance(context, str) and context.endswith("\n\nRate the answer with a whole number from 1 to 5."
                                                             "\nScore:")
        m = re.fullmatch(r" ([1-5])", continuation)
        assert m, continuation
        seen.append(continuation)
        return _log(CURATE_P[_answer(context)][int(m.group(1)) - 1])

    fake = FakeGenerator(backend="vllm", logprobs=lp)
    res = _curate_run(tmp_path, fake, chat=False, prefill="Score:", num_ratings=3, min_score=4.0)
    assert fake.num_generate_calls == 0 and fake.num_score_calls == 1 and len(seen) == 3 * 5
    rec = res.manifest["stages"][-1]
    cc = rec["counts"]
    assert (cc["ratings"], cc["outputs"], cc["parsed"], cc["scored_from_logprobs"]) == (3, 3, 3, 3)
    assert (cc["rating_4"], cc["rating_5"], cc["rating_1"]) == (1, 1, 1)  # most probable rating (uniform: the first)
    assert cc["dropped_below_min_score"] == 1 and cc["kept"] == 2
    assert rec["parse"]["rate"] == 1.0
    out = {r["row_id"]: r for r in datasets.load_from_disk(str(res.dataset_dir))}
    assert sorted(out) == ["r0", "r2"]  # 4.3 and 4.6 >= 4.0; 3.0 dropped
    assert out["r0"]["curation_score"] == pytest.approx(4.3) and out["r0"]["curation_ratings"] == [4]
    assert out["r2"]["curation_score"] == pytest.approx(4.6) and out["r2"]["curation_ratings"] == [5]
    assert [out["r2"]["curation_probs"][str(k)] for k in range(1, 6)] == pytest.approx([0, 0, 0, 0.4, 0.6])


def test_self_curate_logprobs_chat_and_the_default_threshold(tmp_path):
    """Chat mode scores "Score: N" after a score-only prompt; the default min_score 4.5 (the paper's A_5,
    "score >= 4.5") keeps only the 4.6 row."""
    def lp(context, continuation):
        [msg] = context
        assert 'Write the rating as "Score: <rating>"' in msg["content"] and "First explain" not in msg["content"]
        m = re.fullmatch(r"Score: ([1-5])", continuation)
        assert m, continuation
        return _log(CURATE_P[_answer(msg["content"])][int(m.group(1)) - 1])

    fake = FakeGenerator(backend="transformers", logprobs=lp)
    res = _curate_run(tmp_path, fake)
    out = datasets.load_from_disk(str(res.dataset_dir))
    assert out["row_id"] == ["r2"] and out["curation_score"] == [pytest.approx(4.6)]
    assert res.manifest["stages"][-1]["counts"]["dropped_below_min_score"] == 2


def test_self_curate_text_path_is_kept(tmp_path):
    fake = FakeGenerator(lambda req, k: ["Score: 5", "Score: 10"][k], backend="vllm")
    res = _curate_run(tmp_path, fake, scoring="text", num_ratings=2)
    rec = res.manifest["stages"][-1]
    assert fake.num_score_calls == 0
    assert rec["parse"] == {"outputs": 6, "parsed": 3, "rate": 0.5}
    ds = datasets.load_from_disk(str(res.dataset_dir))
    assert "curation_probs" not in ds.column_names
    assert ds["curation_ratings"] == [[5, None]] * 3 and ds["curation_score"] == [5.0] * 3


def test_scoring_option_is_checked(tmp_path):
    from synthfb.engine.stage import stage_kinds

    for kind in ("judge_pairs", "self_curate"):
        with pytest.raises(ValueError, match="scoring"):
            stage_kinds()[kind].from_dict({"scoring": "maybe"}, tmp_path)
