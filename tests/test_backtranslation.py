"""Humpback stages: segmenting, instruction cleaning, rating parser, tags,
and the pipeline on the tiny model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from synthfb.engine import Pipeline, run_pipeline
from synthfb.stages.backtranslation import (
    AUGMENTED_TAG,
    SEED_TAG,
    caps_ratio,
    clean_generated_instruction,
    parse_rating,
    put_back_prefill,
    segment_drop_reason,
    split_segments,
    with_prefill,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ has no __init__.py
from fakes import FakeGenerator, Reply, request_text  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PIPELINES = REPO / "pipelines"


# -- segments -------------------------------------------------------------------------

def test_split_markdown_and_html_headers():
    doc = "intro before any header\n# First\nalpha text\nmore\n## Second ##\nbeta\n<h3 class='x'>Third</h3>\ngamma"
    assert split_segments(doc) == [("First", "alpha text\nmore"), ("Second", "beta"), ("Third", "gamma")]


def test_split_without_headers_and_garbage():
    assert split_segments("  just a paragraph  ") == [("", "just a paragraph")]
    assert split_segments("") == []
    assert split_segments(None) == []
    # '#hashtag' without a space is not a header
    assert split_segments("#hashtag is text") == [("", "#hashtag is text")]


def test_caps_ratio():
    assert caps_ratio("ABC def") == 0.5
    assert caps_ratio("123 !!") == 0.0
    assert caps_ratio("WATERING TIPS!!!") == 1.0


@pytest.mark.parametrize("header,seg,reason", [
    ("Ok", "x" * 99, "segment_too_short"),
    ("Ok", "x" * 501, "segment_too_long"),
    ("Ok", "long enough line here\nok\n" + "y" * 100, "short_line"),
    ("SHOUTING HEADER", "z" * 200, "header_mostly_capitals"),
    ("Mostly fine Header", "z" * 200, None),
    ("", "z" * 200, None),
    ("Ok", "fine line one\n\nfine line two " + "w" * 100, None),  # blank lines are not short lines
])
def test_segment_filters(header, seg, reason):
    assert segment_drop_reason(header, seg, 100, 500, 5, 0.5) == reason


# -- backward-model output -----------------------------------------------------------------

@pytest.mark.parametrize("text,want", [
    ("How do I bake bread?", "How do I bake bread?"),
    ("  Request: How do I bake bread?\n\nSure! Here is how...", "How do I bake bread?"),
    ("Instruction: \"Explain budgets.\"", "Explain budgets."),
    ("**User:** What is a haiku?", "What is a haiku?"),
    ("", None), ("   \n\n  ", None), (None, None), ('""', None),
])
def test_clean_generated_instruction(text, want):
    got = clean_generated_instruction(text)
    assert got == want


# -- rating parser ----------------------------------------------------------------------------

@pytest.mark.parametrize("text,want", [
    ("The answer is complete.\nScore: 5", 5),
    ("Reasoning...\nscore: 3", 3),
    ("Score: 4/5", 4),
    ("Score: **2**", 2),
    ("Score: 4 out of 5.", 4),
    ("Score: 1\nSome trailing chatter without a score", 1),  # searched from the last line up
    ("Score: 2\nOn reflection...\nScore: 4", 4),             # the last score wins
    ("Score: 10502", None),                                  # the Spico pitfall
    ("Score: 0", None), ("Score: 6", None), ("Score: 4.5", None),
    ("I would give it a five.", None), ("", None), (None, None), ("Score:", None),
    ("Score: 3 because it is fine", None),                   # not a clean score line
    ("I chose this.\nThe score is: 4\nThe score is: 5\n", 5),  # SmolLM2's habit; last line wins
    ("Rating: 3", 3), ("Overall rating = 2.", 2),
    ("Scores: 4", None), ("underscore: 4", None),            # whole words only
])
def test_parse_rating(text, want):
    assert parse_rating(text) == want


@pytest.mark.parametrize("completion,want", [
    (" 4", 4), ("\n5\nInstruction: next one", 5), ("  3/5", 3), (" 7", None), (" four", None), ("", None),
])
def test_prefill_put_back_before_parsing(completion, want):
    assert with_prefill("PROMPT", "Score:") == "PROMPT\nScore:"
    assert parse_rating(put_back_prefill("Score:", completion)) == want
    assert put_back_prefill("", " 4") == " 4"


def test_tags_are_the_paper_sentences():
    assert SEED_TAG == "Answer in the style of an AI Assistant."
    assert AUGMENTED_TAG == "Answer with knowledge from web search."


# -- the stages on a scripted fake model ---------------------------------------------------------------

def _fake_pipeline(tmp_path, fake, **curate):
    answers = {"a": "Water tomatoes deeply twice a week.", "b": "A long answer.", "c": "Short request answer.",
               "d": "This one crashes the backward model.", "e": "Stir the soup slowly."}
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"id": k, "output": v}) + "\n" for k, v in answers.items()))
    p = Pipeline.from_dict({"name": "t", "model": "default", "stages": [
        {"stage": "load", "path": str(data), "id_column": "id"},
        {"stage": "backtranslate", "chat": False},
        {"stage": "self_curate", "num_ratings": 2, **curate}]}, PIPELINES, "t (test)")
    return run_pipeline(p, tmp_path / "out", generators={p.model: fake}, progress=False)


def _backward(req, k):
    seg = request_text(req).rsplit("Text: ", 1)[1]
    if seg.startswith("Water"):
        return " How often should I water tomatoes?"
    if seg.startswith("A long"):
        return Reply(" Tell me something about", "length")
    if seg.startswith("Short"):
        return " Hi?"
    return " How do I make soup?"


@pytest.mark.parametrize("drop", [True, False])
def test_backtranslate_and_curate_on_a_fake_model(tmp_path, drop):
    """Drop reasons and truncations under stable codes, a failed request
    counted and recorded, unrated rows counted and dropped only with drop."""
    fake = FakeGenerator(rules=[("Request:", _backward),
                                ("water tomatoes", ["I cannot rate this.", "No idea."]),
                                ("make soup", ["Fine.\nScore: 5", "Score: 4"])],
                         failures=[("crashes the backward", "HTTP 500: backward model down")])
    res = _fake_pipeline(tmp_path, fake, drop=drop, min_score=5.0)
    bt, cur = res.manifest["stages"][1:]
    assert bt["counts"] == {"failed_requests": 1, "truncated_outputs": 1, "dropped_instruction_truncated": 1,
                            "dropped_instruction_too_short": 1}
    [f] = bt["failures"]
    assert f["row_id"] == "d" and "backward model down" in f["reason"]
    assert bt["rows_out"] == cur["rows_in"] == 2
    cc = cur["counts"]
    assert (cc["ratings"], cc["unparseable_ratings"], cc["rating_5"], cc["rating_4"]) == (4, 2, 1, 1)
    assert (cc["unrated"], cc["below_min_score"]) == (1, 1)
    assert cc.get("dropped_unrated", 0) == cc.get("dropped_below_min_score", 0) == int(drop)
    assert cc.get("kept", 0) == cur["rows_out"] == (0 if drop else 2)
    if not drop:
        import datasets

        out = {r["row_id"]: r for r in datasets.load_from_disk(str(res.dataset_dir))}
        assert out["a"]["curation_score"] is None and out["a"]["curation_ratings"] == [None, None]
        assert out["e"]["curation_score"] == 4.5 and out["e"]["curation_ratings"] == [5, 4]
        assert out["e"]["instruction"] == "How do I make soup?" and out["e"]["source"] == "augmented"
        assert [p_["stage"] for p_ in out["e"]["provenance"]] == ["backtranslate", "self_curate"]
        assert out["e"]["provenance"][-1]["finish_reason"] == "stop,stop"


def test_sampling_defaults_and_fields(tmp_path):
    from synthfb.engine.stage import stage_kinds

    kinds = stage_kinds()
    bt = kinds["backtranslate"].from_dict({"sampling": {"max_tokens": 64}}, PIPELINES)
    assert (bt.params.temperature, bt.params.top_p, bt.params.max_tokens, bt.params.n) == (0.7, 0.9, 64, 1)
    cur = kinds["self_curate"].from_dict({"num_ratings": 3}, PIPELINES)
    assert (cur.params.temperature, cur.params.top_p, cur.params.max_tokens, cur.params.n) == (0.7, 0.9, 256, 3)
    assert cur.fingerprint()["template_sha256"] == cur.template.sha256
    with pytest.raises(ValueError, match="num_ratings"):
        kinds["self_curate"].from_dict({"sampling": {"n": 2}}, PIPELINES)
    with pytest.raises(ValueError, match="prefill needs chat: false"):
        kinds["self_curate"].from_dict({"prefill": "Score:"}, PIPELINES)


# -- pipeline on the tiny model -------------------------------------------------------------------

def _pipeline(model: Path, tweak) -> Pipeline:
    d = yaml.safe_load((PIPELINES / "backtranslation.yaml").read_text())
    d["model"] = str(model)
    tweak(d)
    return Pipeline.from_dict(d, PIPELINES, "backtranslation.yaml (test)")


def _stage(d, kind):
    return next(s for s in d["stages"] if s["stage"] == kind)


@pytest.mark.timeout(600)
def test_backtranslation_pipeline_tiny(tmp_path, tiny_model, vllm_tiny):
    def tweak(d):
        # the tiny model rarely stops on its own: keep truncated instructions so curation has rows
        _stage(d, "backtranslate").update(sampling={"max_tokens": 24, "stop": ["\n"]}, drop_truncated=False)
        c = _stage(d, "self_curate")
        c.update(scoring="text", num_ratings=2, drop=False, sampling={"max_tokens": 24})  # the parse path

    p = _pipeline(tiny_model, tweak)
    res = run_pipeline(p, tmp_path / "out", generators={p.model: vllm_tiny}, progress=False)
    st = {s["kind"]: s for s in res.manifest["stages"]}
    seg = st["backtranslation_segments"]
    sc = seg["counts"]
    # the shipped documents hold a duplicate section and a too-short one (written to test the filters)
    assert sc["dropped_duplicate_segment"] >= 1 and sc["dropped_segment_too_short"] >= 1
    assert sc["segments"] == seg["rows_out"] + sum(v for k, v in sc.items() if k.startswith("dropped_"))
    bt = st["backtranslate"]
    assert bt["rows_in"] == seg["rows_out"]
    assert bt["rows_in"] == bt["rows_out"] + sum(v for k, v in bt["counts"].items() if k.startswith("dropped_"))
    cur = st["self_curate"]
    cc = cur["counts"]
    assert cur["rows_in"] > 0
    assert cc["ratings"] == 2 * cur["rows_in"]
    assert cc["ratings"] == cc.get("unparseable_ratings", 0) + sum(cc.get(f"rating_{i}", 0) for i in range(1, 6))
    assert cur["rows_out"] == cur["rows_in"]  # drop: false keeps every row with its score
    if res.num_rows:
        import datasets

        ds = datasets.load_from_disk(str(res.dataset_dir))
        for r in ds:
            assert r["source"] == "augmented" and r["system_tag"] == AUGMENTED_TAG
            assert len(r["curation_ratings"]) == 2
            good = [x for x in r["curation_ratings"] if x is not None]
            assert r["curation_score"] == (pytest.approx(sum(good) / len(good)) if good else None)
            assert [p_["stage"] for p_ in r["provenance"]] == ["backtranslate", "self_curate"]
            assert 10 <= len(r["instruction"]) <= 800 and r["output"].strip()


@pytest.mark.timeout(600)
def test_source_tag_and_curation_threshold(tmp_path, tiny_model, vllm_tiny):
    """Seed rows get S_a; a curation stage with drop=true keeps only rows
    whose mean parsable rating reaches min_score."""
    seeds = tmp_path / "seed.jsonl"
    seeds.write_text("".join(json.dumps({"instruction": f"Explain topic {i} in simple words", "output":
                                         f"Topic {i} is explained here in a few simple words."}) + "\n"
                             for i in range(6)))
    (tmp_path / "p.yaml").write_text(f"""
name: tag
model: {tiny_model}
stages:
  - stage: load
    path: {seeds}
  - stage: source_tag
    source: seed
  - stage: self_curate
    num_ratings: 3
    min_score: 1.0
    sampling: {{max_tokens: 16}}
""")
    p = Pipeline.from_yaml(tmp_path / "p.yaml")
    res = run_pipeline(p, tmp_path / "out", generators={p.model: vllm_tiny}, progress=False)
    cur = res.manifest["stages"][2]
    cc = cur["counts"]
    # min_score 1.0: every row with at least one parsable rating is kept, the rest counted
    assert cur["rows_out"] + cc.get("dropped_unrated", 0) == 6
    assert cc.get("below_min_score", 0) == 0
    tag = res.manifest["stages"][1]
    assert tag["rows_out"] == 6
    import pyarrow.parquet as pq

    rows = pq.read_table(tmp_path / "out" / "stages" / "01-source_tag" / "chunk-00000.parquet").to_pylist()
    assert all(r["source"] == "seed" and r["system_tag"] == SEED_TAG for r in rows)
