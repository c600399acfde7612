"""RSO (Liu et al. 2024): statistical rejection sampling and pairing (specs/methods-2.md section 4).

The sampler is checked against independent references: the exact sampler's
draws against softmax(r / beta) over the candidates, the paper's Algorithm 1
against its own law computed by enumerating every shuffle order, and the
spec's worked cases (beta -> 0 / inf, two candidates with acceptance 0.5).
The stage runs on the scripted fake model (tests/scripted_runs.py).
"""

from __future__ import annotations

import copy
import itertools
import math
import random
import re
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ has no __init__.py
import scripted_runs
from fakes import FakeGenerator
from scripted_runs import RSO_QUALITY, better_quality_wins, rows, run, stage_cfg

from synthfb.stages.rso import rso_pairs, rso_sample


def _first_pick_freqs(rewards, beta, mode, runs, seed=0):
    rng = random.Random(seed)
    c = Counter(rso_sample(rewards, 1, beta, rng, mode)[0] for _ in range(runs))
    return [c[i] / runs for i in range(len(rewards))]


def _tolerance(p: float, runs: int) -> float:
    return 4.5 * math.sqrt(p * (1 - p) / runs) + 1e-9  # 4.5 standard errors of a binomial share


# -- the sampler -------------------------------------------------------------------------------------------------

def test_exact_mode_draws_follow_softmax_over_the_sampled_set():
    rewards, beta, runs = [0.3, -1.2, 1.5, 0.9, 1.4, -0.4], 0.5, 60_000
    z = sum(math.exp(r / beta) for r in rewards)
    target = [math.exp(r / beta) / z for r in rewards]
    got = _first_pick_freqs(rewards, beta, "exact", runs)
    for i, (g, t) in enumerate(zip(got, target)):
        assert abs(g - t) < _tolerance(t, runs), (i, g, t)


def test_exact_mode_second_draw_is_softmax_over_the_rest():
    """num_samples 2: P(first = i, second = j) = s_i * s_j / (1 - s_i) (softmax without replacement)."""
    rewards, beta, runs = [0.0, 1.0, 2.0], 1.0, 60_000
    s = [math.exp(r / beta) / sum(math.exp(x / beta) for x in rewards) for r in rewards]
    rng = random.Random(1)
    c = Counter(tuple(rso_sample(rewards, 2, beta, rng, "exact")) for _ in range(runs))
    for i, j in itertools.permutations(range(3), 2):
        t = s[i] * s[j] / (1 - s[i])
        assert abs(c[(i, j)] / runs - t) < _tolerance(t, runs), ((i, j), c[(i, j)] / runs, t)


def _paper_law(rewards, beta):
    """P(first accepted = i) under Algorithm 1 with a uniformly shuffled order, by enumerating the orders:
    candidate i is taken when every candidate before it was refused and i is accepted."""
    top = max(rewards)
    a = [math.exp((r - top) / beta) for r in rewards]
    law = [0.0] * len(rewards)
    perms = list(itertools.permutations(range(len(rewards))))
    for perm in perms:
        refused = 1.0
        for i in perm:
            law[i] += refused * a[i] / len(perms)
            refused *= 1 - a[i]
    return law


def test_paper_mode_matches_algorithm_1_law_by_enumeration():
    rewards, beta, runs = [0.2, 1.0, -0.5, 0.7, 0.0], 0.5, 60_000
    law = _paper_law(rewards, beta)
    assert sum(law) == pytest.approx(1.0)
    got = _first_pick_freqs(rewards, beta, "paper", runs, seed=3)
    for i, (g, t) in enumerate(zip(got, law)):
        assert abs(g - t) < _tolerance(t, runs), (i, g, t)


def test_two_candidates_paper_picks_lower_a_over_2_exact_a_over_1_plus_a():
    """Spec 4.4: acceptance a = 0.5 for the lower candidate, 10^5 runs."""
    beta = 0.7
    rewards = [2.0, 2.0 + beta * math.log(0.5)]  # exp((r_low - r_max)/beta) = 0.5
    paper = _first_pick_freqs(rewards, beta, "paper", 100_000, seed=5)[1]
    exact = _first_pick_freqs(rewards, beta, "exact", 100_000, seed=6)[1]
    assert paper == pytest.approx(0.25, abs=0.01)
    assert exact == pytest.approx(1 / 3, abs=0.01)


def test_beta_limits():
    """beta -> 0: the top rewards in order (best-of-N); beta -> inf: the first of the shuffled order."""
    rewards = [0, 1, 2, 3, 4]
    for seed in range(20):
        assert rso_sample(rewards, 2, 1e-6, random.Random(seed), "paper") == [4, 3]
        order = list(range(5))
        random.Random(seed).shuffle(order)  # the sampler's first draws are the shuffle of pass 1
        assert rso_sample(rewards, 2, 1e6, random.Random(seed), "paper") == order[:2]


def test_sampler_keys_by_index_caps_and_skips_unscored():
    rng = random.Random(0)
    assert sorted(rso_sample([1.0, 1.0, 1.0], 8, 0.5, rng)) == [0, 1, 2]  # capped, equal rewards kept apart
    assert sorted(rso_sample([1.0, math.nan, 0.0], 8, 0.5, rng, "exact")) == [0, 2]
    assert rso_sample([math.nan, math.nan], 2, 0.5, rng) == []
    with pytest.raises(ValueError, match="beta"):
        rso_sample([1.0, 2.0], 1, 0.0, rng)
    with pytest.raises(ValueError, match="mode"):
        rso_sample([1.0, 2.0], 1, 1.0, rng, "textbook")


def test_larger_beta_accepts_lower_rewards_more_often():
    rewards = [float(x) for x in range(10)]
    means = []
    for beta in (0.2, 1.0, 5.0):
        rng = random.Random(0)
        picks = [i for _ in range(3000) for i in rso_sample(rewards, 4, beta, rng)]
        means.append(sum(rewards[i] for i in picks) / len(picks))
    assert means[0] > means[1] > means[2]


# -- pairing -------------------------------------------------------------------------------------------------------

def test_first_round_pairs_are_disjoint_and_labelled_by_reward():
    rewards = [0.5, 2.0, -1.0, 3.0, 1.0, 0.0, 2.5, 1.5]
    acc = [0, 1, 2, 3, 4, 5, 6, 7]
    for seed in range(10):
        pairs = rso_pairs(acc, rewards, random.Random(seed), "first_round")
        assert len(pairs) == 4
        assert sorted(i for p in pairs for i in p) == acc
        assert all(rewards[w] > rewards[lo] for w, lo in pairs)
    assert len(rso_pairs([0, 1, 2], rewards, random.Random(0))) == 1  # odd one out left


def test_tournament_plays_n_minus_1_games_and_the_best_never_loses():
    rewards = [0.5, 2.0, -1.0, 3.0, 1.0, 0.0, 2.5]
    for seed in range(10):
        pairs = rso_pairs(list(range(7)), rewards, random.Random(seed), "tournament")
        assert len(pairs) == 6
        assert all(lo != 3 for _, lo in pairs)
        assert sum(w == 3 for w, _ in pairs) >= 2  # the champion plays at least log2 rounds
        assert len({lo for _, lo in pairs}) == 6  # everyone but the champion loses exactly once
    with pytest.raises(ValueError, match="pairing"):
        rso_pairs([0, 1], rewards, random.Random(0), "swiss")


# -- the stage on the scripted fake -------------------------------------------------------------------------------

def test_stage_rewards_are_logit_of_the_pairwise_judge_against_the_baseline(tmp_path):
    d, fake = scripted_runs.rso_pairs()
    res = run(d, tmp_path / "run", fake)
    out = rows(tmp_path / "run")
    assert res.num_rows == len(out) > 0
    base_q = RSO_QUALITY[8]  # the 9th sample is the baseline y_b
    # better_quality_wins: lp(option) = -0.5 (6 - quality) -> log-odds of candidate vs baseline = 0.5 (q - q_b),
    # the same in both orders, so logit(rho) = 0.5 (q - q_b)
    want = [0.5 * (q - base_q) for q in RSO_QUALITY[:8]]
    for r in out:
        assert r["all_scores"] == pytest.approx(want)
        assert len(r["accepted"]) == 4 and len(set(r["accepted"])) == 4
        w, lo = r["pair_index"]
        assert {w, lo} <= set(r["accepted"])
        assert r["chosen"] == [{"role": "assistant", "content": f"Answer {w}: quality {RSO_QUALITY[w]}"}]
        assert r["rejected"][0]["content"] == f"Answer {lo}: quality {RSO_QUALITY[lo]}"
        assert r["score_margin"] == pytest.approx(r["score_chosen"] - r["score_rejected"]) and r["score_margin"] > 0
        assert r["prompt"][-1]["role"] == "user" and r["scorer"].startswith("pairwise_judge:")
    # 8 candidates + 1 baseline sampled in one request per prompt, all prompts of a chunk in one call
    assert {req.params.n for req in fake.requests} == {9}
    assert all(len(reqs) == 2 for _, reqs in fake.generate_calls)  # chunk_size 2
    # every candidate judged in both orders against the baseline, two options each: 8 * 2 * 2 per prompt
    assert sum(len(c) for c in fake.score_calls) == 4 * 32


def test_stage_randomness_is_seeded_per_row_not_per_chunk(tmp_path):
    d, fake = scripted_runs.rso_pairs()
    run(d, tmp_path / "a", fake)
    d2 = copy.deepcopy(d)
    d2["chunk_size"] = 3
    run(d2, tmp_path / "b", scripted_runs.rso_pairs()[1])
    strip = [{k: v for k, v in r.items() if k != "provenance"} for r in rows(tmp_path / "a")]
    assert strip == [{k: v for k, v in r.items() if k != "provenance"} for r in rows(tmp_path / "b")]
    d3 = copy.deepcopy(d)
    d3["seed"] = 1
    run(d3, tmp_path / "c", scripted_runs.rso_pairs()[1])
    assert [r["accepted"] for r in rows(tmp_path / "c")] != [r["accepted"] for r in rows(tmp_path / "a")]


def test_stage_with_given_candidates_and_judge_scorer_drops_ties(tmp_path):
    """candidates_column + the additive judge (text scoring on the fake); equal scores make tied pairs."""
    import json

    data = tmp_path / "cands.jsonl"
    cands = ["Answer 0: quality 4", "Answer 1: quality 4", "Answer 2: quality 1", "Answer 3: quality 4"]
    data.write_text(json.dumps({"id": "p1", "prompt": "Say hi.", "cands": cands}) + "\n"
                    + json.dumps({"id": "p2", "prompt": "Same text.", "cands": ["x", "x", "x"]}) + "\n")
    d = {"name": "rso_given", "model": "default", "seed": 0, "stages": [
        {"stage": "load", "path": str(data), "id_column": "id"},
        {"stage": "rso_pairs", "candidates_column": "cands", "scorer": "judge", "judge_samples": 1,
         "num_samples": 4, "beta": 100.0, "pairing": "tournament", "format": "standard"}]}
    def judge(req, k):
        return "Score: " + re.search(r"quality (\d)", req.messages[-1]["content"])[1]

    fake = FakeGenerator(rules=[("<response>x</response>", "Score: 2"), ("<response>", judge)])
    res = run(d, tmp_path / "run", fake)
    out = rows(tmp_path / "run")
    counts = res.manifest["stages"][1]["counts"]
    assert counts["dropped_fewer_than_two_distinct"] == 1  # p2: one distinct text
    # p1: 3 games in the tournament; the games between the three 4-point answers are ties and dropped
    assert len(out) + counts["dropped_tied_pairs"] == 3
    assert all(r["rejected"] == cands[2] and r["score_margin"] == 3.0 for r in out)
    assert fake.num_generate_calls == 1  # only the judge; the candidates were given


def test_config_errors_name_the_field(tmp_path):
    from synthfb.engine import Pipeline

    def build(**cfg):
        return Pipeline.from_dict({"name": "x", "stages": [{"stage": "load", "path": "data/feedback_prompts.jsonl"},
                                                           {"stage": "rso_pairs", **cfg}]}, scripted_runs.PIPELINES)

    for cfg, msg in [({"beta": 0}, "beta"), ({"num_samples": 1}, "num_samples"), ({"mode": "x"}, "mode"),
                     ({"scorer": "reward_model"}, "reward_model_path"), ({"sampling": {"n": 3}}, "sampling.n")]:
        with pytest.raises(ValueError, match=msg):
            build(**cfg)
    assert stage_cfg(scripted_runs.shipped("rso_pairs"), "rso_pairs")["n"] == 64  # the paper's 64 candidates


def test_fake_judge_prefers_higher_quality():
    """The scripted judge's sign convention the stage test relies on."""
    ctx = "Answer (A):\nAnswer 1: quality 5\n\nAnswer (B):\nAnswer 2: quality 1\n\n"
    assert better_quality_wins(ctx, " (A)") > better_quality_wins(ctx, " (B)")


@pytest.mark.timeout(900)
def test_shipped_pipeline_on_the_tiny_model(tmp_path, vllm_tiny):
    """The shipped file on real vLLM (tiny random model), made small: 8 candidates + 1 baseline, 4 accepted."""
    d = scripted_runs.shipped("rso_pairs")
    stage_cfg(d, "load")["limit"] = 2
    stage_cfg(d, "rso_pairs").update(n=8, num_samples=4,
                                     sampling={"temperature": 0.7, "top_p": 1.0, "max_tokens": 12})
    res = run(d, tmp_path / "run", vllm_tiny)
    out = rows(tmp_path / "run")
    counts = res.manifest["stages"][1]["counts"]
    assert counts["scored_against_baseline"] == 16 and counts["accepted"] == 8
    assert 1 <= len(out) <= 4  # 2 first-round pairs per prompt, ties dropped
    for r in out:
        assert all(math.isfinite(x) and abs(x) <= math.log(1 / 1e-6) for x in r["all_scores"])
        w, lo = r["pair_index"]
        assert r["score_margin"] == pytest.approx(r["all_scores"][w] - r["all_scores"][lo]) and r["score_margin"] > 0
