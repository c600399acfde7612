"""On-policy pairs: sampling in one call, identical-response and tie drops,
full-matrix aggregation recomputed by hand, keying by row id (shuffled input
and different chunking give the same pairs), every ranker behind the stage."""

from __future__ import annotations

import json
import random
from pathlib import Path

import datasets
import numpy as np
import pytest
from feedback_models import make_tiny_pairrm, make_tiny_reward_model
from test_trl_format import assert_trl_preference

from synthfb.engine import Pipeline, run_pipeline

REPO = Path(__file__).resolve().parent.parent


def _hand_scores(m, method):
    n = len(m)
    if method == "max_logits":
        return [sum(m[i][j] - m[j][i] for j in range(n)) / n for i in range(n)]
    return [sum(m[i][j] > 0 for j in range(n) if j != i) + sum(m[j][i] < 0 for j in range(n) if j != i) / n
            for i in range(n)]


def _check_rows(ds, method="max_logits"):
    for row in ds:
        m, cands, s = row["comparison_matrix"], row["all_responses"], row["all_scores"]
        assert all(m[i][i] == 0 for i in range(len(m)))
        assert s == pytest.approx(_hand_scores(m, method), abs=1e-9)
        best, worst = int(np.argmax(s)), int(np.argmin(s))
        assert row["chosen"][-1]["content"] == cands[best]
        assert row["rejected"][-1]["content"] == cands[worst]
        assert row["score_margin"] == pytest.approx(s[best] - s[worst]) and row["score_margin"] > 0
        assert row["all_ranks"][best] == 1 and row["all_ranks"][worst] == max(row["all_ranks"])


@pytest.mark.timeout(600)
def test_shipped_pipeline_on_tiny(tmp_path, vllm_tiny):
    pipe = Pipeline.from_yaml(REPO / "pipelines" / "onpolicy_pairs.yaml")
    st = pipe.stages[-1]
    assert (st.params.n, st.params.temperature, st.params.top_p) == (5, 0.8, 0.95)
    st.params = type(st.params).from_dict({**st.params.to_dict(), "max_tokens": 12})
    pipe.stages[0].config.limit = 4
    res = run_pipeline(pipe, tmp_path / "out", generators={pipe.model: vllm_tiny}, progress=False)
    ds = datasets.load_from_disk(str(res.dataset_dir))
    counts = res.manifest["stages"][-1]["counts"]
    assert len(ds) + counts.get("all_responses_identical", 0) + counts.get("tie", 0) == 4
    assert len(ds) >= 1
    assert_trl_preference(ds, "conversational")
    _check_rows(ds)
    for row in ds:
        assert len(row["all_responses"]) == 5 and row["ranker"].startswith("llm_judge")
        assert [p["stage"] for p in row["provenance"]] == ["onpolicy_pairs", "onpolicy_pairs"]
        assert json.loads(row["provenance"][0]["sampling"])["n"] == 5
        assert row["position_bias"] is not None


@pytest.mark.timeout(600)
def test_greedy_identical_responses_dropped(tmp_path, vllm_tiny):
    # vLLM refuses n > 1 at temperature 0; a tiny nucleus keeps only the top token (greedy)
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"Question number {i}?"}) + "\n" for i in range(3)))
    pipe = Pipeline.from_dict({"name": "greedy", "stages": [
        {"stage": "load", "path": str(data), "id_column": "id"},
        {"stage": "onpolicy_pairs", "n": 3, "sampling": {"top_p": 1e-6, "max_tokens": 8}}]}, tmp_path)
    res = run_pipeline(pipe, tmp_path / "out", generators={"default": vllm_tiny}, progress=False)
    assert res.num_rows == 0
    assert res.manifest["stages"][-1]["counts"]["all_responses_identical"] == 3


def _candidates_file(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROWS = [{"id": f"p{i}", "prompt": f"Prompt {i}: say something about the sky.",
         "cands": [f"answer {j} for prompt {i}" + " blue" * ((i + j) % 4) for j in range(4)]} for i in range(7)]
ROWS.append({"id": "same", "prompt": "Repeat.", "cands": ["x", "x", "x"]})


@pytest.fixture(scope="module")
def tiny_rm(tiny_model, tmp_path_factory):
    return make_tiny_reward_model(tmp_path_factory.mktemp("rm") / "rm", tiny_model)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("method", ["max_logits", "max_wins"])
def test_rows_keyed_by_id_not_order(tmp_path, tiny_rm, method):
    def run(rows, chunk, name):
        data = _candidates_file(tmp_path / f"{name}.jsonl", rows)
        pipe = Pipeline.from_dict({"name": name, "chunk_size": chunk, "stages": [
            {"stage": "load", "path": str(data), "id_column": "id"},
            {"stage": "onpolicy_pairs", "candidates_column": "cands", "ranker": "reward_model",
             "ranker_path": str(tiny_rm), "aggregate": method, "format": "standard"}]}, tmp_path)
        res = run_pipeline(pipe, tmp_path / name, progress=False)
        ds = datasets.load_from_disk(str(res.dataset_dir))
        return ds, res.manifest["stages"][-1]["counts"]

    a, counts = run(ROWS, 3, "ordered")
    shuffled = ROWS[:]
    random.Random(1).shuffle(shuffled)
    b, _ = run(shuffled, 2, "shuffled")
    assert counts["all_responses_identical"] == 1
    pa = {r["row_id"]: (r["prompt"], r["chosen"], r["rejected"]) for r in a}
    pb = {r["row_id"]: (r["prompt"], r["chosen"], r["rejected"]) for r in b}
    assert pa == pb and len(pa) == 7
    by_id = {r["id"]: r for r in ROWS}
    for rid, (prompt, chosen, rejected) in pa.items():
        assert prompt == by_id[rid]["prompt"]
        assert chosen in by_id[rid]["cands"] and rejected in by_id[rid]["cands"]
    assert_trl_preference(a, "standard")
    for row in a:
        assert row["all_scores"] == pytest.approx(_hand_scores(row["comparison_matrix"], method), abs=1e-9)
        assert row["position_bias"] == pytest.approx(0.0, abs=1e-9)  # a scalar RM has no position


@pytest.mark.timeout(600)
def test_pairrm_ranker_in_stage(tmp_path, tmp_path_factory):
    ck = make_tiny_pairrm(tmp_path_factory.mktemp("pairrm") / "pairrm")
    data = _candidates_file(tmp_path / "c.jsonl", ROWS[:3])
    pipe = Pipeline.from_dict({"name": "pairrm", "stages": [
        {"stage": "load", "path": str(data), "id_column": "id"},
        {"stage": "onpolicy_pairs", "candidates_column": "cands", "ranker": "pairrm", "ranker_path": str(ck)}]},
        tmp_path)
    res = run_pipeline(pipe, tmp_path / "out", progress=False)
    ds = datasets.load_from_disk(str(res.dataset_dir))
    assert len(ds) == 3
    _check_rows(ds)
    assert all(r["ranker"] == "pairrm:pairrm" for r in ds)


def test_ranker_needs_checkpoint(tmp_path):
    data = _candidates_file(tmp_path / "c.jsonl", ROWS[:1])
    with pytest.raises(ValueError, match="ranker_path"):
        Pipeline.from_dict({"name": "x", "stages": [
            {"stage": "load", "path": str(data)}, {"stage": "onpolicy_pairs", "ranker": "pairrm"}]}, tmp_path)


def test_fingerprint_hashes_the_ranker_template_and_checkpoint_content(tmp_path):
    data = _candidates_file(tmp_path / "c.jsonl", ROWS[:1])
    tpl = tmp_path / "judge.jinja"
    tpl.write_text((REPO / "prompts" / "pairwise_judge.jinja").read_text())

    def fingerprint(**stage):
        return Pipeline.from_dict({"name": "x", "stages": [
            {"stage": "load", "path": str(data)}, {"stage": "onpolicy_pairs", **stage}]}, tmp_path).stages[-1].fingerprint()

    a = fingerprint(ranker_prompt="judge.jinja")
    tpl.write_text(tpl.read_text() + "\n")
    assert fingerprint(ranker_prompt="judge.jinja")["template_sha256"] != a["template_sha256"]
    # a checkpoint counts by its files, not by the folder it lies in
    for d in ("one/rm", "two/rm"):
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / "config.json").write_text("{}")
    one = fingerprint(ranker="reward_model", ranker_path="one/rm")
    assert one == fingerprint(ranker="reward_model", ranker_path="two/rm")
    assert one["ranker_revision"].startswith("sha256:") and "template_sha256" not in one
    (tmp_path / "two/rm/config.json").write_text('{"changed": 1}')
    assert fingerprint(ranker="reward_model", ranker_path="two/rm")["ranker_revision"] != one["ranker_revision"]
