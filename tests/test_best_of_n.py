"""Best-of-N rejection-sampling data (Llama 2 RS, RAFT; specs/methods-2.md section 2).

Selection is checked as plain code (the spec's unit case, ties, top-k,
thresholds, the ranked-row contract), then the stage runs on the scripted
fake model (tests/scripted_runs.py) with both judge scoring paths, with
given candidates and scores (no model call), and (engine tier) with a tiny
reward model whose scores are recomputed independently.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ has no __init__.py
import scripted_runs
from fakes import FakeGenerator
from scripted_runs import BEST_OF_N_QUALITY, rows, run, stage_cfg

from synthfb.data.trl import sft_row, trl_pair
from synthfb.engine.stage import Drop
from synthfb.stages.best_of_n import best_of_n_rows, select_best


# -- selection -------------------------------------------------------------------------------------------------

def test_per_prompt_argmax_spec_case():
    """Spec 2.5: rewards [[0.1, 0.9, 0.5], [2, 1, 3]] -> selected indices [1, 2]."""
    assert [select_best(r)[0] for r in ([0.1, 0.9, 0.5], [2, 1, 3])] == [[1], [2]]


def test_select_best_ties_top_k_thresholds_and_unscored():
    nan = math.nan
    assert select_best([1.0, 3.0, 3.0, 2.0]) == ([1], None)  # equal scores: the first sampled
    assert select_best([1.0, 3.0, 3.0, 2.0], top_k=3) == ([1, 2, 3], None)
    assert select_best([1.0, nan, 2.0], top_k=5) == ([2, 0], None)
    assert select_best([nan, nan]) == ([], "too_few_scored")
    assert select_best([1.0, 4.0, 3.5], top_k=3, min_reward=3.5) == ([1, 2], None)
    assert select_best([1.0, 2.0], min_reward=2.5) == ([], "below_min_reward")
    assert select_best([1.0, 4.0, 3.9], min_gap=0.5) == ([], "small_gap")
    assert select_best([1.0, 4.0, 3.0], min_gap=0.5) == ([1], None)
    assert select_best([4.0], min_gap=0.5) == ([0], None)  # one scored candidate: no runner-up to compare


def test_sft_rows_carry_every_score():
    made = best_of_n_rows("Q?", ["a", "b", "c"], [0.5, 2.0, math.nan], top_k=2, system="Be brief.")
    assert [r["completion"] for r in made] == [sft_row("Q?", "b")["completion"], sft_row("Q?", "a")["completion"]]
    assert made[0]["prompt"] == sft_row("Q?", "b", "Be brief.")["prompt"]
    assert [(r["score"], r["selected_rank"]) for r in made] == [(2.0, 1), (0.5, 2)]
    assert made[0]["score_gap"] == 1.5 and made[0]["all_scores"] == [0.5, 2.0, None]
    assert made[0]["all_responses"] == ["a", "b", "c"]
    std = best_of_n_rows("Q?", ["a", "b"], [1, 0], fmt="standard")
    assert std[0]["prompt"] == "Q?" and std[0]["completion"] == "a" and std[0]["score_gap"] == 1
    assert best_of_n_rows("Q?", ["a"], [1.0])[0]["score_gap"] is None
    assert best_of_n_rows("Q?", ["a", "b"], [1.0, 2.0], min_reward=3) == Drop("below_min_reward")
    with pytest.raises(ValueError, match="2 candidates but 1 scores"):
        best_of_n_rows("Q?", ["a", "b"], [1.0])


def test_ranked_rows_contract():
    """prompt, completions (each in the form of a preference row's `chosen`), scores, ranks: 1 = best, ties share
    a rank; unscored candidates and repeated texts are left out."""
    cands = ["w", "x", "y", "z", "x", "v"]
    [r] = best_of_n_rows("Q?", cands, [3.0, 1.0, 3.0, 2.0, 1.0, math.nan], emit="ranked")
    assert set(r) == {"prompt", "completions", "scores", "ranks"}
    pair = trl_pair("Q?", "w", "x")
    assert r["prompt"] == pair["prompt"]
    assert r["completions"] == [trl_pair("Q?", c, "-")["chosen"] for c in ["w", "x", "y", "z"]]
    assert r["completions"][0] == pair["chosen"]
    assert r["scores"] == [3.0, 1.0, 3.0, 2.0]
    assert r["ranks"] == [1, 4, 1, 3]
    [s] = best_of_n_rows("Q?", ["a", "b"], [0.0, 1.0], emit="ranked", fmt="standard")
    assert s["completions"] == ["a", "b"] and s["ranks"] == [2, 1] and s["prompt"] == "Q?"
    assert best_of_n_rows("Q?", ["a", "a"], [1.0, 2.0], emit="ranked") == Drop("too_few_scored")


def test_ranked_rows_read_by_the_rm_trainer_best_first(tiny_model):
    from synthfb.train.collate import Tokenizer
    from synthfb.train.loop import load_tokenizer

    t = Tokenizer(load_tokenizer(str(tiny_model)))
    [r] = best_of_n_rows("Q?", ["low", "high", "mid"], [0.0, 2.0, 1.0], emit="ranked")
    ex = t.ranked_example(r)
    want = [t.completion_ids(r["prompt"], [{"role": "assistant", "content": c}]) for c in ["high", "mid", "low"]]
    assert ex["completion_ids"] == want


# -- the stage on the scripted fake ------------------------------------------------------------------------------

def _check_scripted(out_rows, counts):
    best = max(range(len(BEST_OF_N_QUALITY)), key=lambda k: (BEST_OF_N_QUALITY[k], -k))
    assert out_rows and all(r["completion"][0]["content"] == f"Answer {best}: quality {BEST_OF_N_QUALITY[best]}"
                            for r in out_rows)
    for r in out_rows:
        assert r["all_scores"] == pytest.approx([float(q) for q in BEST_OF_N_QUALITY])
        assert r["score"] == max(BEST_OF_N_QUALITY) and r["selected_rank"] == 1
        assert r["score_gap"] == pytest.approx(1.0)  # 5 vs 4
        assert r["prompt"] == [{"role": "user", "content": r["prompt"][-1]["content"]}]
        assert r["row_id"] == r["id"]
    assert counts["dropped_too_few_scored"] == 1  # the password prompt: no judgement gave a score
    assert "strong password" not in json.dumps([r["prompt"] for r in out_rows])


def test_stage_keeps_the_judges_best_text_scoring(tmp_path):
    d, fake = scripted_runs.best_of_n()
    res = run(d, tmp_path / "run", fake)
    counts = res.manifest["stages"][1]["counts"]
    _check_scripted(rows(tmp_path / "run"), counts)
    assert counts["outputs"] == 5 * 8 * 3 and counts["parsed"] == 4 * 8 * 3  # 3 judgements per candidate
    # one sampling call per chunk (n = 8 in one request per prompt), then one judging call per chunk
    assert [len(reqs) for _, reqs in fake.generate_calls] == [2, 2 * 8, 2, 2 * 8, 1, 8]
    assert {req.params.n for req in fake.generate_calls[0][1]} == {8}


def test_stage_logprob_scoring_reads_the_same_scores(tmp_path):
    d, fake = scripted_runs.best_of_n()
    stage_cfg(d, "best_of_n")["scoring"] = "logprobs"
    res = run(d, tmp_path / "run", fake)
    counts = res.manifest["stages"][1]["counts"]
    out = rows(tmp_path / "run")
    assert counts["scored_from_logprobs"] == 5 * 8
    # label_logprobs gives the target label nearly all the mass: the expected score is close to the quality
    for r in out:
        assert r["all_scores"] == pytest.approx([float(q) for q in BEST_OF_N_QUALITY], abs=0.01)
    assert len(out) == 5  # under log-prob scoring every candidate gets a score, the password prompt too


def test_stage_top_k_threshold_and_ranked_output(tmp_path):
    d, fake = scripted_runs.best_of_n()
    stage_cfg(d, "best_of_n").update(top_k=3, min_reward=4)
    run(d, tmp_path / "a", fake)
    out = rows(tmp_path / "a")
    assert [r["score"] for r in out[:2]] == [5.0, 4.0]  # quality 3 < min_reward 4
    assert [r["row_id"] for r in out[:2]] == [f"{out[0]['id']}/0", f"{out[0]['id']}/1"]

    d, fake = scripted_runs.best_of_n()
    stage_cfg(d, "best_of_n")["emit"] = "ranked"
    run(d, tmp_path / "b", fake)
    ranked = rows(tmp_path / "b")
    assert ranked and {"completions", "scores", "ranks"} <= set(ranked[0]) and "completion" not in ranked[0]
    qs = BEST_OF_N_QUALITY  # distinct texts, so all 8 stay
    assert ranked[0]["ranks"] == [1 + sum(x > q for x in qs) for q in qs]


def test_given_candidates_and_scores_need_no_model(tmp_path):
    """The rft loop's path: candidates and scores from elsewhere, selection only."""
    data = tmp_path / "scored.jsonl"
    data.write_text(json.dumps({"id": "a", "prompt": "P1", "cands": ["x", "y", "z"], "r": [0.1, 0.9, 0.5]}) + "\n"
                    + json.dumps({"id": "b", "prompt": "P2", "cands": ["u", "v", "w"], "r": [2, 1, 3]}) + "\n"
                    + json.dumps({"id": "c", "prompt": "P3", "cands": ["s", "t"], "r": [None, None]}) + "\n")
    d = {"name": "bon_given", "model": "default", "stages": [
        {"stage": "load", "path": str(data), "id_column": "id"},
        {"stage": "best_of_n", "candidates_column": "cands", "scores_column": "r", "format": "standard"}]}
    fake = FakeGenerator()
    res = run(d, tmp_path / "run", fake)
    out = rows(tmp_path / "run")
    assert [r["completion"] for r in out] == ["y", "w"]
    assert res.manifest["stages"][1]["counts"]["dropped_too_few_scored"] == 1
    assert fake.num_generate_calls == 0 and fake.num_score_calls == 0
    assert out[0]["scorer"] == "column:r"


def test_config_errors(tmp_path):
    from synthfb.engine import Pipeline

    def build(**cfg):
        return Pipeline.from_dict({"name": "x", "stages": [{"stage": "load", "path": "data/feedback_prompts.jsonl"},
                                                           {"stage": "best_of_n", **cfg}]}, scripted_runs.PIPELINES)

    for cfg, msg in [({"scorer": "reward_model"}, "reward_model_path"), ({"top_k": 0}, "top_k"),
                     ({"scores_column": "r"}, "candidates_column"), ({"emit": "pairs"}, "emit"),
                     ({"scorer": "pairwise_judge"}, "scorer"), ({"sampling": {"n": 2}}, "sampling.n")]:
        with pytest.raises(ValueError, match=msg):
            build(**cfg)


# -- a reward model (engine tier: builds and runs a tiny reward model) -------------------------------------------

@pytest.mark.engine
def test_reward_model_scorer_keeps_the_rm_argmax(tmp_path, tiny_model):
    from feedback_models import make_tiny_reward_model

    from synthfb.rank.reward_model import RewardModelRanker

    rm = make_tiny_reward_model(tmp_path / "rm", tiny_model)
    d, _ = scripted_runs.best_of_n()
    stage_cfg(d, "best_of_n").update(scorer="reward_model", reward_model_path=str(rm), n=4)
    d = copy.deepcopy(d)
    fake = FakeGenerator(lambda req, k: f"Reply number {k} " + "word " * k)
    run(d, tmp_path / "run", fake)
    out = rows(tmp_path / "run")
    assert len(out) == 5
    ref = RewardModelRanker(str(rm))
    for r in out:
        [want] = ref.score([r["prompt"][-1]["content"]], [r["all_responses"]])
        assert r["all_scores"] == pytest.approx(list(want), abs=1e-4)
        assert r["completion"][0]["content"] == r["all_responses"][int(want.argmax())]
        assert r["scorer"] == "reward_model:rm"


@pytest.mark.timeout(900)
def test_shipped_pipeline_on_the_tiny_model(tmp_path, vllm_tiny):
    """The shipped file on real vLLM (tiny random model): the judge reads every score from label log-probs,
    so each prompt keeps its argmax."""
    d = scripted_runs.shipped("best_of_n")
    stage_cfg(d, "load")["limit"] = 3
    stage_cfg(d, "best_of_n").update(n=4, sampling={"temperature": 1.0, "top_p": 1.0, "max_tokens": 12})
    res = run(d, tmp_path / "run", vllm_tiny)
    out = rows(tmp_path / "run")
    counts = res.manifest["stages"][1]["counts"]
    assert len(out) == 3 and counts["scored_from_logprobs"] == 12
    for r in out:
        s = r["all_scores"]
        assert len(s) == 4 and all(0 <= x <= 5 for x in s)
        assert r["completion"][0]["content"] == r["all_responses"][max(range(4), key=lambda i: (s[i], -i))]
        assert [p["stage"] for p in r["provenance"]] == ["best_of_n"]


@pytest.mark.engine
def test_ranked_rows_train_the_ranked_reward_model(tmp_path, tiny_model):
    """`emit: ranked` rows train `synthfb train rm` with `ranked: true` (Plackett-Luce over the K-way list) as
    they are, one step on the tiny model."""
    from test_every_pipeline_trains import train_synthfb

    d, fake = scripted_runs.best_of_n()
    stage_cfg(d, "best_of_n")["emit"] = "ranked"
    run(d, tmp_path / "run", fake)
    summary = train_synthfb("rm", tmp_path / "run" / "dataset", tiny_model, tmp_path / "rm", "ranked=true",
                            "center_rewards_coef=0")  # rm_tiny.yaml centres pair rewards; ranked lists refuse it
    assert summary["steps"] == 1
