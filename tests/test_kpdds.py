"""KPDDS (Huang et al. 2024; specs/methods-2.md section 1): the TCPM of
Algorithm 1 against hand counts, the topic-sampling distribution against the
probabilities computed by hand from that matrix, the Consensus Score Vector
vote (the spec's 6/3/1 example), the arithmetic re-check and answer
equivalence, and the shipped pipeline end to end on the scripted model
(tests/scripted_runs.py)."""

from __future__ import annotations

import math
import random
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ has no __init__.py
from scripted_runs import KPDDS_TOPICS, KPDDS_UNPARSEABLE, kpdds, rows, run

from synthfb.stages import kpdds_core as core
from synthfb.stages.kpdds import parse_topics, parse_unit_score

L2 = math.log10(2)
# three toy problems over topics A, B, C: P1 {A, B}; P2 {A with 6 KPs (> 5: diagonal), C}; P3 {B, C}
TOY = [{"A": ["a1"], "B": ["b1", "b2"]},
       {"A": [f"a{i}" for i in range(6)], "C": ["c1"]},
       {"B": ["b1"], "C": ["c1"]}]
# raw counts by hand: A-B (P1), A-C and A-A (P2), B-C (P3), each ordered pair once; then log10(x + 1)
TOY_TCPM = [[L2, L2, L2], [L2, 0.0, L2], [L2, L2, 0.0]]


def test_tcpm_matches_hand_counts():
    got = core.build_tcpm(TOY, ["A", "B", "C"])
    assert all(abs(g - w) < 1e-9 for gr, wr in zip(got, TOY_TCPM) for g, w in zip(gr, wr))
    # a second co-occurrence of A and B: raw count 2 -> log10(3)
    got = core.build_tcpm(TOY + [{"A": ["a1"], "B": ["b1"]}], ["A", "B", "C"])
    assert got[0][1] == pytest.approx(math.log10(3), abs=1e-12) and got[1][0] == pytest.approx(math.log10(3))
    # the diagonal rule is "more than 5": five KPs add nothing
    assert core.build_tcpm([{"A": [f"a{i}" for i in range(5)]}], ["A"]) == [[0.0]]


def test_topic_sampling_follows_the_tcpm():
    """First topic ~ row sums (A 3/7, B 2/7, C 2/7), second ~ the first's row
    without it (1/2 each here), third ~ the Hadamard product of the two rows
    (for A then B: only C). Ordered pairs by hand: AB = AC = 3/14, the other
    four 1/7; 20,000 draws, within 5 standard errors."""
    rng = random.Random(0)
    n = 20000
    pairs = Counter(tuple(core.sample_topics(TOY_TCPM, 2, rng)) for _ in range(n))
    want = {(0, 1): 3 / 14, (0, 2): 3 / 14, (1, 0): 1 / 7, (1, 2): 1 / 7, (2, 0): 1 / 7, (2, 1): 1 / 7}
    assert set(pairs) == set(want)
    for key, p in want.items():
        assert abs(pairs[key] / n - p) < 5 * math.sqrt(p * (1 - p) / n), (key, pairs[key] / n, p)
    assert core.practice_distribution(TOY_TCPM) == pytest.approx([3 / 7, 2 / 7, 2 / 7])
    triples = {tuple(core.sample_topics(TOY_TCPM, 3, rng)) for _ in range(500)}
    assert all(len(set(t)) == 3 for t in triples)  # without replacement; the product row always leaves the third
    # a zero Hadamard product stops at 2 topics: A-B and A-C co-occur, B-C never
    m = [[0, 1, 1], [1, 0, 0], [1, 0, 0]]
    assert {len(core.sample_topics(m, 3, rng)) for _ in range(200)} == {2}
    # a topic whose row is non-zero only on the diagonal is drawn twice (two practice sets of it)
    assert core.sample_topics([[1.0, 0.0], [0.0, 0.0]], 2, rng) == [0, 0]
    assert core.sample_topics([[0.0]], 2, rng) == []


def test_consensus_vote_keeps_the_majority_and_its_ties():
    """Spec 1.5 (b): 10 answers 6 x A, 3 x B, 1 x C -> CS 0.6 / 0.3 / 0.1 and
    exactly the six A solutions kept; 10 distinct answers -> nothing kept."""
    answers = [["A"]] * 6 + [["B"]] * 3 + [["C"]]
    keep, cs = core.vote(answers)
    assert keep == [0, 1, 2, 3, 4, 5] and cs == pytest.approx([0.6] * 6 + [0.3] * 3 + [0.1])
    assert core.vote([[str(i)] for i in range(10)])[0] == []
    # two sub-questions: s0 = (1, 2), s1 = (1, 3), s2 = (4, 3), s3 = (1, 3): c_i = (3/4, 1/4), (3/4, 3/4), (1/4, 3/4),
    # (3/4, 3/4); max rule: every CS is 3/4 (all kept); min rule: 1/4, 3/4, 1/4, 3/4 (s1 and s3 kept)
    two = [["1", "2"], ["1", "3"], ["4", "3"], ["1", "3"]]
    assert core.vote(two) == ([0, 1, 2, 3], pytest.approx([0.75] * 4))
    assert core.vote(two, "min") == ([1, 3], pytest.approx([0.25, 0.75, 0.25, 0.75]))
    # a tie at the top keeps both groups
    assert core.vote([["5"], ["5"], ["7"], ["7"], ["9"]])[0] == [0, 1, 2, 3]


def test_answers_and_arithmetic():
    assert core.extract_answers("so x = \\boxed{\\frac{1}{2}} and \\boxed{3}") == ["\\frac{1}{2}", "3"]
    assert core.extract_answers("Thus the answer is 42.") == ["42"]
    assert core.extract_answers("no answer here") == []
    assert core.answers_equal("1,200", "1200.0") and core.answers_equal("\\frac{1}{2}", "0.5")
    assert core.answers_equal("12%", "0.12") and core.answers_equal("$60", "60") and core.answers_equal("12 cm", "12")
    assert not core.answers_equal("3", "4") and not core.answers_equal("36\\pi", "36")
    assert core.arithmetic_errors("3 * $4 = $12, then 12 + 5 = 18, and 1,200 / 4 = 300.") == ["12 + 5 = 18"]
    assert core.arithmetic_errors("It costs 12 dollars = 12. Year 2024 = 2024.") == []
    assert core.arithmetic_errors("2^3 + 1 = 9 and x + 1 = 5 so 9^2 + 12^2 = 81 + 144 = 225") == []


def test_parsers():
    topics, why = parse_topics('Sure: {"topics": [{"topic": "Algebra - Linear equations", "key_points": ["a", "b"]},'
                               ' {"topic": "algebra-linear  equations", "key_points": ["b", "c"]},'
                               ' {"topic": "Geometry", "key_points": []}]}')
    assert why is None and topics == [{"topic": "algebra - linear equations", "key_points": ["a", "b", "c"]}]
    assert parse_topics("no json")[1] == "no_json" and parse_topics('{"topics": 3}')[1] == "bad_topics"
    assert parse_unit_score("fine\nScore: 0.9") == 0.9 and parse_unit_score("Score: 1") == 1.0
    assert parse_unit_score("Score: 7") is None and parse_unit_score("none") is None


def test_pipeline_on_the_scripted_teacher(tmp_path):
    d, fake = kpdds()
    res = run(d, tmp_path / "run", fake)
    st = {s["kind"]: s for s in res.manifest["stages"]}
    n_seeds = st["load"]["rows_out"]
    assert st["kpdds_extract"]["rows_out"] == n_seeds - 1
    assert st["kpdds_extract"]["counts"]["dropped_unparseable_no_json"] == 1
    q = d["stages"][2]
    assert st["kpdds_questions"]["rows_out"] == q["num_questions"]
    topics = {core.topic_key(t) for w, ts in KPDDS_TOPICS.items() if w != KPDDS_UNPARSEABLE for t in ts}
    assert st["kpdds_questions"]["counts"]["topics"] == len(topics)
    # every score read (outputs = parsed); the one below 0.85 is a drop
    assert st["kpdds_score"]["counts"] == {"dropped_score_below_threshold": 1, "outputs": 6, "parsed": 6}
    out = rows(tmp_path / "run")
    # each question: 10 solutions, one with an arithmetic error dropped, 6 of the remaining 9 agree on 7
    assert st["kpdds_solve"]["counts"]["solutions_with_arithmetic_error"] == st["kpdds_score"]["rows_out"]
    assert len(out) == 6 * st["kpdds_score"]["rows_out"]
    seeds = {w: {core.topic_key(t): kps for t, kps in ts.items()} for w, ts in KPDDS_TOPICS.items()}
    for r in out:
        assert r["answer"] == ["7"] and r["agreement"] == pytest.approx(6 / 9) and r["num_solutions"] == 9
        assert r["num_sampled"] == 10 and r["question_score"] >= 0.85
        assert r["completion"] == [{"role": "assistant", "content": r["solution"]}]
        assert r["prompt"][-1]["content"].startswith(r["question"])
        # the combination came from the TCPM: consecutive topics co-occur in some seed, and each topic's KPs and
        # practice problem come from one seed that holds the topic
        for a, b in zip(r["topics"], r["topics"][1:]):
            assert any(a in s and b in s for w, s in seeds.items() if w != KPDDS_UNPARSEABLE)
        for t, kps, prac in zip(r["topics"], r["key_points"], r["practice"]):
            w = next(w for w in seeds if w in prac["question"])
            assert seeds[w][t] == kps and all(kp in r["kp_prompt"] for kp in kps)
    # the card cites the paper
    import warnings

    from synthfb.cards.builder import build_card

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # license unknown for the scripted model
        card = build_card(tmp_path / "run")
    assert "Key-Point-Driven Data Synthesis" in card.body


@pytest.mark.parametrize("backend,constrain,expect", [("vllm", "auto", True), ("vllm-cpu", "auto", True),
                                                     ("transformers", "auto", False), ("openai", "auto", False),
                                                     ("openai", "json", True), ("vllm", "none", False)])
def test_extract_constrains_to_the_topics_schema_where_the_engine_can(tmp_path, backend, constrain, expect):
    """`constrain: auto` asks vLLM for structured output under TOPICS_SCHEMA (a small model then answers in the
    asked form); transformers and served models get the free-text prompt unless `constrain: json`."""
    from synthfb.stages.kpdds import TOPICS_SCHEMA

    d, fake = kpdds()
    fake.info = type(fake.info)(name=fake.info.name, path=fake.info.path, revision=fake.info.revision, backend=backend)
    d["stages"] = d["stages"][:2]  # load -> kpdds_extract
    d["stages"][1]["constrain"] = constrain
    run(d, tmp_path / "run", fake)
    asked = [r for r in fake.requests if "specialist in mathematics education" in str(r.messages or r.prompt)]
    assert asked and {id(r.json_schema) if r.json_schema else None for r in asked} == (
        {id(TOPICS_SCHEMA)} if expect else {None})


def test_topics_schema_bounds_and_parser_agree():
    """An answer valid under TOPICS_SCHEMA parses to the same topics; one over the bounds is refused by the
    schema (jsonschema, the reference validator)."""
    import json

    import jsonschema

    from synthfb.stages.kpdds import TOPICS_SCHEMA

    ok = {"topics": [{"topic": "Algebra - Linear equations", "key_points": ["Isolate the unknown.", "Check it."]},
                     {"topic": "Arithmetic - Fractions", "key_points": ["Common denominators."]}]}
    jsonschema.validate(ok, TOPICS_SCHEMA)
    topics, why = parse_topics(json.dumps(ok))
    assert why is None and [len(t["key_points"]) for t in topics] == [2, 1]
    too_many = {"topics": [{"topic": f"Topic {i} - x", "key_points": ["k1 a"]} for i in range(4)]}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(too_many, TOPICS_SCHEMA)


@pytest.mark.engine
def test_extract_on_vllm_answers_in_the_schema_even_from_a_random_model(tmp_path, tiny_model, vllm_tiny):
    """The real engine under `constrain: auto`: the tiny random model's extraction answers are JSON in the
    schema (structured outputs), so every seed parses; unconstrained, its gibberish parses for none."""
    from synthfb.engine import Pipeline, Runner

    def go(constrain: str, out: Path):
        d = {"name": "kpdds_extract_tiny", "model": "tiny", "backend": "vllm", "seed": 0,
             "stages": [{"stage": "load", "path": "seeds/kpdds_seeds.jsonl", "limit": 3},
                        {"stage": "kpdds_extract", "constrain": constrain,
                         "sampling": {"temperature": 1.0, "max_tokens": 512}}]}
        p = Pipeline.from_dict(d, Path(__file__).resolve().parent.parent / "pipelines", source="kpdds_extract_tiny")
        return Runner(p, out, generators={"tiny": vllm_tiny}, progress=False).run().manifest["stages"][1]

    st = go("auto", tmp_path / "constrained")
    assert st["rows_in"] == st["rows_out"] == 3, st
    free = go("none", tmp_path / "free")
    assert free["rows_in"] == 3 and free["rows_out"] == 0, free


def test_parse_question_both_forms():
    from synthfb.stages.kpdds import parse_question

    assert parse_question('{"question": " How many apples are left? "}', True) == "How many apples are left?"
    assert parse_question('{"question": "  "}', True) is None and parse_question("<Q>x</Q>", True) is None
    assert parse_question("Sure. <Q>first</Q> then <Q> second </Q>", False) == "second"
    assert parse_question("no tags", False) is None and parse_question("<Q> </Q>", False) is None


def test_questions_under_constraint_ask_for_json_and_read_it(tmp_path):
    """On vLLM (`constrain: auto`) the question prompt asks for {"question": ...} under QUESTION_SCHEMA and the
    answer is read from the JSON; the <Q> tags are the free-text form."""
    from fakes import request_text

    from synthfb.stages.kpdds import QUESTION_SCHEMA

    d, fake = kpdds()
    fake.info = type(fake.info)(name=fake.info.name, path=fake.info.path, revision=fake.info.revision, backend="vllm")
    d["stages"] = d["stages"][:3]  # load -> extract -> questions
    rule = next(i for i, (key, _) in enumerate(fake.rules) if key == "mathematics teacher helping students")
    fake.rules[rule] = (fake.rules[rule][0], lambda req, k: '{"question": "A train goes 3 km then 4 km; how far?"}')
    res = run(d, tmp_path / "run", fake)
    st = {s["kind"]: s for s in res.manifest["stages"]}
    asked = [r for r in fake.requests if "mathematics teacher helping students" in request_text(r)]
    assert asked and all(r.json_schema is QUESTION_SCHEMA and '{"question": "the new problem"}' in request_text(r)
                         and "<Q>" not in request_text(r) for r in asked)
    assert st["kpdds_questions"]["rows_out"] == d["stages"][2]["num_questions"]
    assert {r["question"] for r in rows(tmp_path / "run")} == {"A train goes 3 km then 4 km; how far?"}


def test_unit_score_json_form():
    assert parse_unit_score('{"justification": "ok", "score": 0.9}', True) == 0.9
    assert parse_unit_score('{"justification": "ok", "score": 1}', True) == 1.0
    assert parse_unit_score('{"justification": "ok", "score": 1.5}', True) is None
    assert parse_unit_score('{"justification": "ok", "score": true}', True) is None
    assert parse_unit_score("Score: 0.9", True) is None and parse_unit_score('{"score": 0.9}') is None


def test_score_under_constraint_asks_for_json(tmp_path):
    """On vLLM the score prompt asks for {"justification", "score"} under SCORE_SCHEMA; the threshold is the
    paper's 0.85 either way."""
    from fakes import request_text

    from synthfb.stages.kpdds import QUESTION_SCHEMA, SCORE_SCHEMA

    d, fake = kpdds()
    fake.info = type(fake.info)(name=fake.info.name, path=fake.info.path, revision=fake.info.revision, backend="vllm")
    d["stages"] = d["stages"][:4]  # load -> extract -> questions -> score
    rules = dict(fake.rules)
    made = iter(range(10**6))
    rules["mathematics teacher helping students"] = lambda req, k: (
        f'{{"question": "Practice problem number {1 + next(made) % 2}: how many?"}}')
    rules["reviewing a new mathematics problem"] = lambda req, k: (
        '{"justification": "flawed", "score": 0.5}' if "number 1:" in request_text(req)
        else '{"justification": "fine", "score": 0.9}')
    fake.rules = list(rules.items())
    res = run(d, tmp_path / "run", fake)
    st = {s["kind"]: s for s in res.manifest["stages"]}
    asked = [r for r in fake.requests if "reviewing a new mathematics problem" in request_text(r)]
    assert asked and all(r.json_schema is SCORE_SCHEMA and '"score": <number between 0 and 1>' in request_text(r)
                         for r in asked)
    assert QUESTION_SCHEMA is not SCORE_SCHEMA
    sc = st["kpdds_score"]
    assert sc["counts"]["outputs"] == sc["counts"]["parsed"] == sc["rows_in"] >= 1
    kept = rows(tmp_path / "run")
    assert all(r["question_score"] == 0.9 and "number 2:" in r["question"] for r in kept)
    assert sc["rows_out"] == len(kept) == sc["rows_in"] - sc["counts"].get("dropped_score_below_threshold", 0)


def test_a_question_cut_at_max_tokens_is_a_truncation_not_a_parse_failure(tmp_path):
    from fakes import Reply

    d, fake = kpdds()
    d["stages"] = d["stages"][:3]  # load -> extract -> questions
    made = iter(range(1000))

    def question(req, k):
        i = next(made)
        if i == 0:
            return Reply("<Q>A problem that never", "length")
        return "No tags here." if i == 1 else f"<Q>Practice problem number {i}: combine them.</Q>"

    fake.rules = [(m, question if m == "mathematics teacher helping students" else f) for m, f in fake.rules]
    res = run(d, tmp_path / "run", fake)
    st = {s["kind"]: s for s in res.manifest["stages"]}["kpdds_questions"]
    c = st["counts"]
    assert c["dropped_truncated_question"] == 1 and c["truncated_outputs"] == 1
    assert c["dropped_no_question_tags"] == 1
    n = c["outputs"]  # every question answer (10 extract requests came first) but the cut one
    assert n == len(fake.requests) - 10 - 1 and st["parse"] == {"outputs": n, "parsed": n - 1,
                                                               "rate": round((n - 1) / n, 4)}
