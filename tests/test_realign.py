"""ReAlign: formats file, category parser, rewrite parser, post-filters,
edit rate, pass-through of non-rewritten categories, tiny-model pipeline."""

from __future__ import annotations

import hashlib
import json
import math
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


# -- retrieval augmentation (BM25 over a local corpus) ----------------------------------------------

CORPUS = PIPELINES / "data" / "realign_corpus.jsonl"


def _write_corpus(path: Path, texts: list[str], ids: list | None = None) -> Path:
    rows = [{"text": t} if ids is None else {"id": i, "text": t} for i, t in zip(ids or texts, texts)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bm25_scores_match_the_formula(tmp_path):
    """Lucene BM25 (k1=1.5, b=0.75) computed by hand on a corpus with no
    stopwords: score(d, q) = sum over query terms t in d of
    ln(1 + (N - df + 0.5) / (df + 0.5)) * tf / (tf + k1 (1 - b + b |d| / avgdl))."""
    from synthfb.stages.retrieval import SnippetCorpus

    docs = [["apple", "banana", "apple", "cherry"], ["banana", "durian"],
            ["cherry", "cherry", "cherry", "elderberry", "fig"], ["grape"]]
    c = SnippetCorpus(_write_corpus(tmp_path / "c.jsonl", [" ".join(d).capitalize() + "." for d in docs]))
    n, avgdl, k1, b = len(docs), sum(map(len, docs)) / len(docs), 1.5, 0.75

    def score(d, q):
        s = 0.0
        for t in q:
            tf, df = d.count(t), sum(t in x for x in docs)
            if tf:
                s += math.log(1 + (n - df + 0.5) / (df + 0.5)) * tf / (tf + k1 * (1 - b + b * len(d) / avgdl))
        return s

    q = ["apple", "cherry"]
    want = sorted(((i, score(d, q)) for i, d in enumerate(docs) if score(d, q) > 0), key=lambda x: -x[1])
    got = c.search("Apple, cherry and zebra?", 5)  # "and" is a stopword, "zebra" is not in the corpus
    assert [i for i, _ in got] == [i for i, _ in want] == [0, 2]  # banana/durian and grape share no term: left out
    assert [s for _, s in got] == pytest.approx([s for _, s in want], rel=1e-5)
    assert c.search("Apple cherry", 1) == got[:1]
    assert c.search("zebra", 5) == [] and c.search("Hi! How are you?", 5) == []
    assert c.ids == [0, 1, 2, 3]  # no id column: row positions


def test_retrieval_on_the_shipped_corpus():
    """Hand-checked: the paragraph that answers the question comes first."""
    from synthfb.stages.retrieval import SnippetCorpus

    c = SnippetCorpus(CORPUS)
    top = {q: [c.ids[i] for i, _ in c.search(q, 5)] for q in (
        "What is the capital of Australia?", "Why is the sky blue?", "How do I boil an egg so the yolk stays soft?",
        "Who discovered penicillin?", "What causes the seasons on Earth?", "How high is Mount Everest?")}
    assert [t[0] for t in top.values()] == ["canberra", "rayleigh", "soft-egg", "penicillin", "seasons", "everest"]
    assert all(1 <= len(t) <= 5 for t in top.values())
    assert "sunset" in top["Why is the sky blue?"] and "hard-egg" in top["How do I boil an egg so the yolk stays soft?"]


def test_corpus_errors_name_the_file_and_row(tmp_path):
    kinds = stage_kinds()
    rw = kinds["realign_rewrite"]
    with pytest.raises(ValueError, match="^retrieval_corpus: retrieval corpus 'nope.jsonl' not found"):
        rw.from_dict({"retrieval_corpus": "nope.jsonl"}, tmp_path)
    (tmp_path / "a.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match=r"^retrieval_corpus: .*a.jsonl: no column 'text'"):
        rw.from_dict({"retrieval_corpus": "a.jsonl"}, tmp_path)
    _write_corpus(tmp_path / "b.jsonl", ["one", "two", "three"], ["x", "y", "x"])
    with pytest.raises(ValueError, match=r"^retrieval_corpus: .*b.jsonl: row 2: id 'x' repeats row 0"):
        rw.from_dict({"retrieval_corpus": "b.jsonl"}, tmp_path)
    _write_corpus(tmp_path / "c.jsonl", ["one", "  "])
    with pytest.raises(ValueError, match=r"^retrieval_corpus: .*c.jsonl: row 1: column 'text' must be non-empty"):
        rw.from_dict({"retrieval_corpus": "c.jsonl"}, tmp_path)
    _write_corpus(tmp_path / "d.jsonl", ["one"])
    with pytest.raises(ValueError, match=r"^retrieval_categories: \['nonsense'\] not in the formats file"):
        rw.from_dict({"retrieval_corpus": "d.jsonl", "retrieval_categories": ["nonsense"]}, tmp_path)
    with pytest.raises(ValueError, match="^retrieval_categories: needs retrieval_corpus"):
        rw.from_dict({"retrieval_categories": ["open_qa"]}, tmp_path)
    with pytest.raises(ValueError, match="^retrieval_k: must be >= 1"):
        rw.from_dict({"retrieval_corpus": "d.jsonl", "retrieval_k": 0}, tmp_path)


def test_retrieval_corpus_is_part_of_the_fingerprint(tmp_path):
    rw = stage_kinds()["realign_rewrite"]
    _write_corpus(tmp_path / "c.jsonl", ["Canberra is the capital of Australia."])
    fp = rw.from_dict({"retrieval_corpus": "c.jsonl"}, tmp_path).fingerprint()["files_sha256"]
    assert fp["retrieval_corpus"] == hashlib.sha256((tmp_path / "c.jsonl").read_bytes()).hexdigest()
    assert "retrieval_corpus" not in rw.from_dict({}, tmp_path).fingerprint()["files_sha256"]
    _write_corpus(tmp_path / "c.jsonl", ["Canberra is the capital of Australia.", "Ottawa is the capital of Canada."])
    assert rw.from_dict({"retrieval_corpus": "c.jsonl"}, tmp_path).fingerprint()["files_sha256"] != fp


def _evidence(prompt: str) -> list[str]:
    if "[Evidence start]" not in prompt:
        return []
    block = prompt.split("[Evidence start]\n", 1)[1].split("[Evidence end]", 1)[0].strip()
    items = block.split("\n\n")
    assert [x.split(". ", 1)[0] for x in items] == [str(i) for i in range(1, len(items) + 1)]
    return [x.split(". ", 1)[1] for x in items]


@pytest.mark.parametrize("categories", [None, ["code_generation"]])
def test_rewrite_prompt_holds_the_top5_snippets_for_retrieval_categories_only(tmp_path, categories):
    """Every rewritable category is asked once: the prompt carries the
    top-5 BM25 snippets (best first) exactly for the retrieval categories
    (default: the formats file's `rag` ones, the paper's RAG_TASKS), and the
    row records their ids; the `evidence` column's items come first."""
    from synthfb.stages.retrieval import SnippetCorpus

    corpus = SnippetCorpus(CORPUS)
    query = "Why is the daytime sky blue while sunlight is white?"
    rewritable = [k for k, v in CATS.items() if v.rewrite]
    rows = [{"instruction": query, "output": "Because of scattering.", "category": k, "evidence": ["Own fact."]}
            for k in rewritable]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fake = FakeGenerator(rules=[("[Response start]", "Revised response: Because of scattering of light.")])
    rewrite = {"stage": "realign_rewrite", "retrieval_corpus": "data/realign_corpus.jsonl", "evidence_column": "evidence"}
    if categories is not None:
        rewrite["retrieval_categories"] = categories
    p = Pipeline.from_dict({"name": "t", "model": "default", "stages": [{"stage": "load", "path": str(data)}, rewrite]},
                           PIPELINES, "t (test)")
    res = run_pipeline(p, tmp_path / "out", generators={p.model: fake}, progress=False)
    import datasets

    out = {r["category"]: r for r in datasets.load_from_disk(str(res.dataset_dir)).to_list()}
    by_format = {CATS[k].format: k for k in rewritable}
    asked = {by_format[request_text(r).split("[Format start]\n", 1)[1].split("\n[Format end]", 1)[0]]: request_text(r)
             for r in fake.requests}
    assert sorted(asked) == sorted(rewritable) and len(fake.requests) == len(rewritable)
    retrieval = set(categories) if categories is not None else {k for k, v in CATS.items() if v.rag}
    want_ids = ["rayleigh", "sunset", "visible-light"]  # hand-checked: the paragraphs on the sky and on light lead
    for k in rewritable:
        ev = _evidence(asked[k])
        if k in retrieval:
            ids = out[k]["retrieved_ids"]
            assert len(ids) == 5 and ids[:3] == want_ids
            assert ev == (["Own fact."] if CATS[k].rag else []) + [corpus.texts[corpus.ids.index(i)] for i in ids]
        else:
            assert out[k]["retrieved_ids"] == []
            assert ev == (["Own fact."] if CATS[k].rag else [])
    st = res.manifest["stages"][1]["counts"]
    assert st["retrieved"] == len(retrieval & set(rewritable))
