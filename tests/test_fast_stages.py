"""Every shipped pipeline, end to end, on a scripted fake model (fast tier).

Each test loads a pipeline file from ``pipelines/`` as it ships (only the
input size, the chunk size and the iterative stages' targets are made
smaller), runs it through the public API (``Pipeline.from_dict`` ->
``Runner`` with ``generators={"default": fake}``) and reads the rows back
from the run folder. The fake (``tests/fakes.py``) answers every prompt the
way the stage's parser expects, fails some requests on purpose, and records
every request it saw. Per pipeline:

1. a run with injected failures: rows kept, output columns, the failures
   counted (``failed_requests``) and recorded in ``run.json``, and the
   requests the fake saw (raw prompt vs chat, system prompts, ``n``,
   sampling settings);
2. ``resume`` once the failures are gone: only the chunks that had failed
   rows are sent again;
3. ``resume`` of the finished run: the same rows, every stage reused, no
   new ``generate``/``score`` call.

Nothing here imports stage classes: they are being rewritten, and these
tests must hold for any implementation of the same pipelines.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ has no __init__.py
# the per-pipeline scripts (the shipped file made small + its fake) live in scripted_runs, shared with
# other tests; test_sft_contract imports some of them from here (_category)
import scripted_runs
from fakes import FakeGenerator, Reply, last_user, request_text
from scripted_runs import (PIPELINES, SelfInstructScript, _category, _judged, _original, _segment,  # noqa: F401
                           novel_instruction, rows, run, shipped, stage_cfg)

from synthfb.engine import Pipeline, Runner, StageFailed
from synthfb.llm.types import GenerationRequest, Generator, SamplingParams, ScoreRequest
from synthfb.stages.realign_formats import load_formats


# -- helpers -----------------------------------------------------------------------------------------------------

def manifest(out: Path) -> dict[str, Any]:
    return json.loads((out / "run.json").read_text())


def by_id(rs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["row_id"]: r for r in rs}


def failures_of(m: dict[str, Any], i: int) -> list[dict[str, str]]:
    return m["stages"][i]["failures"]


def check_columns(rs: list[dict[str, Any]], expected: set[str]) -> None:
    assert rs, "no rows"
    assert set(rs[0]) == expected | {"row_id", "provenance"}, sorted(rs[0])
    assert len({r["row_id"] for r in rs}) == len(rs)


def check_provenance(rs: list[dict[str, Any]], fake: FakeGenerator) -> None:
    for r in rs:
        prov = r["provenance"][-1]
        assert prov["backend"] == fake.info.backend and prov["model"] == fake.info.name
        assert prov["model_revision"] == fake.info.revision


def check_params(req: GenerationRequest, **want: Any) -> None:
    got = {k: getattr(req.params, k) for k in want}
    want = {k: tuple(v) if isinstance(v, list) else v for k, v in want.items()}
    assert got == want


def resume_retries_then_reuses(d: dict[str, Any], out: Path, fake: FakeGenerator,
                               retried_stage: int) -> tuple[list[dict], list[GenerationRequest]]:
    """Steps 2 and 3 of the module docstring; the caller clears ``fake.failures`` first.
    ``retried_stage``: the first stage that had failed rows.

    Returns the rows of the complete run and the requests the retry sent."""
    fake.forget()
    res = run(d, out, fake, resume=True)
    m = res.manifest
    assert m["status"] == "finished"
    assert not any(s["failures"] for s in m["stages"])
    assert all(s["reused"] for s in m["stages"][:retried_stage])
    assert not m["stages"][retried_stage]["reused"]
    # only the chunks that had failed rows went to the model again
    assert fake.num_generate_calls + fake.num_score_calls >= 1
    full = rows(out)
    assert len(full) == res.num_rows
    retried = list(fake.requests)

    fake.forget()
    again = run(d, out, fake, resume=True)
    assert fake.num_generate_calls == 0 and fake.num_score_calls == 0, fake
    assert all(s["reused"] for s in again.manifest["stages"])
    assert rows(out) == full
    return full, retried


# -- the fake itself ---------------------------------------------------------------------------------------------

def test_fake_generator_shapes():
    fake = FakeGenerator(rules=[("json", '{"label": "yes"}'), ("list", ["a b", Reply("c", "length")]),
                                ("long", "one two three four five six")],
                         default="plain", failures={"boom": "HTTP 500: down"})
    assert isinstance(fake, Generator)
    reqs = [GenerationRequest(prompt="list", params=SamplingParams(n=3)),
            GenerationRequest(messages=[{"role": "user", "content": "json"}],
                              json_schema={"type": "object", "required": ["label"]}),
            GenerationRequest(messages=[{"role": "user", "content": "json"}], json_schema={"type": "array"}),
            GenerationRequest(prompt="boom"),
            GenerationRequest(prompt="long", params=SamplingParams(max_tokens=3)),
            GenerationRequest(prompt="long", params=SamplingParams(stop=[" four"])),
            GenerationRequest(prompt="other")]
    res = fake.generate(reqs, desc="t")
    assert len(res) == len(reqs)
    assert [c.text for c in res[0].completions] == ["a b", "c", "a b"]
    assert [c.finish_reason for c in res[0].completions] == ["stop", "length", "stop"]
    assert res[1].completions[0].parsed == {"label": "yes"} and res[1].completions[0].error is None
    assert res[2].completions[0].parsed is None and "schema violation" in res[2].completions[0].error
    assert res[3].error == "HTTP 500: down" and res[3].completions == []
    assert (res[4].completions[0].text, res[4].completions[0].finish_reason) == ("one two three", "length")
    assert (res[5].completions[0].text, res[5].completions[0].finish_reason) == ("one two three", "stop")
    assert res[6].completions[0].text == "plain" and res[6].completions[0].num_tokens == 1
    assert fake.usage.requests == 7 and fake.usage.failures == 1
    assert fake.num_generate_calls == 1 and fake.generate_calls[0][0] == "t" and fake.requests == reqs

    scored = FakeGenerator(logprobs=lambda ctx, cont: -1.0 if cont == " (A)" else -2.0,
                           score_failures={"bad": "engine died"})
    out = scored.score([ScoreRequest(" (A)", prompt="x"), ScoreRequest(" (B)", messages=[{"role": "user", "content": "y"}])])
    assert [r.logprob for r in out] == [-1.0, -2.0] and out[1].token_logprobs == [-2.0]
    assert scored.num_score_calls == 1 and len(scored.score_requests) == 2
    with pytest.raises(RuntimeError, match="engine died"):
        scored.score([ScoreRequest(" (A)", prompt="bad")])
    default = FakeGenerator()
    a, b = default.score([ScoreRequest(" (A)", prompt="x")] * 2)
    assert a.logprob == b.logprob < 0  # deterministic

    counter = itertools.count()
    fn = FakeGenerator(lambda req, k: f"{last_user(req)}-{k}-{next(counter)}")
    [r] = fn.generate([GenerationRequest(prompt="p", params=SamplingParams(n=2))])
    assert [c.text for c in r.completions] == ["p-0-0", "p-1-1"]


def test_every_shipped_pipeline_has_a_fast_test():
    """A new pipeline file needs its test here (loop files, without `stages`, are not pipelines)."""
    files = {f.stem for f in PIPELINES.glob("*.yaml") if "stages" in yaml.safe_load(f.read_text())}
    tested = {name[len("test_shipped_"):] for name in globals() if name.startswith("test_shipped_")}
    assert files == tested


# -- quickstart: load -> generate ---------------------------------------------------------------------------------

def test_shipped_quickstart(tmp_path):
    # chunk_size 3 (8 seeds: chunks of 3, 3, 2); the "friendly email" reply is longer than max_tokens 200
    d, fake = scripted_runs.quickstart(failures=[("why the sky is blue", "HTTP 500: engine crashed")])
    out = tmp_path / "run"
    res = run(d, out, fake)
    m = res.manifest
    seeds = [json.loads(x)["instruction"] for x in (PIPELINES / "seeds/quickstart.jsonl").read_text().splitlines()]
    # requests: one chat user turn per seed (respond.jinja is the instruction itself), no system prompt
    assert fake.num_generate_calls == 3
    assert [r.messages for r in fake.requests] == [[{"role": "user", "content": s}] for s in seeds]
    for r in fake.requests:
        check_params(r, n=1, temperature=0.7, top_p=0.9, max_tokens=200)
    # rows: every seed but the failed one, with its answer
    rs = rows(out)
    check_columns(rs, {"instruction", "response", "prompt", "completion"})
    assert m["status"] == "finished" and res.num_rows == len(rs) == len(seeds) - 1
    long_row = next(r for r in rs if "friendly email" in r["instruction"])
    assert long_row["response"] == " ".join(["word"] * 200)
    assert long_row["provenance"][-1]["finish_reason"] == "length"
    for r in rs:
        if r is not long_row:
            assert r["response"] == f"Answer: {r['instruction']}"
            assert r["provenance"][-1]["finish_reason"] == "stop"
    check_provenance(rs, fake)
    assert json.loads(rs[0]["provenance"][-1]["sampling"])["temperature"] == 0.7
    # the failure: counted and recorded, with the engine's message
    gen = m["stages"][1]
    assert gen["rows_in"] == len(seeds) and gen["rows_out"] == len(seeds) - 1
    assert gen["counts"]["failed_requests"] == 1 and gen["counts"]["truncated_outputs"] == 1
    [f] = gen["failures"]
    assert "HTTP 500: engine crashed" in f["reason"]
    assert f["row_id"] not in {r["row_id"] for r in rs}
    assert gen["usage"]["requests"] == len(seeds) and gen["usage"]["failures"] == 1

    fake.failures = []
    full, retried = resume_retries_then_reuses(d, out, fake, retried_stage=1)
    # "why the sky is blue" is seed 2 of 8: only chunk 0 (seeds 1-3) is sent again
    assert [last_user(r) for r in retried] == seeds[:3]
    assert len(full) == len(seeds)
    assert by_id(full)[f["row_id"]]["response"] == f"Answer: {seeds[1]}"
    assert {r["row_id"]: r["response"] for r in full}.items() >= {r["row_id"]: r["response"] for r in rs}.items()


def test_a_stage_whose_requests_all_fail_fails_the_run(tmp_path):
    d = shipped("quickstart")
    fake = FakeGenerator(failures=[(lambda req: True, "HTTP 500: no engine")])
    out = tmp_path / "run"
    with pytest.raises(StageFailed, match="8 of 8 row"):
        run(d, out, fake)
    m = manifest(out)
    assert m["status"] == "failed" and "HTTP 500: no engine" in m["error"]
    assert not (out / "dataset").exists()


# -- self_instruct: bootstrap -> classify -> instances ------------------------------------------------------------

def test_shipped_self_instruct(tmp_path):
    # chunk_size 4; bootstrap num_instructions=6, prompts_per_step=2, max_steps=6
    script = SelfInstructScript()
    first = novel_instruction(1)  # a classification task (the script says yes to every second one)
    d, fake = scripted_runs.self_instruct(
        script=script,
        failures=[(lambda req: "Is it classification?" in request_text(req) and SelfInstructScript.task(req) == first,
                   "HTTP 500: classifier down")])
    out = tmp_path / "run"
    res = run(d, out, fake)
    m = res.manifest
    assert [s["kind"] for s in m["stages"]] == ["load", "self_instruct_bootstrap", "self_instruct_classify",
                                                "self_instruct_instances"]
    texts = [request_text(r) for r in fake.requests]
    assert "unexpected prompt" not in json.dumps(rows(out))
    # bootstrap: 2 raw prompts per step, 8 demos each, ending in "9.", the reference decoding (max_tokens from the file)
    boot = [r for r, t in zip(fake.requests, texts) if "Write a list of new and varied tasks:" in t]
    assert len(boot) == 4  # 2 steps of 2 prompts: 4 accepted per step, target 6
    for r in boot:
        assert r.messages is None and r.prompt.endswith("\n9.") and "\n8. " in r.prompt
        check_params(r, n=1, temperature=0.7, top_p=0.5, presence_penalty=2.0, max_tokens=256)
    boot_rec = m["stages"][1]
    assert boot_rec["rows_out"] == 6 and boot_rec["counts"]["dropped_blacklisted_keyword"] >= 2
    # classify: greedy, raw, one request per new task
    clf = [r for r, t in zip(fake.requests, texts) if "Is it classification?" in t]
    assert len(clf) == 6 and all(r.prompt is not None for r in clf)
    for r in clf:
        check_params(r, temperature=0.0, max_tokens=3)
    [f] = failures_of(m, 2)
    assert "classifier down" in f["reason"] and m["stages"][2]["counts"]["failed_requests"] == 1
    # instances: one row per parsed instance, output-first for classification tasks
    rs = rows(out)
    check_columns(rs, {"instruction", "source", "step", "demo_ids", "rouge_l_max", "most_similar",
                       "is_classification", "input", "output", "generation_mode", "prompt", "completion"})
    assert len(rs) == 12  # 6 tasks x 2 instances
    tasks = {r["instruction"] for r in rs}
    assert len(tasks) == 6 and tasks <= set(script.is_clf) and first in tasks
    for r in rs:
        assert r["source"] == "machine" and len(r["demo_ids"]) == 8 and r["rouge_l_max"] < 0.7
        want_clf = script.is_clf[r["instruction"]] and r["instruction"] != first  # failed: unparseable_as (false)
        assert r["is_classification"] is want_clf
        if want_clf:
            assert r["generation_mode"] == "output_first" and r["output"] in ("Positive", "Negative")
            assert r["input"] in ("Text: I loved it.", "Text: I did not like it at all.")
        else:
            assert r["generation_mode"] == "input_first"
            assert (r["input"], r["output"]) in (("two apples", "a pair of apples"), ("three pears", "a few pears"))
    check_provenance(rs, fake)

    fake.failures = []
    full, retried = resume_retries_then_reuses(d, out, fake, retried_stage=2)
    assert len(retried) == 4 + 6  # classify: the failed row's chunk of 4; instances: all 6 tasks again
    assert len(full) == 12
    assert all(r["is_classification"] is script.is_clf[r["instruction"]] for r in full)


# -- alpaca: one iterative stage ---------------------------------------------------------------------------------

def test_shipped_alpaca(tmp_path):
    # bootstrap num_instructions=5, prompts_per_step=2, max_steps=8; `fill: fields`: per step three calls
    # (instruction, input, output) continuing each prompt; the scripted output is empty (a malformed block)
    # for tasks whose first word has an odd index in WORDS
    calls = itertools.count()
    d, fake = scripted_runs.alpaca(failures=[(lambda req: next(calls) == 1, "HTTP 429: rate limited")])
    out = tmp_path / "run"
    res = run(d, out, fake)
    m = res.manifest
    rs = rows(out)
    check_columns(rs, {"instruction", "input", "output", "source", "step", "demo_ids", "rouge_l_max",
                       "most_similar", "prompt", "completion"})
    assert res.num_rows == len(rs) == 5
    firsts = [r for r in fake.requests if r.prompt.endswith("4. Instruction:")]
    for r in fake.requests:
        assert r.messages is None and r.prompt.count("###") == 4
        assert any(r.prompt.startswith(f.prompt) for f in firsts)
    for r in firsts:
        check_params(r, n=1, temperature=1.0, top_p=1.0, max_tokens=128, stop=["\n"])
    rec = m["stages"][1]
    c = rec["counts"]
    # 5 steps x 2 prompts; the second instruction request failed (its prompt asks nothing more)
    assert len(firsts) == c["prompts"] == 10 and fake.num_generate_calls == 15 and len(fake.requests) == 28
    [f] = rec["failures"]
    assert "rate limited" in f["reason"] and c["failed_requests"] == 1
    assert c["outputs"] == 9 and c["parsed"] == 5 == c["accepted"] and c["dropped_malformed_block"] == 4
    assert rec["parse"] == {"outputs": 9, "parsed": 5, "rate": round(5 / 9, 4)}
    assert all((r["input"], r["output"]) == ("", "A short answer.") for r in rs)
    assert all(len(r["demo_ids"]) == 3 and r["source"] == "machine" for r in rs)
    check_provenance(rs, fake)

    # an iterative stage is retried from its first step with a failed request
    fake.failures = []
    full, retried = resume_retries_then_reuses(d, out, fake, retried_stage=1)
    firsts = [r for r in retried if r.prompt.endswith("4. Instruction:")]
    assert len(full) == 5 and len(firsts) % 2 == 0 and len(firsts) >= 6  # from step 0 again (2 prompts a step)
    assert len(retried) == 3 * len(firsts)  # without the failure: 3 calls for every prompt


# -- backtranslation: segments -> backtranslate -> self_curate ---------------------------------------------------

def test_shipped_backtranslation(tmp_path):
    # chunk_size 4; backward: "How do I <4 words>?" and a line after the stop string; ratings: "Deeper is
    # better" gets 2, 3, 2 (mean < min_score 4), "balcony garden needs" one unparseable rating and 5, 4
    d, fake = scripted_runs.backtranslation(
        failures=[(lambda req: "Request:" in request_text(req) and "budget is a plan" in _segment(req),
                   "HTTP 500: backward model crashed")])
    out = tmp_path / "run"
    res = run(d, out, fake)
    m = res.manifest
    segs, bt, cur = m["stages"][1], m["stages"][2], m["stages"][3]
    assert segs["rows_out"] >= 4 and segs["counts"]["dropped_segment_too_short"] >= 1  # no model in this stage
    back = [r for r in fake.requests if r.prompt and r.prompt.rstrip().endswith("Request:")]
    rate = [r for r in fake.requests if r.messages and "Judge whether the answer" in last_user(r)]
    assert len(back) == segs["rows_out"] and len(back) + len(rate) == len(fake.requests)
    for r in back:
        assert r.messages is None
        check_params(r, n=1, temperature=0.7, top_p=0.9, max_tokens=96, stop=["\n"])
    for r in rate:  # text scoring (the fake has no log-probs): a chat turn, 3 sampled ratings per row
        assert r.prompt is None and 'write the rating on the last line as "Score: <rating>"' in last_user(r)
        check_params(r, n=3, temperature=0.7, top_p=0.9, max_tokens=256)
    [f] = bt["failures"]
    assert "backward model crashed" in f["reason"] and bt["counts"]["failed_requests"] == 1
    assert bt["rows_out"] == segs["rows_out"] - 1 == len(rate)
    assert cur["counts"]["unparseable_ratings"] == 1 and cur["counts"]["dropped_below_min_score"] == 1
    rs = rows(out)
    check_columns(rs, {"document_id", "header", "output", "instruction", "source", "system_tag", "curation_score",
                       "curation_ratings", "prompt", "completion"})
    assert len(rs) == bt["rows_out"] - 1
    for r in rs:
        assert r["instruction"].startswith("How do I ") and r["instruction"].endswith("?")
        assert "stop string" not in r["instruction"]
        assert r["source"] == "augmented" and r["system_tag"] == "Answer with knowledge from web search."
        assert r["curation_score"] >= 4.0
        if "balcony garden needs" in r["output"]:
            assert r["curation_ratings"] == [None, 5, 4] and r["curation_score"] == 4.5
        else:
            assert r["curation_ratings"] == [5, 4, 5]
    check_provenance(rs, fake)

    fake.failures = []
    full, _ = resume_retries_then_reuses(d, out, fake, retried_stage=2)
    assert len(full) == len(rs) + 1
    assert any("budget is a plan" in r["output"] for r in full)


# -- realign: classify -> rewrite ------------------------------------------------------------------------------

def test_shipped_realign(tmp_path):
    # chunk_size 4; classify: _category; rewrite: " Too short." and a 2-step list of the original
    d, fake = scripted_runs.realign(failures=[(lambda req: "[Response start]" in request_text(req)
                                               and "egg" in _original(req), "HTTP 500: rewriter crashed")])
    out = tmp_path / "run"
    res = run(d, out, fake)
    m = res.manifest
    examples = [json.loads(x) for x in (PIPELINES / "data/realign_examples.jsonl").read_text().splitlines()]
    classify = [r for r in fake.requests if r.prompt.endswith("\nCategory:")]
    rewrite = [r for r in fake.requests if r not in classify]
    assert len(classify) == len(examples) == 12
    for r in classify:
        assert r.messages is None
        check_params(r, temperature=0.0, max_tokens=12, stop=["\n"])
    for r in rewrite:  # completion mode: the system prompt is a paragraph before the prompt; "Revised response:" prefill
        assert r.messages is None and r.prompt.startswith("You rewrite the format of an AI assistant's response")
        assert r.prompt.endswith("\nRevised response:")
        check_params(r, n=2, temperature=0.3, top_p=0.1, max_tokens=384)
    assert [s["counts"].get("unknown_category", 0) for s in m["stages"][1:]] == [1, 0]
    rs = rows(out)
    check_columns(rs, {"instruction", "output", "evidence", "category", "original_response", "realign_tag",
                       "realign_reason", "edit_rate", "retrieved_ids", "prompt", "completion"})
    assert len(rs) == 12  # realign keeps every row
    rewritable = {"how_to_generation", "code_generation", "open_qa"}
    by_q = {r["instruction"]: r for r in rs}
    assert by_q["Hi! How are you today?"]["category"] == "default"
    assert by_q["Write a short poem about the moon."]["realign_reason"] == "category_not_rewritten"
    assert len(rewrite) == sum(r["category"] in rewritable for r in rs)
    for r in rs:
        assert r["original_response"] in {e["output"] for e in examples}
        if r["category"] in rewritable and "egg" not in r["original_response"]:
            assert r["realign_tag"] == "rewrite" and r["realign_reason"] == ""
            assert r["output"] == f"1. {r['original_response']}\n2. One more step, to be clear."
        else:
            assert r["realign_tag"] == "original" and r["output"] == r["original_response"]
    # evidence: the top-5 BM25 snippets of the shipped corpus, only for rag categories (the `evidence` column is
    # not used by the shipped file); the snippet ids are recorded per row
    corpus = {x["id"]: x["text"] for x in map(json.loads, (PIPELINES / "data/realign_corpus.jsonl").read_text().splitlines())}
    rag = {k for k, v in load_formats(PIPELINES / "data/realign_formats.yaml")[0].items() if v.rag}
    for r in rs:
        if r["category"] not in rag or r["category"] not in rewritable:
            assert r["retrieved_ids"] == []
        else:
            assert 1 <= len(r["retrieved_ids"]) <= 5 and set(r["retrieved_ids"]) <= set(corpus)
    au = by_q["What is the capital of Australia?"]
    assert au["retrieved_ids"][0] == "canberra"
    [au_prompt] = [t.prompt for t in rewrite if "capital of Australia" in t.prompt]
    ev = au_prompt.split("[Evidence start]\n", 1)[1].split("[Evidence end]", 1)[0]
    assert ev.rstrip("\n") == "\n\n".join(f"{i}. {corpus[k]}" for i, k in enumerate(au["retrieved_ids"], 1))
    assert "Missing:" not in au_prompt and "No good Google" not in au_prompt  # the row's own evidence column
    [py] = [t.prompt for t in rewrite if "Python function" in t.prompt]  # code_generation: no retrieval
    assert "[Evidence start]" not in py
    [f] = failures_of(m, 2)
    assert "rewriter crashed" in f["reason"] and m["stages"][2]["counts"]["failed_requests"] == 1
    egg = next(r for r in rs if "egg" in r["instruction"])
    assert egg["realign_reason"] == "failed_request" and egg["row_id"] == f["row_id"]
    check_provenance(rs, fake)

    fake.failures = []
    full, retried = resume_retries_then_reuses(d, out, fake, retried_stage=2)
    assert fake.num_generate_calls == 0 and 1 <= len(retried) <= 4  # the rewrites of the failed row's chunk
    egg = next(r for r in full if "egg" in r["instruction"])
    assert egg["realign_tag"] == "rewrite"


# -- cai_sft: generate -> cai_revise ---------------------------------------------------------------------------

CAI_STOP = ["Critique request:", "Revision request:", "User:", "==="]  # transcript style's default stop strings


def _cai_inputs(n: int = 4) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (PIPELINES / "data/cai_sl_prompts.jsonl").read_text().splitlines()][:n]


def _own(req: GenerationRequest) -> str:
    """A transcript request's own part: the text after the few-shot examples."""
    head, sep, own = req.prompt.partition("\n=== Conversation ===\n")
    assert sep and head.count("=== Example ") == len(yaml.safe_load((PIPELINES / "data/cai_few_shot.yaml").read_text()))
    return own.lstrip("\n")


def test_shipped_cai_sft(tmp_path):
    # chunk_size 2, the first 4 prompts of the file: rt-01, rt-02 | hp-01 (helpful: true), rt-03;
    # revisions append " [rev]" to the current response; the critique of rt-02 fails
    d, fake = scripted_runs.cai_sft(
        failures=[(lambda req: (req.prompt or "").endswith("Critique:") and "partner's messages" in _own(req),
                   "HTTP 500: critic crashed")])
    constitution = yaml.safe_load((PIPELINES / "data/constitution.yaml").read_text())
    ids = {p["id"] for p in constitution["principles"]}
    examples = yaml.safe_load((PIPELINES / "data/cai_few_shot.yaml").read_text())
    out = tmp_path / "run"
    res = run(d, out, fake)
    m = res.manifest
    inputs = _cai_inputs()
    prompts = {r["prompt"] for r in inputs}
    # generate: 1 call per chunk; cai_revise: 4 rounds x (critiques, revisions) per chunk (hp-01 asks nothing)
    assert fake.num_generate_calls == 2 + 2 * 8
    crit = [r for r in fake.requests if (r.prompt or "").endswith("Critique:")]
    rev = [r for r in fake.requests if (r.prompt or "").endswith("Revision:")]
    assert len(crit) == 4 + 1 + 4  # rt-01, rt-02 (fails in round 1), rt-03
    assert len(rev) == 4 * 2
    assert not any("Give three tips" in request_text(r) for r in crit + rev)  # the helpful row is not revised
    for r in crit + rev:
        assert r.messages is None  # chat: false, a raw transcript as in the paper
        check_params(r, n=1, temperature=1.0, max_tokens=200, stop=CAI_STOP)
        # the few-shot exchanges come first, every round of each in order, then the sample's own transcript
        head = r.prompt.partition("=== Conversation ===")[0]
        at = [head.index(ex["prompt"]) for ex in examples]
        assert at == sorted(at) and all(rd["revision"] in head for ex in examples for rd in ex.get("rounds", []))
        assert _own(r).startswith("User: ") and _own(r).split("\n\n")[0].removeprefix("User: ") in prompts
    critiques = {p["critique"] for p in constitution["principles"]}
    revisions = {p["revision"] for p in constitution["principles"]}
    assert all(_own(r).count("Critique request: ") == _own(r).count("Critique:") for r in crit)
    assert all(any(_own(r).rstrip().endswith(f"Critique request: {c}\n\nCritique:") for c in critiques) for r in crit)
    assert all(any(f"Revision request: {c}\n\nRevision:" in _own(r) for c in revisions) for r in rev)
    [f] = failures_of(m, 2)
    assert "critic crashed" in f["reason"] and f["row_id"] == "rt-02"
    assert m["stages"][2]["counts"]["failed_requests"] == 1 and m["stages"][2]["counts"]["helpful_samples"] == 1
    rs = rows(out)
    check_columns(rs, {"id", "helpful", "prompt", "completion", "initial_response", "revision_step", "cai_steps"})
    # shipped `emit: all`: the paper trains on the revisions of every step, one SFT row each (row_id/k)
    assert sorted(r["row_id"] for r in rs) == ["hp-01"] + [f"{i}/{k}" for i in ("rt-01", "rt-03") for k in range(1, 5)]
    for r in rs:
        [user] = r["prompt"]
        assert user["role"] == "user" and user["content"] in prompts
        assert r["initial_response"] == f"First answer to: {user['content']}"
        if r["helpful"]:  # a helpfulness sample, mixed in unrevised
            assert r["row_id"] == "hp-01" and r["revision_step"] == 0 and r["cai_steps"] == []
            assert r["completion"] == [{"role": "assistant", "content": r["initial_response"]}]
            continue
        k = int(r["row_id"].split("/")[1])
        assert r["completion"] == [{"role": "assistant", "content": r["initial_response"] + " [rev]" * k}]
        assert r["revision_step"] == k and len(r["cai_steps"]) == 4
        assert {s["principle_id"] for s in r["cai_steps"]} <= ids
        # the critique ran on into "Revision request:", which the stop string cut
        assert all(s["critique"] == "The response could be more considerate." for s in r["cai_steps"])
    check_provenance(rs, fake)

    fake.failures = []
    full, retried = resume_retries_then_reuses(d, out, fake, retried_stage=2)
    assert len(retried) == 2 * 4 * 2  # the failed row's chunk (2 rows), 4 rounds of critique + revision
    assert len(full) == 1 + 3 * 4  # hp-01, and 4 revision rows for each of rt-01, rt-02, rt-03


def test_cai_transcript_grows_round_by_round(tmp_path):
    """One transcript per sample (Bai et al. 2022, section 3.1): round k's critique request is the
    transcript of round k-1's revision request plus that revision plus the next critique request,
    and each revision request is the critique request it follows plus the critique."""
    d, fake = scripted_runs.cai_sft()
    stage_cfg(d, "load")["limit"] = 2
    stage_cfg(d, "cai_revise").update(rounds=3, emit="final")
    rs = by_id(rows_of(run, d, tmp_path / "run", fake))
    reqs = [r for r in fake.requests if r.prompt is not None]
    for rid in ("rt-01", "rt-02"):
        src = next(x for x in _cai_inputs() if x["id"] == rid)
        mine = [r.prompt for r in reqs if _own(r).startswith(f"User: {src['prompt']}\n")]
        assert len(mine) == 6 and [p.endswith("Critique:") for p in mine] == [True, False] * 3
        steps = rs[rid]["cai_steps"]
        for k in range(1, 6):  # each request extends the one before it
            assert mine[k].startswith(mine[k - 1]), (rid, k)
        for k, step in enumerate(steps):
            crit_req, rev_req = mine[2 * k], mine[2 * k + 1]
            assert rev_req == f"{crit_req} {step['critique']}\n\nRevision request: " + \
                rev_req.rpartition("Revision request: ")[2]
            if k + 1 < len(steps):  # round k+1's critique request holds round k's critique and revision
                nxt = mine[2 * k + 2]
                assert nxt.startswith(f"{rev_req} {step['revision']}\n\nCritique request: ")
                own = nxt.partition("=== Conversation ===")[2]
                assert own.index(step["critique"]) < own.index(step["revision"]) < own.rindex("Critique request:")
        assert steps[-1]["revision"] == rs[rid]["initial_response"] + " [rev]" * 3


def rows_of(run_fn, d, out, fake):
    run_fn(d, out, fake)
    return rows(out)


def test_cai_separate_style_is_the_former_one(tmp_path):
    """`style: separate`: a fresh chat request per critique and revision showing only the current response,
    no few-shot turns by default, no stop strings: the requests of the stage before the transcript style."""
    d, fake = scripted_runs.cai_sft()
    cfg = stage_cfg(d, "cai_revise")
    cfg.update(style="separate", emit="final")
    del cfg["few_shot"]
    stage_cfg(d, "load")["limit"] = 3
    rs = by_id(rows_of(run, d, tmp_path / "run", fake))
    crit = [r for r in fake.requests if "Write a short critique" in last_user(r)]
    rev = [r for r in fake.requests if "Reply with only the revised response" in last_user(r)]
    assert len(crit) == len(rev) == 2 * 4 and len(fake.requests) == 3 + 16
    constitution = {p["id"]: p for p in yaml.safe_load((PIPELINES / "data/constitution.yaml").read_text())["principles"]}
    for rid in ("rt-01", "rt-02"):
        r = rs[rid]
        prompt, current = r["prompt"][0]["content"], r["initial_response"]
        mine_c = [q for q in crit if f"User: {prompt}\n" in last_user(q)]
        mine_r = [q for q in rev if f"User: {prompt}\n" in last_user(q)]
        for step, qc, qr in zip(r["cai_steps"], mine_c, mine_r):
            p = constitution[step["principle_id"]]
            assert [t["role"] for t in qc.messages] == ["user"] and [t["role"] for t in qr.messages] == ["user"]
            check_params(qc, n=1, temperature=1.0, max_tokens=200, stop=[])
            # the former templates, rendered with the current response only (no earlier round in the text)
            assert last_user(qc) == (
                "Below is a conversation between a user and an AI assistant.\n\n"
                f"User: {prompt}\n\nAssistant: {current}\n\nCritique request: {p['critique']}\n"
                "Write a short critique of the assistant's response (do not rewrite it yet).")
            assert last_user(qr) == (
                "Below is a conversation between a user and an AI assistant, followed by a critique of the "
                f"assistant's response.\n\nUser: {prompt}\n\nAssistant: {current}\n\n"
                f"Critique request: {p['critique']}\nCritique: {step['critique']}\n\n"
                f"Revision request: {p['revision']}\nReply with only the revised response, with no preamble.")
            current = step["revision"]
        assert r["completion"][0]["content"] == r["initial_response"] + " [rev]" * 4
    assert rs["hp-01"]["cai_steps"] == [] and rs["hp-01"]["revision_step"] == 0  # helpful rows: the same in both styles


# -- cai_preferences: generate (n=2) -> cai_label (log-probs) ---------------------------------------------------

def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_shipped_cai_preferences(tmp_path):
    # chunk_size 2, 4 prompts; a rude and a kind answer, the A/B judge prefers the kind one
    d, fake = scripted_runs.cai_preferences(failures=[("lost their job", "HTTP 500")])
    out = tmp_path / "run"
    res = run(d, out, fake)
    m = res.manifest
    assert len(fake.requests) == 4
    for r in fake.requests:
        check_params(r, n=2, temperature=1.0, max_tokens=200)
        assert [t["role"] for t in r.messages] == ["user"]
    # 3 labelled rows x 1 principle x 2 orders x 2 options, raw prompts (chat: false)
    assert len(fake.score_requests) == 3 * 4 and fake.num_score_calls == 2
    assert all(r.prompt is not None and r.continuation in (" (A)", " (B)") for r in fake.score_requests)
    assert all(r.prompt.rstrip().endswith("The answer is:") for r in fake.score_requests)
    [f] = failures_of(m, 1)
    assert f["reason"] == "HTTP 500" and m["stages"][1]["counts"]["failed_requests"] == 1
    rs = rows(out)
    check_columns(rs, {"id", "responses", "prompt", "chosen", "rejected", "score_chosen", "score_rejected", "score_margin",
                       "p_chosen", "p_response_1", "p_order_ab", "p_order_ba", "position_gap", "principle_ids",
                       "label_logprobs", "cot_rationales"})
    assert len(rs) == 3
    for r in rs:
        assert r["chosen"] == [{"role": "assistant", "content": "A kind and careful answer."}]
        assert r["rejected"] == [{"role": "assistant", "content": "A rude answer."}]
        assert r["p_chosen"] == pytest.approx(sigmoid(1.5)) and r["position_gap"] == pytest.approx(0.0)
        assert r["p_response_1"] == pytest.approx(1 - sigmoid(1.5))
        assert len(r["label_logprobs"]) == 2 and r["cot_rationales"] == []
    check_provenance(rs, fake)

    fake.failures = []
    full, _ = resume_retries_then_reuses(d, out, fake, retried_stage=1)
    assert len(full) == 4


def test_a_failing_score_call_fails_the_run(tmp_path):
    d = shipped("cai_preferences")
    stage_cfg(d, "load")["limit"] = 2
    fake = FakeGenerator(lambda req, k: ["A rude answer.", "A kind answer."][k],
                         score_failures=[(lambda req: True, "engine died")])
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="engine died"):
        run(d, out, fake)
    m = manifest(out)
    assert m["status"] == "failed" and "engine died" in m["error"]
    assert [s["kind"] for s in m["stages"]] == ["load", "generate"]


# -- judge_pairs: generate (n=4) -> judge_pairs ----------------------------------------------------------------

def test_shipped_judge_pairs(tmp_path):
    # chunk_size 2, 4 prompts; CANDIDATES judged as JUDGEMENTS says (the fake's backend: text scoring)
    d, fake = scripted_runs.judge_pairs(
        failures=[(lambda req: "<response>" in last_user(req) and "lost their job" in last_user(req)
                   and _judged(req) == "Short answer.", "HTTP 500: judge crashed")])
    out = tmp_path / "run"
    res = run(d, out, fake)
    m = res.manifest
    gen = [r for r in fake.requests if "<response>" not in last_user(r)]
    judge = [r for r in fake.requests if "<response>" in last_user(r)]
    assert len(gen) == 4 and len(judge) == 4 * 4
    for r in gen:
        check_params(r, n=4, temperature=0.7, top_p=0.9, max_tokens=256)
    for r in judge:
        assert [t["role"] for t in r.messages] == ["user"]
        check_params(r, n=3, temperature=0.7, top_p=0.9, max_tokens=200)
    rec = m["stages"][2]
    [f] = rec["failures"]
    assert "judge crashed" in f["reason"] and rec["counts"]["failed_requests"] == 1
    assert rec["counts"]["unparseable_judgements_no_score"] == 4
    assert rec["counts"]["unparseable_judgements_out_of_range"] == 4
    rs = rows(out)
    check_columns(rs, {"id", "responses", "prompt", "chosen", "rejected", "score_chosen", "score_rejected", "score_margin",
                       "all_scores", "judgements_parsed"})
    assert len(rs) == 4  # the row with a failed judgement still has 3 scored candidates
    for r in rs:
        assert r["chosen"] == [{"role": "assistant", "content": "The most complete answer."}]
        assert r["rejected"] == [{"role": "assistant", "content": "Off-topic text."}]
        assert r["score_chosen"] == 5.0 and r["score_rejected"] == 1.0 and r["score_margin"] == 4.0
        failed = "lost their job" in r["prompt"][0]["content"]
        assert r["all_scores"] == [None if failed else 2.0, 3.0, 5.0, 1.0]
        assert r["judgements_parsed"] == [0 if failed else 3, 3, 3, 1]
    check_provenance(rs, fake)

    fake.failures = []
    full, _ = resume_retries_then_reuses(d, out, fake, retried_stage=2)
    assert all(r["all_scores"] == [2.0, 3.0, 5.0, 1.0] for r in full)


# -- onpolicy_pairs: sample n=5 -> pairwise LLM judge over the full matrix ------------------------------------

def test_shipped_onpolicy_pairs(tmp_path):
    # chunk_size 2, 4 prompts; sample k has quality [3, 1, 4, 5, 2][k] ("sky is blue": 5 identical samples);
    # the A/B judge prefers the higher quality
    d, fake = scripted_runs.onpolicy_pairs(failures=[("tips for staying healthy", "HTTP 500")])
    out = tmp_path / "run"
    res = run(d, out, fake)
    m = res.manifest
    assert len(fake.requests) == 4
    for r in fake.requests:
        assert [t["role"] for t in r.messages] == ["user"]
        check_params(r, n=5, temperature=0.8, top_p=0.95, max_tokens=256)
    # 2 ranked prompts x 5 x 4 ordered pairs x 2 options, raw prompts of pairwise_judge.jinja
    assert len(fake.score_requests) == 2 * 5 * 4 * 2
    assert all(r.prompt is not None and r.prompt.endswith("The better answer is:") for r in fake.score_requests)
    rec = m["stages"][1]
    [f] = rec["failures"]
    assert f["reason"] == "HTTP 500" and rec["counts"]["failed_requests"] == 1
    assert rec["counts"]["all_responses_identical"] == 1
    rs = rows(out)
    check_columns(rs, {"id", "prompt", "chosen", "rejected", "score_chosen", "score_rejected", "score_margin",
                       "all_responses", "all_scores", "all_ranks", "comparison_matrix", "position_bias", "ranker"})
    assert len(rs) == 2
    for r in rs:
        assert r["chosen"] == [{"role": "assistant", "content": "Answer 3: quality 5"}]
        assert r["rejected"] == [{"role": "assistant", "content": "Answer 1: quality 1"}]
        assert r["all_ranks"] == [3, 5, 2, 1, 4] and r["ranker"] == "llm_judge:default"
        assert r["comparison_matrix"][3][1] == pytest.approx(0.5 * (5 - 1))
        assert r["position_bias"] == pytest.approx(0.0)
        assert [p["stage"] for p in r["provenance"]] == ["onpolicy_pairs", "onpolicy_pairs"]
    check_provenance(rs, fake)

    fake.failures = []
    full, retried = resume_retries_then_reuses(d, out, fake, retried_stage=1)
    assert len(full) == 3 and len(retried) == 2  # the failed row's chunk


def test_resume_retries_an_iterative_stage_that_failed_the_run(tmp_path):
    """The run ends when too many of an iterative stage's requests fail; --resume (as the message says)
    sends them again instead of failing on the stored record."""
    d = shipped("alpaca")
    stage_cfg(d, "alpaca_bootstrap").update(num_instructions=2, prompts_per_step=2, max_steps=2,
                                            fill="response")  # the reply below is a whole response
    count = itertools.count()

    def reply(req, k):
        a, b = (novel_instruction(200 + next(count)) for _ in range(2))
        return (f" {a}\n4. Input:\n<noinput>\n4. Output:\nAn answer.\n###\n"
                f"5. Instruction: {b}\n5. Input:\nsome input\n5. Output:\nAnother answer.\n###\n")

    fake = FakeGenerator(reply, failures=[(lambda req: True, "HTTP 503: overloaded")])
    out = tmp_path / "run"
    with pytest.raises(StageFailed, match="continue with --resume"):
        run(d, out, fake)
    fake.failures = []
    fake.forget()
    res = run(d, out, fake, resume=True)
    assert res.num_rows == 2 and fake.num_generate_calls == 1
    assert not res.manifest["stages"][1]["failures"]


def test_the_same_pipeline_object_runs_twice_alike(tmp_path):
    """backtranslation_segments dedupes across chunks; what it has seen must not leak into the next run
    of the same Pipeline object (it once dropped every segment of the second run as a duplicate)."""
    p = Pipeline.from_dict(shipped("backtranslation"), PIPELINES)
    got = []
    for name in ("a", "b"):
        fake = FakeGenerator(rules=[("Request:", " How do I do this thing well?"), ("Rate the answer", " 5")])
        res = Runner(p, tmp_path / name, generators={"default": fake}, progress=False).run()
        got.append(res.manifest["stages"][1]["rows_out"])
    assert got[0] > 0 and got[1] == got[0]


def test_segment_dedupe_across_chunks_survives_a_resume(tmp_path):
    """A run killed mid-stage (its last chunk missing, as a SIGKILL leaves it) and resumed keeps the
    rows of an uninterrupted run: a duplicate of a segment in an already finished chunk is still dropped."""
    seg = "This paragraph is long enough to be a segment of its own. " * 7
    (tmp_path / "docs.jsonl").write_text(
        "".join(json.dumps({"id": f"d{i}", "text": f"# Title {i}\n\n{seg}"}) + "\n" for i in range(3)))
    d = {"name": "segs", "chunk_size": 1, "stages": [{"stage": "load", "path": "docs.jsonl", "id_column": "id"},
                                                     {"stage": "backtranslation_segments"}]}

    def go(out, **kw):
        return Runner(Pipeline.from_dict(copy.deepcopy(d), tmp_path), out, progress=False, **kw).run()

    assert go(tmp_path / "ref").num_rows == 1
    out = tmp_path / "killed"
    go(out)
    sdir = out / "stages" / "01-backtranslation_segments"
    for f in sdir.glob("chunk-00002.*"):
        f.unlink()
    meta = json.loads((sdir / "stage.json").read_text())
    (sdir / "stage.json").write_text(json.dumps({**meta, "finished": False}))
    res = go(out, resume=True)
    assert [r["row_id"] for r in rows(out)] == ["d0/0"] and res.num_rows == 1


# -- kpdds: extract -> TCPM questions -> score -> solve + vote (issue #14; more in tests/test_kpdds.py) --------------

def test_shipped_kpdds(tmp_path):
    def pencils(req):
        return "specialist in mathematics education" in request_text(req) and "pencils" in request_text(req)

    d, fake = scripted_runs.kpdds(failures=[(pencils, "HTTP 500: engine crashed")])
    out = tmp_path / "run"
    res = run(d, out, fake)
    st = res.manifest["stages"]
    seeds = st[0]["rows_out"]
    assert st[1]["counts"]["failed_requests"] == 1 and st[1]["rows_out"] == seeds - 2  # + the unparseable one
    extract = [r for r in fake.requests if "specialist in mathematics education" in request_text(r)]
    assert len(extract) == seeds
    for r in extract:
        check_params(r, n=1, temperature=0.0, max_tokens=512)
    solve = [r for r in fake.requests if "Solve the problem step by step" in request_text(r)]
    for r in solve:
        check_params(r, n=10, temperature=0.75, top_p=0.95, max_tokens=512)
    rs = rows(out)
    check_columns(rs, {"prompt", "completion", "solution", "question", "answer", "answer_extracted", "agreement",
                       "consensus_scores",
                       "num_solutions", "num_sampled", "question_score", "topics", "key_points", "kp_prompt",
                       "practice", "practice_ids", "step"})
    check_provenance(rs, fake)
    fake.failures = []
    full, _ = resume_retries_then_reuses(d, out, fake, retried_stage=1)
    assert len(full) >= len(rs) and {r["answer"][0] for r in full} == {"7"}


def test_shipped_best_of_n(tmp_path):
    """The scripted judge scores every sample but those of the password prompt, which leaves as
    too_few_scored; each kept row's completion is its own argmax of `all_scores`. One failed
    generate request is retried on --resume."""
    seen: list[str] = []

    def first(req):  # the first sampling request only (one prompt's samples)
        text = request_text(req)
        if "password" in text or "Rate" in text or (seen and seen[0] != text):
            return False
        seen[:1] = [text]
        return True

    d, fake = scripted_runs.best_of_n()
    out = tmp_path / "run"
    res = run(d, out, fake)
    st = res.manifest["stages"]
    assert st[1]["counts"]["dropped_too_few_scored"] == 1 and st[1]["rows_out"] == st[0]["rows_out"] - 1
    rs = rows(out)
    check_columns(rs, {"id", "prompt", "completion", "score", "score_gap", "selected_rank", "all_responses",
                       "all_scores", "scorer"})
    for r in rs:
        scores = [s for s in r["all_scores"] if s is not None]
        assert r["score"] == max(scores) and r["score_gap"] >= 0
        assert r["completion"][0]["content"] == r["all_responses"][r["all_scores"].index(r["score"])]
    check_provenance(rs, fake)
    d2, fake2 = scripted_runs.best_of_n(failures=[(first, "HTTP 500: engine crashed")])
    out2 = tmp_path / "run2"
    assert run(d2, out2, fake2).manifest["stages"][1]["counts"]["failed_requests"] >= 1
    fake2.failures = []
    full, _ = resume_retries_then_reuses(d2, out2, fake2, retried_stage=1)
    assert full == rs


def test_shipped_consistency(tmp_path):
    """Of the seven scripted problems: one text answer disagrees with its program, one program raises,
    one reply has no program; every kept row's two routes agree and match the gold answer."""
    d, fake = scripted_runs.consistency()
    out = tmp_path / "run"
    res = run(d, out, fake)
    c = res.manifest["stages"][1]["counts"]
    assert (c["dropped_answers_disagree"], c["dropped_program_error"], c["dropped_no_program"]) == (1, 1, 1)
    rs = rows(out)
    assert len(rs) == res.manifest["stages"][0]["rows_out"] - 3 == c["agreed"] == c["kept_matching_gold"]
    gold = scripted_runs.consistency_answers()
    for r in rs:
        assert r["answers_agree"] and r["program_status"] == "ok"
        assert float(r["first_answer"]) == float(r["second_answer"]) == float(gold[r["question"]])
    check_columns(rs, {"id", "prompt", "completion", "question", "answer", "answers_agree", "answer_extracted",
                       "first_answer", "first_solution", "program_status", "second_answer", "second_solution"})
    check_provenance(rs, fake)


def test_shipped_rso_pairs(tmp_path):
    """8 candidates + 1 baseline per prompt, 4 accepted, first-round pairs; chosen always scores higher,
    and a second run gives the same pairs (seeded acceptance)."""
    d, fake = scripted_runs.rso_pairs()
    out = tmp_path / "run"
    res = run(d, out, fake)
    c = res.manifest["stages"][1]["counts"]
    prompts = res.manifest["stages"][0]["rows_out"]
    assert c["candidates"] == 8 * prompts and c["accepted"] == 4 * prompts
    rs = rows(out)
    assert len(rs) == 2 * prompts - c.get("dropped_tied_pairs", 0)
    for r in rs:
        assert r["score_chosen"] > r["score_rejected"]
        assert math.isclose(r["score_margin"], r["score_chosen"] - r["score_rejected"], rel_tol=1e-9)
    check_columns(rs, {"id", "prompt", "chosen", "rejected", "score_chosen", "score_rejected", "score_margin",
                       "accepted", "all_scores", "pair_index", "scorer"})
    check_provenance(rs, fake)
    d2, fake2 = scripted_runs.rso_pairs()
    run(d2, tmp_path / "again", fake2)
    assert [(r["chosen"], r["rejected"]) for r in rows(tmp_path / "again")] == [(r["chosen"], r["rejected"]) for r in rs]


# -- humpback_backward / humpback_seed (no model) and humpback_iterate (M_yx + curator) ------------------------------

def test_shipped_humpback_backward(tmp_path):
    """Reversed seed pairs: prompt = the seed output (user turn), completion = the instruction; no model call."""
    d, fake = scripted_runs.humpback_backward()
    run(d, tmp_path / "run", fake)
    rs = rows(tmp_path / "run")
    assert rs and all(set(r) == {"row_id", "instruction", "output", "evidence", "prompt", "completion"} for r in rs)
    assert fake.num_generate_calls == 0 and fake.num_score_calls == 0
    for r in rs:
        assert (r["prompt"], r["completion"]) == ([{"role": "user", "content": r["output"]}],
                                                  [{"role": "assistant", "content": r["instruction"]}])


def test_shipped_humpback_seed(tmp_path):
    """Seed pairs tagged S_a: the tag as the system message, instruction -> output; no model call."""
    from synthfb.stages.backtranslation import SEED_TAG

    d, fake = scripted_runs.humpback_seed()
    run(d, tmp_path / "run", fake)
    rs = rows(tmp_path / "run")
    assert rs and all(set(r) == {"row_id", "instruction", "output", "evidence", "source", "system_tag", "prompt",
                                 "completion"} for r in rs)
    assert fake.num_generate_calls == 0
    assert all(r["prompt"][0] == {"role": "system", "content": SEED_TAG} and r["source"] == "seed" for r in rs)


def test_shipped_humpback_iterate(tmp_path):
    """M_yx is asked with the bare segment (one user turn, no few-shot prompt); one rating per row; a failed
    backward request is retried on --resume and the curation of that chunk redone."""
    d, fake = scripted_runs.humpback_iterate(
        failures=[(lambda req: req.messages and "budget is a plan" in last_user(req)
                   and "Judge whether" not in last_user(req), "HTTP 500: backward model crashed")])
    out = tmp_path / "run"
    m = run(d, out, fake).manifest
    segs, bt, cur = m["stages"][1], m["stages"][2], m["stages"][3]
    back = [r for r in fake.requests if "Judge whether the answer" not in last_user(r)]
    rate = [r for r in fake.requests if "Judge whether the answer" in last_user(r)]
    assert len(back) == segs["rows_out"] and bt["counts"]["failed_requests"] == 1
    for r in back:
        assert r.prompt is None and len(r.messages) == 1 and r.messages[0]["role"] == "user"
        assert "Request:" not in r.messages[0]["content"]
        check_params(r, n=1, temperature=0.7, top_p=0.9, max_tokens=96)
    for r in rate:
        check_params(r, n=1, temperature=0.7, top_p=0.9, max_tokens=256)
    assert len(rate) == bt["rows_out"] == segs["rows_out"] - 1
    # one rating per row: "Deeper is better" 2 (below A_5), "balcony garden needs" unparseable (unrated)
    assert cur["counts"]["dropped_below_min_score"] == 1 and cur["counts"]["dropped_unrated"] == 1
    rs = rows(out)
    check_columns(rs, {"document_id", "header", "output", "instruction", "source", "system_tag", "curation_score",
                       "curation_ratings", "prompt", "completion"})
    assert len(rs) == bt["rows_out"] - 2 and all(r["curation_score"] == 5.0 for r in rs)
    check_provenance(rs, fake)
    fake.failures = []
    full, _ = resume_retries_then_reuses(d, out, fake, retried_stage=2)
    assert len(full) == len(rs) + 1
