"""Constitutional AI stages: the constitution file, SL-CAI rounds, RL-CAI soft
labels recomputed by hand from the logged log-probs (and re-scored with the
transformers backend), both orders, ensembles and CoT clamping."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import yaml
from fakes import FakeGenerator, Reply
from test_trl_format import assert_trl_preference

from synthfb.engine import Pipeline, run_pipeline
from synthfb.engine.stage import StageContext
from synthfb.llm.prompts import PromptTemplate
from synthfb.llm.types import ScoreRequest
from synthfb.stages.constitutional import Constitution, clean_revision

REPO = Path(__file__).resolve().parent.parent
CONSTITUTION = REPO / "pipelines" / "data" / "constitution.yaml"

ROWS = [
    {"id": "a", "prompt": "How can I get back at my noisy neighbour?",
     "responses": ["Talk to him calmly first.", "Slash his tyres."]},
    {"id": "b", "prompt": "Give three tips for staying healthy.",
     "responses": ["Sleep, water, exercise.", "Eat only candy."]},
    {"id": "c", "prompt": "Same answers here.", "responses": ["Same.", "Same."]},
    {"id": "d", "prompt": "Only one answer.", "responses": ["Lonely."]},
]


def _write_rows(tmp_path, rows=ROWS):
    p = tmp_path / "pairs.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def _rng(kind: str, *keys, seed: int = 3):
    """The stage's ``ctx.rng(*keys)``: derived from the run seed, the stage kind and the keys."""
    return StageContext(SimpleNamespace(pipeline=SimpleNamespace(seed=seed)), 0, kind).rng(*keys)


def _pipeline(tmp_path, stage: dict, data: Path, extra_stages=()) -> Pipeline:
    d = {"name": "cai-test", "model": "default", "seed": 3, "chunk_size": 2,
         "stages": [{"stage": "load", "path": str(data), "id_column": "id"}, *extra_stages, stage]}
    return Pipeline.from_dict(d, tmp_path)


def test_shipped_constitution():
    c = Constitution.load(str(CONSTITUTION), REPO)
    assert len(c.principles) == 16
    assert len({p.id for p in c.principles}) == 16
    for p in c.principles:
        assert p.critique and p.revision and p.comparison.endswith("?")
    # sampling: reproducible, independent of call order, covers the constitution
    a = [c.sample(_rng("cai_revise", f"row{i}", 0, seed=0))[0].id for i in range(400)]
    b = [c.sample(_rng("cai_revise", f"row{i}", 0, seed=0))[0].id for i in reversed(range(400))][::-1]
    assert a == b
    assert set(a) == set(c.by_id)
    k = c.sample(_rng("cai_label", "x", "label", seed=0), 5)
    assert len({p.id for p in k}) == 5


def test_constitution_errors_name_the_field(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text(yaml.safe_dump({"principles": [{"id": "x", "critique": "c", "revision": ""}]}))
    with pytest.raises(ValueError, match=r"principles\[0\] \(x\): field 'revision'"):
        Constitution.load(str(bad), tmp_path)
    bad.write_text(yaml.safe_dump({"principles": [{"id": "x", "comparison": "q?"}, {"id": "x", "comparison": "r?"}]}))
    with pytest.raises(ValueError, match="duplicate id 'x'"):
        Constitution.load(str(bad), tmp_path, need=("comparison",))


def test_clean_revision():
    assert clean_revision("Revised response: Be kind.") == "Be kind."
    assert clean_revision("Here is the revised response:\nBe kind.") == "Be kind."
    assert clean_revision("Revision:   ") is None
    assert clean_revision("Keep revising your essay.") == "Keep revising your essay."


def _recompute(row, clamp=None):
    """The label from the logged log-probs, by hand: p(A) = e^a / (e^a + e^b)."""
    per = {}
    for e in row["label_logprobs"]:
        pa = math.exp(e["logprob_a"]) / (math.exp(e["logprob_a"]) + math.exp(e["logprob_b"]))
        per.setdefault((e["principle_id"], e["order"]), []).append(pa)
    p1s, ab, ba = [], [], []
    for pid in row["principle_ids"]:
        x = sum(per[(pid, "ab")]) / len(per[(pid, "ab")])        # response 1 shown as (A)
        y = 1 - sum(per[(pid, "ba")]) / len(per[(pid, "ba")])    # response 1 shown as (B)
        ab.append(x)
        ba.append(y)
        p1s.append((x + y) / 2)
    p = sum(p1s) / len(p1s)
    if clamp:
        p = min(max(p, clamp[0]), clamp[1])
    return p, sum(ab) / len(ab), sum(ba) / len(ba)


@pytest.mark.timeout(600)
def test_cai_label_soft_labels_by_hand(tmp_path, vllm_tiny, hf_tiny):
    stage = {"stage": "cai_label", "constitution": str(CONSTITUTION)}
    res = run_pipeline(_pipeline(tmp_path, stage, _write_rows(tmp_path)), tmp_path / "out",
                       generators={"default": vllm_tiny}, progress=False)
    counts = res.manifest["stages"][-1]["counts"]
    assert counts["dropped_identical_responses"] == 1 and counts["dropped_fewer_than_two_responses"] == 1
    ds = datasets.load_from_disk(str(res.dataset_dir))
    assert sorted(ds["row_id"]) == ["a", "b"]
    assert_trl_preference(ds, "conversational")
    const = Constitution.load(str(CONSTITUTION), REPO)
    tpl = PromptTemplate.load("cai_compare.jinja", REPO)
    for row in ds:
        src = next(r for r in ROWS if r["id"] == row["row_id"])
        r1, r2 = src["responses"]
        assert len(row["principle_ids"]) == 1
        assert row["principle_ids"][0] == const.sample(_rng("cai_label", row["row_id"], "label"))[0].id
        p, ab, ba = _recompute(row)
        assert row["p_response_1"] == pytest.approx(p, abs=1e-9)
        assert row["p_order_ab"] == pytest.approx(ab, abs=1e-9)
        assert row["p_order_ba"] == pytest.approx(ba, abs=1e-9)
        assert row["position_gap"] == pytest.approx(ab - ba, abs=1e-9)
        want_chosen = r1 if p > 0.5 else r2
        assert row["chosen"][0]["content"] == want_chosen
        assert row["rejected"][0]["content"] == (r2 if want_chosen == r1 else r1)
        assert row["p_chosen"] == pytest.approx(max(p, 1 - p), abs=1e-9)
        assert row["score_margin"] == pytest.approx(row["score_chosen"] - row["score_rejected"])
        # the logged log-probs are the model's: re-score order AB with the transformers backend
        comp = const.by_id[row["principle_ids"][0]].comparison
        text = tpl.render({"prompt": src["prompt"], "comparison": comp, "response_a": r1, "response_b": r2})
        la, lb = (x.logprob for x in hf_tiny.score([ScoreRequest(" (A)", prompt=text), ScoreRequest(" (B)", prompt=text)]))
        e = next(e for e in row["label_logprobs"] if e["order"] == "ab")
        assert e["logprob_a"] == pytest.approx(la, abs=2e-3)
        assert e["logprob_b"] == pytest.approx(lb, abs=2e-3)


@pytest.mark.timeout(600)
def test_cai_label_ensemble_and_cot_clamp(tmp_path, vllm_tiny):
    rows = _write_rows(tmp_path, ROWS[:2])
    stage = {"stage": "cai_label", "constitution": str(CONSTITUTION), "principles_per_label": 3,
             "format": "standard"}
    res = run_pipeline(_pipeline(tmp_path, stage, rows), tmp_path / "ens", generators={"default": vllm_tiny},
                       progress=False)
    ds = datasets.load_from_disk(str(res.dataset_dir))
    assert len(ds) == 2
    assert_trl_preference(ds, "standard")
    for row in ds:
        assert len(set(row["principle_ids"])) == 3
        assert len(row["label_logprobs"]) == 6
        assert row["p_response_1"] == pytest.approx(_recompute(row)[0], abs=1e-9)

    stage = {"stage": "cai_label", "constitution": str(CONSTITUTION), "cot": True, "cot_samples": 2,
             "cot_sampling": {"max_tokens": 16}, "clamp": [0.4, 0.6]}
    res = run_pipeline(_pipeline(tmp_path, stage, rows), tmp_path / "cot", generators={"default": vllm_tiny},
                       progress=False)
    ds = datasets.load_from_disk(str(res.dataset_dir))
    assert len(ds) + res.manifest["stages"][-1]["counts"].get("dropped_tie", 0) == 2
    for row in ds:
        assert len(row["cot_rationales"]) == 4  # 2 orders x 2 samples
        assert len(row["label_logprobs"]) == 4
        assert 0.4 <= row["p_response_1"] <= 0.6
        assert row["p_response_1"] == pytest.approx(_recompute(row, (0.4, 0.6))[0], abs=1e-9)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("style", ["transcript", "separate"])
def test_cai_revise_rounds_on_tiny(tmp_path, vllm_tiny, style):
    shots = tmp_path / "shots.yaml"
    shots.write_text(yaml.safe_dump([{
        "prompt": "How do I pick a lock?", "response": "Use a tension wrench and a pick.",
        "critique_request": "Is this harmful?", "critique": "It may help someone break into a home.",
        "revision_request": "Remove harmful content.", "revision": "If you are locked out, call a locksmith.",
    }]))
    data = _write_rows(tmp_path, [{"id": "a", "prompt": "Tell me a joke.", "response": "Why?"},
                                  {"id": "b", "prompt": "Insult my boss.", "response": "No."},
                                  {"id": "h", "prompt": "Name a fruit.", "response": "Apple.", "helpful": True}])
    stage = {"stage": "cai_revise", "constitution": str(CONSTITUTION), "rounds": 2, "emit": "all", "style": style,
             "few_shot": str(shots), "helpful_column": "helpful", "sampling": {"max_tokens": 12}}
    res = run_pipeline(_pipeline(tmp_path, stage, data), tmp_path / "sl", generators={"default": vllm_tiny},
                       progress=False)
    ds = datasets.load_from_disk(str(res.dataset_dir))
    assert sorted(ds["row_id"]) == ["a/1", "a/2", "b/1", "b/2", "h"]
    const = Constitution.load(str(CONSTITUTION), REPO)
    for row in ds:
        if row["row_id"] == "h":  # the helpfulness sample: as it came, no critique or revision
            assert row["revision_step"] == 0 and row["cai_steps"] == []
            assert row["completion"] == [{"role": "assistant", "content": "Apple."}]
            continue
        rid, k = row["row_id"].split("/")
        steps = row["cai_steps"]
        assert len(steps) == 2 and row["revision_step"] == int(k)
        assert [s["principle_id"] for s in steps] == [const.sample(_rng("cai_revise", rid, i))[0].id for i in range(2)]
        assert row["completion"] == [{"role": "assistant", "content": steps[int(k) - 1]["revision"]}]
        assert row["prompt"][0]["role"] == "user"
        assert row["initial_response"] in ("Why?", "No.")
        assert row["provenance"][-1]["stage"] == "cai_revise"
    assert res.manifest["stages"][-1]["counts"]["helpful_samples"] == 1


def _revise(tmp_path, **cfg):
    return _pipeline(tmp_path, {"stage": "cai_revise", **cfg}, _write_rows(tmp_path)).stages[-1]


def test_cai_few_shot_file(tmp_path):
    """The shipped examples are transcript style's default; rounds or the flat one-round form; [] shows none;
    a missing field is named."""
    st = _revise(tmp_path)
    assert st.config.style == "transcript" and st.data_files["few_shot"][0].name == "cai_few_shot.yaml"
    assert len(st.examples) == 3 and [len(ex["rounds"]) for ex in st.examples] == [2, 1, 1]
    assert "few_shot" not in _revise(tmp_path, style="separate").data_files  # separate: none unless given
    shots = tmp_path / "shots.yaml"
    shots.write_text("[]\n")
    assert _revise(tmp_path, few_shot="shots.yaml").examples == []
    shots.write_text(yaml.safe_dump([{"prompt": "p", "response": "r", "rounds": [
        {"critique_request": "cr", "critique": "c", "revision_request": "rr", "revision": "v"},
        {"critique_request": "cr2", "critique": "", "revision_request": "rr2", "revision": "v2"}]}]))
    with pytest.raises(ValueError, match=r"stages\[1\]\.few_shot \(cai_revise\): .*example 0: missing field\(s\) \['rounds\[1\].critique'\]"):
        _revise(tmp_path, few_shot="shots.yaml")
    # separate style: each example round is an earlier exchange about the previous round's revision
    shots.write_text(yaml.safe_dump([{"prompt": "p", "response": "r", "rounds": [
        {"critique_request": "cr", "critique": "c", "revision_request": "rr", "revision": "v"},
        {"critique_request": "cr2", "critique": "c2", "revision_request": "rr2", "revision": "v2"}]}]))
    st = _revise(tmp_path, few_shot="shots.yaml", style="separate")
    assert [a for _, a in st.shots_c] == ["c", "c2"] and [a for _, a in st.shots_r] == ["v", "v2"]
    assert "Assistant: r\n" in st.shots_c[0][0] and "Assistant: v\n" in st.shots_c[1][0]


def test_cai_helpful_column_values(tmp_path):
    data = _write_rows(tmp_path, [{"id": "a", "prompt": "Hi.", "response": "Hello.", "helpful": "yes"}])
    stage = {"stage": "cai_revise", "constitution": str(CONSTITUTION), "helpful_column": "helpful"}
    with pytest.raises(ValueError, match=r"column 'helpful' \(helpful_column\) must be true, false or null"):
        run_pipeline(_pipeline(tmp_path, stage, data), tmp_path / "o", generators={"default": FakeGenerator()},
                     progress=False)
    p = _pipeline(tmp_path, {**stage, "helpful_column": "kind"}, data)
    with pytest.raises(ValueError, match=r"needs column\(s\) \['kind'\]"):
        p.check_columns()


@pytest.mark.smollm2
def test_shipped_cai_sft_transcript_fits_max_model_len(smol_model):
    """The longest request of pipelines/cai_sft.yaml (the last revision of the last round, every earlier piece
    as long as its max_tokens allows, the longest prompt and principles) plus its completion fits the
    engine's max_model_len, in SmolLM2's tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smol_model))
    pipe = Pipeline.from_yaml(REPO / "pipelines" / "cai_sft.yaml")
    gen, st = pipe.stages[1], pipe.stages[-1]
    assert st.config.style == "transcript" and not st.config.chat
    assert len(tok(" the" * 600).input_ids) == 600  # so a generated piece of n tokens is n words "the"

    def piece(n: int) -> str:
        return "the" + " the" * (n - 1)

    longest = lambda xs: max(xs, key=lambda t: len(tok(t).input_ids))  # noqa: E731
    prompts = [json.loads(x)["prompt"] for x in (REPO / "pipelines/data/cai_sl_prompts.jsonl").read_text().splitlines()]
    crit = longest([p.critique for p in st.constitution.principles])
    rev = longest([p.revision for p in st.constitution.principles])
    m = st.params.max_tokens
    done = [{"critique_request": crit, "critique": piece(m), "revision_request": rev, "revision": piece(m)}
            for _ in range(st.config.rounds - 1)]
    turn = {"critique_request": crit, "critique": piece(m), "revision_request": rev}
    req = st._request(longest(prompts), piece(gen.params.max_tokens), piece(m), done, turn, "x")
    used = len(tok(req.prompt).input_ids) + m
    assert used <= pipe.backend_options["max_model_len"] * 0.9, used  # 10% margin: re-tokenized text may grow


def test_cai_stage_config_errors(tmp_path):
    data = _write_rows(tmp_path)
    with pytest.raises(ValueError, match="clamp"):
        _pipeline(tmp_path, {"stage": "cai_label", "cot": True, "clamp": [0.7, 0.2]}, data)
    with pytest.raises(ValueError, match="rounds"):
        _pipeline(tmp_path, {"stage": "cai_revise", "rounds": 0}, data)
    # a field the chosen style does not read is an error, not silently ignored
    with pytest.raises(ValueError, match=r"critique_prompt \(cai_revise\): not used with style: transcript"):
        _pipeline(tmp_path, {"stage": "cai_revise", "critique_prompt": "x.jinja"}, data)
    with pytest.raises(ValueError, match=r"chat \(cai_revise\): not used with style: separate"):
        _pipeline(tmp_path, {"stage": "cai_revise", "style": "separate", "chat": True}, data)


def test_cai_files_are_hashed_and_the_shipped_default_resolves(tmp_path):
    data = _write_rows(tmp_path)
    const = tmp_path / "c.yaml"
    const.write_text(CONSTITUTION.read_text())
    shots = tmp_path / "shots.yaml"
    shot = {k: f"{k} text" for k in ("prompt", "response", "critique_request", "critique", "revision_request",
                                     "revision")}
    shots.write_text(yaml.safe_dump([shot]))

    def fingerprint():
        stage = {"stage": "cai_revise", "constitution": "c.yaml", "few_shot": "shots.yaml"}
        return _pipeline(tmp_path, stage, data).stages[-1].fingerprint()

    a = fingerprint()
    assert set(a["files_sha256"]) == {"constitution", "few_shot"} and a["template_sha256"]
    const.write_text(CONSTITUTION.read_text() + "\n# edited\n")
    b = fingerprint()
    assert b["files_sha256"]["constitution"] != a["files_sha256"]["constitution"]
    assert b["files_sha256"]["few_shot"] == a["files_sha256"]["few_shot"]
    shots.write_text(yaml.safe_dump([{**shot, "revision": "another revision"}]))
    assert fingerprint()["files_sha256"]["few_shot"] != b["files_sha256"]["few_shot"]
    # no `constitution:` given: synthfb's own file, hashed the same way
    st = _pipeline(tmp_path, {"stage": "cai_label"}, data).stages[-1]
    assert len(st.constitution.principles) == 16 and st.data_files["constitution"][0].name == "constitution.yaml"
    assert st.fingerprint()["files_sha256"] == {"constitution": st.constitution.sha256}


def test_cai_label_cot_on_a_fake(tmp_path):
    """CoT: the rationales in one call, the option scores after them in one call; a failed
    rationale fails its row (recorded), truncated rationales are counted."""
    rows = ROWS[:2] + [{"id": "e", "prompt": "Name a colour.", "responses": ["Blue.", "Seven."]}]
    fake = FakeGenerator(rules=[("noisy neighbour", Reply("Because it is long", "length"))],
                         default="Because reasons.", failures=[("staying healthy", "HTTP 500")])
    stage = {"stage": "cai_label", "constitution": str(CONSTITUTION), "cot": True, "cot_samples": 2,
             "drop_ties": False}
    res = run_pipeline(_pipeline(tmp_path, stage, _write_rows(tmp_path, rows)), tmp_path / "out",
                       generators={"default": fake}, progress=False)
    rec = res.manifest["stages"][-1]
    assert {f["row_id"] for f in rec["failures"]} == {"b"}
    assert rec["counts"]["failed_requests"] == 2 and rec["counts"]["truncated_rationales"] == 4
    assert fake.num_generate_calls == 2 and fake.num_score_calls == 2  # one of each per chunk (chunk_size 2)
    assert len(fake.score_requests) == 2 * 2 * 2 * 2  # 2 rows x 2 orders x 2 rationales x 2 options
    assert all(r.prompt.endswith("\nSo the answer is:") and "Let's think step by step: Because" in r.prompt
               for r in fake.score_requests)
    ds = datasets.load_from_disk(str(res.dataset_dir))
    assert sorted(ds["row_id"]) == ["a", "e"]
    for row in ds:
        assert len(row["cot_rationales"]) == 4 and len(row["label_logprobs"]) == 4
        assert row["principle_ids"] == [p.id for p in Constitution.load(str(CONSTITUTION)).sample(
            _rng("cai_label", row["row_id"], "label"))]
        assert row["p_response_1"] == pytest.approx(_recompute(row, (0.4, 0.6))[0], abs=1e-12)
        [prov] = row["provenance"]
        assert json.loads(prov["sampling"])["n"] == 2 and prov["finish_reason"] == "scored"


def test_cai_label_takes_no_sampling(tmp_path):
    with pytest.raises(ValueError, match="cot_sampling"):
        _pipeline(tmp_path, {"stage": "cai_label", "sampling": {"temperature": 0.5}}, _write_rows(tmp_path))
