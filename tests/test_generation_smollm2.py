"""Smoke tests: the shipped Self-Instruct, backtranslation and ReAlign
pipelines on the real SmolLM2-135M-Instruct (shared ``vllm_smol`` engine),
scaled down to a few prompts with short outputs."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
import yaml

from synthfb.engine import Pipeline, run_pipeline
from synthfb.stages.realign import load_formats
from synthfb.stages.self_instruct_filters import instruction_drop_reason

PIPELINES = Path(__file__).resolve().parent.parent / "pipelines"
pytestmark = pytest.mark.smollm2


def _pipeline(name: str, tweak) -> Pipeline:
    d = yaml.safe_load((PIPELINES / f"{name}.yaml").read_text())
    tweak(d)
    return Pipeline.from_dict(d, PIPELINES, f"{name}.yaml (smoke test)")


def _stage(d, kind):
    return next(s for s in d["stages"] if s["stage"] == kind)


def _run(p: Pipeline, out: Path, gen):
    res = run_pipeline(p, out, generators={p.model: gen}, progress=False)
    return res, {s["kind"]: s for s in res.manifest["stages"]}


@pytest.mark.timeout(900)
def test_self_instruct_smollm2(tmp_path, vllm_smol):
    def tweak(d):
        _stage(d, "self_instruct_bootstrap").update(num_instructions=4, prompts_per_step=4, max_steps=3,
                                                    sampling={"max_tokens": 80})
        _stage(d, "self_instruct_instances")["sampling"] = {"max_tokens": 80}

    res, st = _run(_pipeline("self_instruct", tweak), tmp_path / "out", vllm_smol)
    boot = st["self_instruct_bootstrap"]
    # SmolLM2 continues the numbered list; most runs reach the target within 3 steps
    assert 1 <= boot["rows_out"] == boot["counts"]["accepted"] <= 4
    if boot["rows_out"] < 4:
        assert boot["counts"]["stopped_at_max_steps_short_of_target"] == 4 - boot["rows_out"]
    assert res.num_rows > 0
    ds = datasets.load_from_disk(str(res.dataset_dir))
    for r in ds:
        assert instruction_drop_reason(r["instruction"]) is None and r["rouge_l_max"] <= 0.7
        assert len(r["demo_ids"]) == 8 and r["output"].strip()
        assert r["generation_mode"] in ("input_first", "output_first")
        assert [p["stage"] for p in r["provenance"]] == [
            "self_instruct_bootstrap", "self_instruct_classify", "self_instruct_instances"]
        assert all(p["model"] == "default" for p in r["provenance"])


@pytest.mark.timeout(900)
def test_backtranslation_smollm2(tmp_path, vllm_smol):
    def tweak(d):
        _stage(d, "backtranslate")["sampling"].update(max_tokens=40)
        _stage(d, "self_curate").update(num_ratings=2, drop=False)

    res, st = _run(_pipeline("backtranslation", tweak), tmp_path / "out", vllm_smol)
    assert res.num_rows > 0
    cc = st["self_curate"]["counts"]
    # the curation chat turn gets a 1-5 rating out of SmolLM2 for every row (log-prob scoring)
    assert cc["ratings"] - cc.get("unparseable_ratings", 0) >= 1
    ds = datasets.load_from_disk(str(res.dataset_dir))
    for r in ds:
        assert r["source"] == "augmented" and r["system_tag"] == "Answer with knowledge from web search."
        assert 10 <= len(r["instruction"]) <= 800 and len(r["output"]) >= 300
        assert r["curation_score"] is None or 1 <= r["curation_score"] <= 5


@pytest.mark.timeout(900)
def test_realign_smollm2(tmp_path, vllm_smol):
    def tweak(d):
        d["stages"][0]["limit"] = 6
        _stage(d, "realign_rewrite")["sampling"].update(max_tokens=128)

    res, st = _run(_pipeline("realign", tweak), tmp_path / "out", vllm_smol)
    assert res.num_rows == 6  # nothing is deleted
    cats, _ = load_formats(PIPELINES / "data" / "realign_formats.yaml")
    # the few-shot classifier names real categories for most queries
    assert st["realign_classify"]["counts"].get("unknown_category", 0) <= 3
    ds = datasets.load_from_disk(str(res.dataset_dir))
    sent = 0
    for r in ds:
        assert r["category"] in cats
        assert r["realign_tag"] in ("rewrite", "original")
        if r["realign_tag"] == "original":
            assert r["output"] == r["original_response"]
        else:
            assert r["output"] != r["original_response"] and r["edit_rate"] > 0
        sent += bool(r["provenance"]) and r["provenance"][-1]["stage"] == "realign_rewrite"
    assert sent >= 1 and st["realign_rewrite"]["usage"]["requests"] == sent
