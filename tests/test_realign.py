"""ReAlign: formats file, category parser, rewrite parser, post-filters,
edit rate, pass-through of non-rewritten categories, tiny-model pipeline."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import yaml

from synthfb.engine import Pipeline, run_pipeline
from synthfb.engine.stage import stage_kinds
from synthfb.stages.realign import (
    Category,
    clean_evidence,
    edit_rate,
    has_code,
    load_formats,
    parse_category,
    parse_revised,
    rewrite_reject_reason,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ has no __init__.py
from fakes import FakeGenerator, request_text  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PIPELINES = REPO / "pipelines"
FORMATS = PIPELINES / "data" / "realign_formats.yaml"
CATS, DEFAULT = load_formats(FORMATS)
NAMES = list(CATS)


def test_formats_file():
    assert DEFAULT == "default" and not CATS["default"].rewrite
    groups = {c.group for c in CATS.values()}
    assert len(groups) == 10
    for c in CATS.values():
        assert c.description
        assert (c.format is not None) == c.rewrite or not c.rewrite
    # story/poem-like tasks are not rewritten, as in the paper
    for name in ("story_generation", "poem_generation", "roleplay", "text_summarization", "paraphrasing"):
        assert not CATS[name].rewrite
    assert {n for n, c in CATS.items() if c.rag} >= {"open_qa", "fact_verification", "how_to_generation"}


def test_formats_file_errors_name_the_category(tmp_path):
    bad = tmp_path / "f.yaml"
    bad.write_text("categories:\n  foo:\n    rewrite: true\n  default: {}\n")
    with pytest.raises(ValueError, match="'foo'.*no format"):
        load_formats(bad)
    bad.write_text("categories:\n  foo: {formt: x}\n")
    with pytest.raises(ValueError, match="unknown field"):
        load_formats(bad)
    bad.write_text("default_category: nope\ncategories:\n  foo: {}\n")
    with pytest.raises(ValueError, match="default_category 'nope'"):
        load_formats(bad)


@pytest.mark.parametrize("text,want", [
    ("open_qa", "open_qa"),
    ("  Open QA.", "open_qa"),
    ("`code_generation`", "code_generation"),
    ("The category is math_puzzles because it asks to solve a problem.", "math_puzzles"),
    ("code_explanation or code_generation", "code_explanation"),   # earliest mention wins
    ("this is about open_qa_extra stuff", None),                  # no partial-word matches
    ("Poem", None),                                               # not a category name
    ("", None), (None, None), ("🙂", None),
])
def test_parse_category(text, want):
    assert parse_category(text, NAMES) == want


@pytest.mark.parametrize("text,want", [
    ("Reasoning: fits.\nRevised response: 1. Step one.\n2. Step two.", "1. Step one.\n2. Step two."),
    ("Revised response:\n[Response start]\nHello there.\n[Response end]", "Hello there."),
    ("Revised response: A.\nReasoning: I put reasoning last.", "A."),
    ("Reasoning: the format does not fit.", None),          # no marker
    ("Revised response:   ", None),                          # empty
    ("revised response: lower-case marker", None),           # exact marker, as in the reference
    (None, None),
])
def test_parse_revised(text, want):
    assert parse_revised(text) == want


def test_clean_evidence():
    ev = ["Fact one.", "No good Google Search Result was found", "Missing: x", "Duration: 3:00", "Posted: y",
          "  ", None, "Fact two."]
    assert clean_evidence(ev) == ["Fact one.", "Fact two."]
    assert clean_evidence("single") == ["single"]
    assert clean_evidence(None) == []


def test_has_code():
    assert has_code("```python\nx = 1\n```")
    assert has_code("def f(x):\n    return x")
    assert not has_code("define the return policy")  # no 'def ' + 'return '
    assert not has_code("plain text")


def test_edit_rate_hand_computed():
    assert edit_rate("a b c d", "a b c d") == 0.0
    assert edit_rate("a b c d", "a x c d") == 0.25          # one substitution / 4
    assert edit_rate("a b c d", "a b c d e f") == 0.5       # two insertions / 4
    assert edit_rate("a b", "") == 1.0
    assert edit_rate("", "") == 0.0 and edit_rate("", "x") == 1.0


def _cat(name, group="Conversation"):
    return Category(name, group, "", True, False, "fmt")


LONG = "one two three four five six seven eight nine ten"


@pytest.mark.parametrize("cat,query,orig,rev,reason", [
    (_cat("open_qa"), "q", LONG, None, "unparseable_rewrite"),
    (_cat("open_qa"), "q", LONG, "one two three four five", "rewrite_too_short"),        # 5 <= 0.5*10
    (_cat("open_qa"), "q", LONG, "one two three four five six", None),                    # 6 > 5
    (_cat("open_qa"), "q", LONG, LONG + " Revised response", "leftover_marker"),
    (_cat("code_generation", "Code"), "q", "def f(x):\n    return x", "It returns its input unchanged, simply.",
     "code_mismatch"),
    (_cat("code_generation", "Code"), "q", "Use max.", "```python\nmax(xs)\n```\nUse max.", "code_mismatch"),
    (_cat("code_generation", "Code"), "q", "def f(x):\n    return x",
     "Approach:\n```python\ndef f(x):\n    return x\n```", None),
    (_cat("open_qa"), "q", "def f(x): return x", "It is a function f that gives x back.", None),  # not Code group
    (_cat("planning", "Brainstorming"), "How should I learn Spanish?", LONG, LONG + " more", "planning_query_without_plan"),
    (_cat("planning", "Brainstorming"), "Make a plan to learn Spanish", LONG, LONG + " more", None),
    (_cat("planning", "Brainstorming"), "Plan my week", LONG, LONG + " more", None),
    (_cat("exam_problem_solving_tutor"), "q", "B", "The answer is (B) because of the cycle.", None),
    (_cat("exam_problem_solving_tutor"), "q", "B", "The answer is C because of the cycle.", "short_answer_missing"),
    (_cat("math_puzzles"), "q", "42.", "Step 1: six times seven. Result: 42", None),
    (_cat("math_puzzles"), "q", "42", "Step 1: six times seven. Result: 420", "short_answer_missing"),
    (_cat("text_classification"), "q", "True", "The statement is correct, so yes it holds.", None),
])
def test_rewrite_post_filters(cat, query, orig, rev, reason):
    assert rewrite_reject_reason(cat, query, orig, rev) == reason


# -- the stages on a scripted fake model ---------------------------------------------------------------

def test_realign_stages_on_a_fake_model(tmp_path):
    """Preset categories skip the classifier; a failed classifier request gives
    the default category (counted, recorded, no provenance record); skipped,
    failed-free and rewritten rows all come out, in input order."""
    rows = [
        {"instruction": "Write a short poem about the moon.", "output": "Moon so bright.", "category": "poem_generation"},
        {"instruction": "Hi! How are you?", "output": "Fine, thanks."},
        {"instruction": "What is the capital of France?", "output": "Paris. " * 1000, "category": "open_qa"},
        {"instruction": "How do I boil an egg?", "output": "Boil it for nine minutes in water.", "category": None},
    ]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rewritten = "1. Boil it for nine minutes in water.\n2. Cool it in cold water, then peel it."
    fake = FakeGenerator(rules=[("Category:", " how_to_generation"),
                                ("[Response start]", f"Reasoning: a list fits.\nRevised response: {rewritten}")],
                         failures=[(lambda req: "Query: Hi! How" in request_text(req), "HTTP 500: classifier down")])
    p = Pipeline.from_dict({"name": "t", "model": "default", "stages": [
        {"stage": "load", "path": str(data)}, {"stage": "realign_classify"}, {"stage": "realign_rewrite"}]},
        PIPELINES, "t (test)")
    res = run_pipeline(p, tmp_path / "out", generators={p.model: fake}, progress=False)
    cl, rw = res.manifest["stages"][1:]
    assert cl["counts"] == {"already_classified": 2, "failed_requests": 1, "unknown_category": 1,
                            "category_default": 1, "category_how_to_generation": 1, "outputs": 1, "parsed": 1}
    [f] = cl["failures"]
    assert "classifier down" in f["reason"]
    assert rw["counts"] == {"category_not_rewritten": 2, "input_too_long": 1, "rewritten": 1,
                            "rewritten_edit_rate_over_0.2": 1}
    assert rw["rows_out"] == 4 and not rw["failures"]
    import datasets

    out = datasets.load_from_disk(str(res.dataset_dir)).to_list()
    assert [r["instruction"] for r in out] == [r["instruction"] for r in rows]  # input order
    poem, hi, france, egg = out
    assert hi["category"] == "default" and hi["row_id"] == f["row_id"]
    for r, reason in ((poem, "category_not_rewritten"), (hi, "category_not_rewritten"), (france, "input_too_long")):
        assert (r["realign_tag"], r["realign_reason"], r["edit_rate"]) == ("original", reason, 0.0)
        assert r["output"] == r["original_response"]
    assert poem["provenance"] == france["provenance"] == hi["provenance"] == []  # preset, preset, failed
    assert (egg["realign_tag"], egg["realign_reason"], egg["output"]) == ("rewrite", "", rewritten)
    assert egg["original_response"] == rows[3]["output"] and egg["edit_rate"] > 0.2
    assert [x["stage"] for x in egg["provenance"]] == ["realign_classify", "realign_rewrite"]
    assert egg["provenance"][-1]["finish_reason"] == "stop,stop"  # n: 2 candidates


def test_formats_file_is_part_of_the_fingerprint(tmp_path):
    kinds = stage_kinds()
    for kind in ("realign_classify", "realign_rewrite"):
        st = kinds[kind].from_dict({}, tmp_path)  # the default formats file is found among the shipped ones
        fp = st.fingerprint()
        assert fp["files_sha256"] == {"formats": hashlib.sha256(FORMATS.read_bytes()).hexdigest()}
        assert fp["template_sha256"] == st.template_sha256
        mine = tmp_path / "formats.yaml"
        mine.write_text(FORMATS.read_text() + "\n# edited\n")
        assert kinds[kind].from_dict({"formats": "formats.yaml"}, tmp_path).fingerprint()["files_sha256"] != \
            fp["files_sha256"]
        with pytest.raises(ValueError, match="^formats: formats file 'nope.yaml' not found"):
            kinds[kind].from_dict({"formats": "nope.yaml"}, tmp_path)
        (tmp_path / "bad.yaml").write_text("categories: {}\n")
        with pytest.raises(ValueError, match="^formats: .*bad.yaml: expected a mapping"):
            kinds[kind].from_dict({"formats": "bad.yaml"}, tmp_path)
    rw = kinds["realign_rewrite"].from_dict({}, tmp_path)
    assert rw.params.n == 2 and (rw.params.temperature, rw.params.top_p, rw.params.max_tokens) == (0.3, 0.1, 1024)
    with pytest.raises(ValueError, match="n"):
        kinds["realign_rewrite"].from_dict({"sampling": {"n": 3}}, tmp_path)


# -- pipeline on the tiny model ---------------------------------------------------------------------

@pytest.mark.timeout(600)
def test_realign_pipeline_tiny(tmp_path, tiny_model, vllm_tiny):
    """Rows with a known category skip the classifier; rewritable ones go to
    the model, non-rewritten ones (story/poem/default) pass through untouched."""
    rows = [json.loads(x) for x in (PIPELINES / "data" / "realign_examples.jsonl").read_text().splitlines()]
    preset = {0: "how_to_generation", 1: "code_generation", 3: "explain_answer", 4: "poem_generation",
              5: "planning", 2: "open_qa"}
    for i, r in enumerate(rows):
        if i in preset:
            r["category"] = preset[i]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    d = yaml.safe_load((PIPELINES / "realign.yaml").read_text())
    d["model"] = str(tiny_model)
    d["stages"][0]["path"] = str(data)
    d["stages"][2]["sampling"] = {"max_tokens": 24}
    p = Pipeline.from_dict(d, PIPELINES, "realign.yaml (test)")
    res = run_pipeline(p, tmp_path / "out", generators={p.model: vllm_tiny}, progress=False)
    st = {s["kind"]: s for s in res.manifest["stages"]}
    cl = st["realign_classify"]
    assert cl["counts"]["already_classified"] == len(preset)
    asked = len(rows) - len(preset)
    assert sum(v for k, v in cl["counts"].items() if k.startswith("category_")) == asked
    rw = st["realign_rewrite"]
    assert rw["rows_in"] == rw["rows_out"] == len(rows) == res.num_rows  # nothing is ever deleted
    import datasets

    ds = datasets.load_from_disk(str(res.dataset_dir))
    by_q = {r["instruction"]: r for r in ds}
    for i, src in enumerate(rows):
        r = by_q[src["instruction"]]
        assert r["original_response"] == src["output"]
        assert r["realign_tag"] in ("rewrite", "original")
        if r["realign_tag"] == "original":
            assert r["output"] == src["output"] and r["edit_rate"] == 0.0 and r["realign_reason"]
        if r["category"] in CATS and not CATS[r["category"]].rewrite:
            assert r["realign_reason"] == "category_not_rewritten"
            assert r["output"] == src["output"]
            assert [x["stage"] for x in r["provenance"]] == ([] if i in preset else ["realign_classify"])
    poem = by_q[rows[4]["instruction"]]
    assert poem["category"] == "poem_generation" and poem["realign_reason"] == "category_not_rewritten"
    # the four preset rewritable rows were sent to the model, two candidates each
    c = rw["counts"]
    sent = sum(1 for r in ds if r["provenance"] and r["provenance"][-1]["stage"] == "realign_rewrite")
    assert sent >= 4 and rw["usage"]["requests"] == sent
    assert sent == c.get("rewritten", 0) + sum(v for k, v in c.items() if k.startswith("kept_original_")) + \
        c.get("failed_requests", 0)
    assert c.get("with_evidence", 0) >= 2  # open_qa and explain_answer rows carry usable evidence
