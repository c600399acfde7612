"""Answer extraction (Kojima et al. 2022): a finished maths solution without a readable final answer gets a
second, greedy prompt asking for the number alone; kpdds_solve and consistency use it (issue 15: the default
model often ends a solution without the asked answer line)."""

from __future__ import annotations

import copy
import re

import pytest

import scripted_runs
from fakes import FakeGenerator, Reply, last_user
from scripted_runs import _problem, consistency_answers, rows, run, stage_cfg

from synthfb.llm.types import Completion, GenerationRequest, SamplingParams
from synthfb.stages import answer_extraction as ax


def _comp(text: str, parsed=None) -> Completion:
    return Completion(text=text, finish_reason="stop", num_tokens=1, parsed=parsed)


def test_read_extracted_numbers_json_and_text():
    assert ax.read_extracted(_comp('{"answer": 333}', {"answer": 333})) == "333"
    assert ax.read_extracted(_comp('{"answer": 2.50}', {"answer": 2.5})) == "2.5"
    assert ax.read_extracted(_comp('{"answer": 1e20}', {"answer": 1e20})) == "1e+20"
    assert ax.read_extracted(_comp('{"answer": "x"}', {"answer": "x"})) is None
    assert ax.read_extracted(_comp('{"answer": "-12.50"}', {"answer": "-12.50"})) == "-12.5"
    assert ax.read_extracted(_comp('{"answer": "0042"}', {"answer": "0042"})) == "42"
    for written, want in [("123456789012.1234567891", "123456789012.1234567891"), ("-0.000", "0"), ("-0.50", "-0.5"),
                          ("7.0", "7"), ("000", "0")]:  # the digits as written, no float rounding
        assert ax.read_extracted(_comp('{"answer": "%s"}' % written, {"answer": written})) == want
    # a JSON reply cut at max_tokens gives no answer, whatever digits it holds; broken JSON gives none either
    cut = Completion(text='{"answer": "12345', finish_reason="length", num_tokens=24)
    assert ax.read_extracted(cut) is None and ax.read_extracted(_comp('{"answer": 12')) is None
    # free text is read by its first number even when the model talked on past max_tokens (as Kojima et al.)
    assert ax.read_extracted(Completion(text="12. Because first we add", finish_reason="length", num_tokens=24)) == "12"
    # LaTeX, exponents, ratios, signs, percentages: a number standing alone, or none
    for text, want in [("\\frac{3}{4}", "3/4"), ("\\boxed{\\frac{3}{4}}", "3/4"), ("so \\boxed{12} apples", "12"),
                       ("2^{10}", None), ("1e-3", "1e-3"), ("n/2", None), ("50%", "50%"), ("\u22127", "-7"),
                       ("x_1 = 4", "4"), ("It is 5, not 6", "5")]:
        assert ax.read_extracted(_comp(text)) == want, text
    # only a finished reply that computes something is followed up
    assert ax.needs_extraction(_comp("so it is 4 apples")) and not ax.needs_extraction(_comp(""))
    assert not ax.needs_extraction(_comp("I do not know.")) and not ax.needs_extraction(
        Completion(text="4 + 4 = 8 and", finish_reason="length", num_tokens=9))
    assert ax.read_extracted(_comp('{"answer": true}', {"answer": True})) is None
    assert ax.read_extracted(_comp("The answer is 1,250 dollars.")) == "1250"
    assert ax.read_extracted(_comp(" -3.5")) == "-3.5"
    assert ax.read_extracted(_comp('{"answer": "0.1666666667"}', {"answer": "0.1666666667"})) == "0.1666666667"
    assert ax.read_extracted(_comp(" 3/4 of it")) == "3/4"
    assert ax.read_extracted(_comp("I cannot tell.")) is None
    # a JSON reply the backend did not parse (no schema) is still read by its answer, not its first digit
    assert ax.read_extracted(_comp('{"answer": 12}')) == "12"


def test_follow_up_carries_the_question_and_the_models_own_solution():
    asked = GenerationRequest(messages=[{"role": "system", "content": "S"}, {"role": "user", "content": "Q?"}],
                              params=SamplingParams(temperature=0.7, max_tokens=512))
    req = ax.follow_up(asked, "step 1 ... so 12 apples", constrained=True)
    assert req.messages[:2] == asked.messages
    assert req.messages[2] == {"role": "assistant", "content": "step 1 ... so 12 apples"}
    assert req.messages[3]["role"] == "user" and req.messages[3]["content"].startswith(ax.FOLLOW_UP)
    assert req.json_schema == ax.ANSWER_SCHEMA and req.params.temperature == 0.0 and req.params.n == 1
    free = ax.follow_up(asked, "s", constrained=False)
    assert free.json_schema is None and free.messages[3]["content"] == ax.FOLLOW_UP
    raw = ax.follow_up(GenerationRequest(prompt="Q?\nA:", params=asked.params), " s", constrained=False)
    assert raw.prompt == "Q?\nA: s" + ax.RAW_TRIGGER and raw.messages is None
    assert asked.messages[-1] == {"role": "user", "content": "Q?"}  # the original request is not changed


def _consistency_fake(text_reply):
    answers = consistency_answers()

    def reply(req, k):
        if req.messages and len(req.messages) > 2 and req.messages[-2]["role"] == "assistant":
            return text_reply("follow-up", req)
        q = _problem(req)
        if "Python program" in last_user(req):
            return f"```python\nprint({answers[q]})\n```"
        return text_reply("solution", req)

    return FakeGenerator(reply), answers


def test_consistency_extracts_a_missing_answer_and_says_so(tmp_path):
    d, _ = scripted_runs.consistency()
    stage_cfg(d, "load")["limit"] = 3
    answers = consistency_answers()

    def text_reply(kind, req):
        if kind == "follow-up":
            solution = req.messages[-2]["content"]
            return "It is 1." if "Priya" in solution else f"{solution.split()[-1]}"
        q = _problem(req)
        if "muffins" in q:
            return f"Steps...\nAnswer: {answers[q]}"  # read directly: no follow-up
        if "train" in q:
            return Reply("It goes on and on and on", "length")  # cut: a truncation, never followed up
        return f"Priya has this many left: {answers[q]}"  # finished, no Answer line; its follow-up says 1

    fake, _ = _consistency_fake(text_reply)
    res = run(d, tmp_path / "run", fake)
    st = res.manifest["stages"][1]
    follow = [r for r in fake.requests if r.messages and len(r.messages) > 2 and r.messages[-2]["role"] == "assistant"]
    assert len(follow) == 1 and follow[0].params.temperature == 0.0 and follow[0].json_schema is None  # fake: no schema
    assert "Priya" in follow[0].messages[0]["content"] and "Priya has" in follow[0].messages[1]["content"]
    c = st["counts"]
    assert (c["extraction_asked"], c["answers_extracted"]) == (1, 1)
    # the Priya row: extracted 1, the program says 72 -> disagree (the extraction reads, the cross-check decides)
    assert c["dropped_answers_disagree"] == 1 and c["dropped_no_text_answer"] == 1
    # outputs: 6 replies, one cut before any answer -> 5 outputs, all read
    assert st["parse"] == {"outputs": 5, "parsed": 5, "rate": 1.0}
    assert c["truncated_solutions"] == 1
    out = rows(tmp_path / "run")
    assert [r["id"] for r in out] == ["mwp-01"] and out[0]["answer_extracted"] is False


def test_consistency_keeps_an_extracted_answer_that_agrees_and_marks_it(tmp_path):
    d, _ = scripted_runs.consistency()
    stage_cfg(d, "load")["limit"] = 2

    def text_reply(kind, req):
        if kind == "follow-up":
            return '{"answer": "%s"}' % req.messages[-2]["content"].split()[-1]
        return f"So the total is {consistency_answers()[_problem(req)]}"

    fake, answers = _consistency_fake(text_reply)
    res = run(d, tmp_path / "run", fake)
    out = rows(tmp_path / "run")
    assert len(out) == 2 and all(r["answer_extracted"] is True for r in out)
    for r in out:
        a = answers[r["question"]]
        assert r["first_solution"] == f"So the total is {a}\nAnswer: {a}" and r["first_answer"] == a
        assert r["completion"] == [{"role": "assistant", "content": r["first_solution"]}]
    # off: the same replies are dropped for want of an answer line
    d2 = copy.deepcopy(d)
    stage_cfg(d2, "consistency")["extract_answer"] = False
    fake2, _ = _consistency_fake(text_reply)
    res2 = run(d2, tmp_path / "off", fake2)
    assert res2.num_rows == 0 and res2.manifest["stages"][1]["counts"]["dropped_no_text_answer"] == 2
    assert res2.manifest["stages"][1]["parse"]["parsed"] == 2  # only the two programs
    assert not [r for r in fake2.requests if r.messages and len(r.messages) > 2 and r.messages[-2]["role"] == "assistant"]
    assert res.manifest["stages"][1]["parse"] == {"outputs": 4, "parsed": 4, "rate": 1.0}


@pytest.mark.parametrize("constrain,schema", [("json", True), ("none", False), ("auto", False)])
def test_kpdds_solve_votes_with_extracted_answers(tmp_path, constrain, schema):
    from scripted_runs import KPDDS_SOLUTIONS, kpdds

    d, fake = kpdds()  # the fake is no vLLM backend: auto = free text
    stage_cfg(d, "kpdds_solve")["constrain"] = constrain
    # of the 10 scripted solutions (6 say 7, 3 say 8, one with an arithmetic error): 0-3 now end without an
    # answer (finished; their follow-ups answer 7), 4 is cut at max_tokens (a truncation: never followed up)

    def solve(req, k):
        if k < 4:
            return "3 + 4 = 7 in total."
        return Reply("Let me think " * 5, "length") if k == 4 else KPDDS_SOLUTIONS[k]

    def follow(req, k):
        return '{"answer": "7"}' if req.json_schema else "The answer is 7."

    is_follow_up = lambda r: bool(r.messages) and r.messages[-1]["content"].startswith(ax.FOLLOW_UP)  # noqa: E731
    fake.rules = [(is_follow_up, follow)] + [
        (m, solve if m == "Solve the problem step by step" else f) for m, f in fake.rules]
    res = run(d, tmp_path / "run", fake)
    st = {s["kind"]: s for s in res.manifest["stages"]}["kpdds_solve"]
    nq = {s["kind"]: s for s in res.manifest["stages"]}["kpdds_score"]["rows_out"]
    follows = [r for r in fake.requests if r.messages and r.messages[-1]["content"].startswith(ax.FOLLOW_UP)]
    assert len(follows) == 4 * nq and all((r.json_schema is not None) == schema for r in follows)
    assert st["counts"]["extraction_asked"] == 4 * nq and st["counts"]["answers_extracted"] == 4 * nq
    assert st["counts"]["solutions_cut_without_answer"] == nq
    assert st["parse"]["outputs"] == 9 * nq and st["parse"]["parsed"] == 9 * nq
    out = rows(tmp_path / "run")
    # per question: 7 from 0-3 (extracted) and 5, 8 from 6-8, 9 has an arithmetic error -> 5 kept of 8 valid
    assert len(out) == 5 * nq and all(r["answer"] == ["7"] and r["num_solutions"] == 8 for r in out)
    assert sorted(r["answer_extracted"] for r in out) == sorted([True] * 4 * nq + [False] * nq)
    for r in out:
        assert r["completion"][0]["content"] == r["solution"]
        assert r["solution"].endswith("The final answer is $\\boxed{7}$.") == r["answer_extracted"]


@pytest.mark.timeout(900)
def test_extraction_on_vllm_reads_a_number_even_from_a_random_model(vllm_tiny):
    """On real vLLM the follow-up is decoded under the bounded number schema: whatever the tiny random model
    would write, every reply closes within its tokens as {"answer": "<number>"} and is read."""
    asked = [GenerationRequest(messages=[{"role": "user", "content": f"Problem {i}: how many apples?"}],
                               params=SamplingParams(max_tokens=64)) for i in range(8)]
    reqs = [ax.follow_up(r, f"{i} + 4 = {i + 4} apples.", constrained=True) for i, r in enumerate(asked)]
    res = vllm_tiny.generate(reqs)
    comps = [r.completions[0] for r in res]
    assert all(c.finish_reason == "stop" and c.parsed is not None for c in comps), [c.text for c in comps]
    got = [ax.read_extracted(c) for c in comps]
    assert all(g is not None and re.fullmatch(ax.NUMBER_PATTERN, g) for g in got), got


def test_kpdds_extracted_single_answers_leave_the_vote_of_a_multipart_question(tmp_path):
    from scripted_runs import kpdds

    d, fake = kpdds()

    def solve(req, k):  # 6 solutions box two answers (7 and 2); 4 finish without a box (follow-ups say 7)
        return "3 + 4 = 7 and 1 + 1 = 2, so \\boxed{7} and \\boxed{2}." if k < 6 else "3 + 4 = 7 in total."

    is_follow_up = lambda r: bool(r.messages) and r.messages[-1]["content"].startswith(ax.FOLLOW_UP)  # noqa: E731
    fake.rules = [(is_follow_up, "7")] + [
        (m, solve if m == "Solve the problem step by step" else f) for m, f in fake.rules]
    res = run(d, tmp_path / "run", fake)
    st = {s["kind"]: s for s in res.manifest["stages"]}
    nq = st["kpdds_score"]["rows_out"]
    c = st["kpdds_solve"]["counts"]
    assert c["answers_extracted"] == 4 * nq and c["extracted_answers_of_multipart_questions"] == 4 * nq
    out = rows(tmp_path / "run")
    assert len(out) == 6 * nq and all(r["answer"] == ["7", "2"] and not r["answer_extracted"] for r in out)


def test_consistency_flags_the_target_routes_extraction_only(tmp_path):
    d, _ = scripted_runs.consistency()
    stage_cfg(d, "load")["limit"] = 2
    stage_cfg(d, "consistency").update(mode="two_solvers", target="second")
    answers = consistency_answers()

    def reply(req, k):
        if req.messages and len(req.messages) > 2 and req.messages[-2]["role"] == "assistant":
            return req.messages[-2]["content"].split()[-1]
        a = answers[_problem(req)]
        if "list every quantity" in last_user(req):  # the second solver (the target) answers properly
            return f"Quantities...\nAnswer: {a}"
        return f"So it comes to {a}"  # the first solver needs the follow-up

    res = run(d, tmp_path / "run", FakeGenerator(reply))
    out = rows(tmp_path / "run")
    assert res.manifest["stages"][1]["counts"]["answers_extracted"] == 2
    assert len(out) == 2 and all(r["answer_extracted"] is False and r["first_solution"].endswith(
        f"Answer: {r['first_answer']}") for r in out)
