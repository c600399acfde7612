"""The loop methods of issue #14: ``spin`` (Chen et al. 2024), ``self_rewarding``
(Yuan et al. 2024) and ``rft`` (RAFT, Dong et al. 2023 / Llama 2 rejection
sampling).

Fast tier: the pairing and selection logic against hand-computed
expectations (SPIN pairs, self-rewarding best/worst above a gap, best-of-N
winners incl. the spec's example), and the loop-file rules each method
declares in the registry (gold responses carried, judge = policy, the last
pairs stage, sections used only by their method).

Engine tier: each shipped ``*_tiny.yaml`` runs end to end on the tiny model
with the transformers backend (no engine start-up): SPIN's round 1 trains on
its own and round 0's pairs with the previous iterate as reference (step-0
loss ln 2), self-rewarding's round 1 is judged by round 0's checkpoint, and
RFT trains SFT on each prompt's highest scored sample.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import datasets
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ has no __init__.py
import scripted_runs as sr  # noqa: E402

from synthfb.llm.models import model_revision  # noqa: E402
from synthfb.loop import LoopError, load_loop, run_loop
from synthfb.loop.round_data import BestOfNConfig, SpinPairsConfig, best_indices, best_of_n, spin_pairs
from synthfb.rank.aggregate import pick_pair
from synthfb.train import methods

REPO = Path(__file__).resolve().parent.parent
PIPELINES = REPO / "pipelines"
LN2 = math.log(2)


# -- SPIN pairs -----------------------------------------------------------------------------------------------------

def test_spin_pairs_gold_is_chosen_own_sample_rejected():
    rows = [
        {"row_id": "p0", "id": "a", "prompt": "Name a colour.", "completion": "Blue.", "response": "Seven"},
        {"row_id": "p1", "id": "b", "prompt": "Say hi.", "completion": "Hi!", "response": " Hi! "},  # = gold
        {"row_id": "p2", "id": "c", "prompt": [{"role": "system", "content": "Be brief."},
                                               {"role": "user", "content": "2+2?"}],
         "completion": "4", "response": "5"},
    ]
    out, counts = spin_pairs(rows, SpinPairsConfig(), k=3)
    assert counts == {"dropped_identical_to_gold": 1}
    assert [r["row_id"] for r in out] == ["p0", "p2"]
    assert out[0]["prompt"] == [{"role": "user", "content": "Name a colour."}]
    assert out[0]["chosen"] == [{"role": "assistant", "content": "Blue."}]
    assert out[0]["rejected"] == [{"role": "assistant", "content": "Seven"}]
    assert out[1]["prompt"][0] == {"role": "system", "content": "Be brief."}
    assert (out[1]["chosen"][0]["content"], out[1]["rejected"][0]["content"]) == ("4", "5")
    assert all(r["iteration"] == 3 and r["id"] for r in out)
    std, _ = spin_pairs(rows[:1], SpinPairsConfig(format="standard"), k=0)
    assert (std[0]["prompt"], std[0]["chosen"], std[0]["rejected"]) == ("Name a colour.", "Blue.", "Seven")


# -- self-rewarding: best vs worst above a score gap (judge_pairs' rule) --------------------------------------------

@pytest.mark.parametrize("scores,gap,expected", [
    ([2.0, 3.0, 5.0, 1.0], 0.0, (2, 3)),      # best 5 (index 2) vs worst 1 (index 3)
    ([2.0, 3.0, 5.0, 1.0], 3.9, (2, 3)),      # gap 4 > 3.9
    ([2.0, 3.0, 5.0, 1.0], 4.0, "tie"),       # gap 4 is not > 4
    ([4.0, 4.0, 4.0], 0.0, "tie"),            # the paper's collapse to one score: no pair
    ([float("nan"), 3.0, 1.5], 1.0, (1, 2)),  # an unscored candidate is ignored
])
def test_self_rewarding_pairs_best_and_worst_above_the_gap(scores, gap, expected):
    pick = pick_pair(scores, [f"c{i}" for i in range(len(scores))], gap)
    if isinstance(expected, str):
        assert pick.reason == expected
    else:
        assert (pick.best, pick.worst) == expected and pick.margin == pytest.approx(scores[expected[0]]
                                                                                     - scores[expected[1]])


# -- best-of-N (RAFT) -------------------------------------------------------------------------------------------------

def _bon_rows(scores: list[list[float | None]]) -> list[dict]:
    return [{"row_id": f"r{i}", "id": f"p{i}", "prompt": f"prompt {i}",
             "responses": [f"p{i} answer {j}" for j in range(len(s))], "all_scores": s}
            for i, s in enumerate(scores)]


def test_best_of_n_picks_each_prompts_argmax():
    """specs/methods-2.md 2.5: rewards [[0.1, 0.9, 0.5], [2, 1, 3]] -> indices [1, 2]."""
    scores = [[0.1, 0.9, 0.5], [2.0, 1.0, 3.0]]
    assert [best_indices(s)[0] for s in scores] == [1, 2]
    out, counts = best_of_n(_bon_rows(scores), BestOfNConfig(), k=0)
    assert counts == {}
    assert [r["completion"][0]["content"] for r in out] == ["p0 answer 1", "p1 answer 2"]
    assert [r["prompt"] for r in out] == [[{"role": "user", "content": "prompt 0"}],
                                          [{"role": "user", "content": "prompt 1"}]]
    assert [r["score"] for r in out] == [0.9, 3.0]
    assert [r["winner_gap"] for r in out] == pytest.approx([0.9 - 0.5, 3.0 - 2.0])
    assert [r["all_scores"] for r in out] == scores and all(r["rank"] == 0 for r in out)


def test_best_of_n_top_k_threshold_gap_and_unscored():
    rows = _bon_rows([[0.1, 0.9, 0.5], [2.0, 1.0, 3.0], [None, None], [1.0, 1.0, 0.0]])
    out, counts = best_of_n(rows, BestOfNConfig(top_k=2), k=1)
    assert [(r["id"], r["completion"][0]["content"], r["rank"]) for r in out] == [
        ("p0", "p0 answer 1", 0), ("p0", "p0 answer 2", 1), ("p1", "p1 answer 2", 0), ("p1", "p1 answer 0", 1),
        ("p3", "p3 answer 0", 0), ("p3", "p3 answer 1", 1)]  # a tie goes to the earlier candidate
    assert counts == {"dropped_no_scored_candidate": 1}
    assert len({r["row_id"] for r in out}) == len(out)
    out, counts = best_of_n(rows, BestOfNConfig(min_score=1.0, min_gap=0.3), k=1)
    assert [r["id"] for r in out] == ["p1"]  # p0's best 0.9 < 1.0; p3's gap 0 < 0.3 (p0's 0.4 passes)
    assert counts == {"dropped_no_scored_candidate": 1, "dropped_gap_below_min": 1, "dropped_below_min_score": 1}


def test_best_of_n_global_top_fraction():
    """LMFlow's variant: the top ceil(frac * all candidates) of the round, across prompts."""
    rows = _bon_rows([[0.1, 0.9, 0.5], [2.0, 1.0, 3.0]])
    out, _ = best_of_n(rows, BestOfNConfig(selection="global_top_frac", top_frac=0.5), k=0)
    # 6 candidates -> 3 kept: 3.0, 2.0, 1.0 (all of prompt 1)
    assert [(r["id"], r["score"]) for r in out] == [("p1", 3.0), ("p1", 2.0), ("p1", 1.0)]


# -- what each method declares, and the loop-file rules that follow ----------------------------------------------

def test_methods_declare_their_rounds():
    spin, sr, rft = (methods.get(n) for n in ("spin", "self_rewarding", "rft"))
    assert [s.name for s in spin.step_methods()] == ["dpo"] and spin.round_data == "spin_pairs" and spin.history == 1
    assert [s.name for s in sr.step_methods()] == ["dpo"] and sr.self_judge and sr.round_stages == ("judge_pairs",)
    assert [s.name for s in rft.step_methods()] == ["sft"] and rft.round_data == "best_of_n"


@pytest.mark.parametrize("name", ["spin_tiny", "self_rewarding_tiny", "self_rewarding_gen_tiny", "rft_tiny"])
def test_tiny_loop_files_validate(name, capsys):
    from synthfb.cli import main

    assert main(["validate", str(PIPELINES / f"{name}.yaml")]) == 0
    assert "ok (2 rounds, method " in capsys.readouterr().out


_load = sr.shipped_loop


def test_self_rewarding_judges_with_the_policy_and_evaluates_with_a_frozen_judge():
    cfg = _load("self_rewarding_tiny")
    assert cfg.self_judging and cfg.judge_for("runs/x/round-00/checkpoint") == "runs/x/round-00/checkpoint"
    assert cfg.eval_judge() == cfg.policy  # the initial model as written, never a trained checkpoint
    with pytest.raises(LoopError, match="judge: method 'self_rewarding' judges each round with the round's policy"):
        _load("self_rewarding_tiny", judge="other-model")
    stages = yaml.safe_load((PIPELINES / "self_rewarding_tiny.yaml").read_text())["pairs"]["stages"][:1]
    stages[0].update(n=2, explode=False)
    with pytest.raises(LoopError, match="method 'self_rewarding' builds its pairs with judge_pairs"):
        _load("self_rewarding_tiny", pairs={"stages": stages + [{"stage": "onpolicy_pairs", "candidates_column":
                                                                   "responses", "n": 2}]})


def test_spin_needs_the_gold_column_carried():
    cfg = _load("spin_tiny")
    assert cfg.prompt_extras[0] == {"completion": json.loads(
        (PIPELINES / "data" / "spin_sft.jsonl").read_text().splitlines()[0])["completion"]}
    with pytest.raises(LoopError, match=r"the round-data step 'spin_pairs' reads \['completion'\]"):
        _load("spin_tiny", carry_columns=None)
    with pytest.raises(LoopError, match=r"carry_columns: the prompts file has no column\(s\) \['gold'\]"):
        _load("spin_tiny", carry_columns=["gold"], spin_pairs={"gold_column": "gold"})
    with pytest.raises(LoopError, match="spin_pairs: not used by method 'dpo'"):
        _load("spin_tiny", method="dpo")


def test_rft_sections():
    cfg = _load("rft_tiny")
    assert cfg.sections["best_of_n"]["top_k"] == 1 and cfg.sections["sft_round"]["max_steps"] == 2
    with pytest.raises(LoopError, match="best_of_n.selection"):
        _load("rft_tiny", best_of_n={"selection": "everything"})
    with pytest.raises(LoopError, match="train: not used by method 'rft'"):
        _load("rft_tiny", train={"max_steps": 1})
    with pytest.raises(LoopError, match=r"reads \['all_responses'\]"):
        _load("rft_tiny", best_of_n={"responses_column": "all_responses"})


def test_self_rewarding_prompts_regenerated_by_the_policy(tmp_path):
    """The optional per-round prompts: a pairs pipeline that starts with
    `self_instruct_bootstrap` on the loop's prompts (the seeds) has the
    round's policy write new prompts few-shot, which the same policy answers
    and judges. Round 0's pairs pipeline runs here on a scripted policy."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from fakes import FakeGenerator, last_user
    from scripted_runs import SelfInstructScript

    from synthfb.engine import Runner
    from synthfb.loop.pairs import pairs_pipeline, write_prompts

    data = yaml.safe_load((PIPELINES / "self_rewarding_smol.yaml").read_text())
    gen, judge = data["pairs"]["stages"]
    boot = {"stage": "self_instruct_bootstrap", "instruction_column": "prompt", "num_instructions": 4,
            "num_demos": 4, "max_machine_demos": 0, "prompts_per_step": 2}
    data["pairs"]["stages"] = [boot, {**gen, "input_column": "instruction"}, {**judge, "prompt_column": "instruction"}]
    cfg = load_loop("sr.yaml", data=data, base_dir=PIPELINES)
    script = SelfInstructScript()
    answers = ["off-topic", "a short answer", "a good answer", "the best answer"]  # judged 0, 1, 2, 3
    policy = FakeGenerator(rules=[
        ("Write a list of new and varied tasks:", script.bootstrap),
        ("<response>", lambda req, k: f"Score: {answers.index(last_user(req).split('<response>')[1].split('<')[0])}"),
    ], default=lambda req, k: answers[k], name="policy-0")
    prompts = write_prompts(tmp_path / "prompts.jsonl", cfg.prompts)
    res = Runner(pairs_pipeline(cfg, 0, "policy-0", prompts), tmp_path / "pairs", generators={"policy-0": policy},
                 progress=False).run()
    rows = datasets.load_from_disk(str(res.dataset_dir)).to_list()
    seeds = set(cfg.prompts)
    assert len(rows) == 4 and all(r["prompt"][-1]["content"] not in seeds for r in rows)  # new prompts only
    assert all(r["prompt"][-1]["content"].startswith("Describe ") for r in rows)  # the scripted new tasks
    assert {(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows} == {(answers[3], answers[0])}
    assert all({p["model"] for p in r["provenance"]} == {"policy-0"} for r in rows)


def _writer():
    """A scripted fixed prompt writer (named `default`, as in the loop file): two novel tasks per
    few-shot prompt, a function of the prompt's text, so the same demos write the same tasks."""
    import hashlib
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from fakes import FakeGenerator, Reply, request_text
    from scripted_runs import novel_instruction

    def write(req, k):
        h = int(hashlib.sha256(request_text(req).encode()).hexdigest()[:12], 16)
        return f" {novel_instruction(h)}\n6. {novel_instruction(h + 1)}\n"

    return FakeGenerator(rules=[("Write a list of new and varied tasks:", write)],
                         default=Reply("unexpected prompt", "stop"), name="default")


def test_self_rewarding_prompts_written_by_a_fixed_model_each_round(tmp_path):
    """`self_rewarding_gen_tiny.yaml` (the paper's per-iteration prompts): the pairs pipelines of
    rounds 0 and 1 start with the fixed writer (`model: default`) writing prompts few-shot from the
    seeds; the round's policy answers and judges them. The demos are drawn with seed + round, so
    the rounds' prompts differ; each round's are in round-NN/prompts.jsonl. The loop's own pieces
    run here (round_models, run_pairs, record_prompts) on scripted models; training is the engine
    test's."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from fakes import FakeGenerator, last_user

    from synthfb.loop.pairs import record_prompts, run_pairs, write_prompts

    cfg = _load("self_rewarding_gen_tiny")
    assert cfg.self_judging and cfg.fixed_stage_models() == ["default"]
    assert cfg.round_models("policy-1") == ["policy-1", "default"]  # the policy judges; the writer is kept
    assert cfg.stages_for("policy-1")[0]["model"] == "default" and "model" not in cfg.stages_for("policy-1")[2]
    writer = _writer()
    answers = ["off-topic", "a short answer", "the best answer"]  # judged 0, 1, 2

    def score(req, k):
        return f"Score: {answers.index(last_user(req).split('<response>')[1].split('<')[0])}"

    policies = {f"policy-{k}": FakeGenerator(rules=[("<response>", score)], default=lambda req, k: answers[k],
                                             name=f"policy-{k}") for k in (0, 1)}
    engines = {"default": writer, **policies}
    prompts_file = write_prompts(tmp_path / "prompts.jsonl", cfg.prompts)
    seed_ids = {f"p{i:05d}" for i in range(len(cfg.prompts))}
    written: dict[int, list[str]] = {}
    for k in (0, 1):
        policy, rdir = f"policy-{k}", tmp_path / f"round-{k:02d}"
        writer.forget()
        res = run_pairs(cfg, k, policy, prompts_file, rdir / "pairs",
                        {n: engines[n] for n in cfg.round_models(policy)}, progress=False)
        rec = record_prompts(cfg, k, res, rdir)
        stages = res.manifest["stages"]
        assert [s["kind"] for s in stages] == ["load", "self_instruct_bootstrap", "generate", "judge_pairs"]
        assert [s["model"]["name"] for s in stages[1:]] == ["default", policy, policy]
        assert res.manifest["seed"] == cfg.seed + k
        # the writer saw only few-shot prompts of seed prompts; the policy never saw one
        assert writer.requests and all("Write a list of new and varied tasks:" in last_user(r) for r in writer.requests)
        assert not any("new and varied tasks" in last_user(r) for r in policies[policy].requests)
        lines = [json.loads(x) for x in (rdir / "prompts.jsonl").read_text().splitlines()]
        written[k] = [x["prompt"] for x in lines]
        assert len(written[k]) == rec["written"] == 3 and not set(written[k]) & set(cfg.prompts)
        assert all(set(x["demo_ids"]) <= seed_ids and len(x["demo_ids"]) == 4 for x in lines)
        assert rec["model"] == "default" and rec["fixed_model"] and rec["seed_prompts"] == 8
        assert rec["in_heldout"] == 0 and rec["in_earlier_rounds"] == 0
        rows = datasets.load_from_disk(str(res.dataset_dir)).to_list()
        assert {r["prompt"][-1]["content"] for r in rows} == set(written[k])  # the round trains on its new prompts
        for r in rows:
            assert [p["model"] for p in r["provenance"]] == ["default", policy, policy]  # written; sampled, judged
            assert (r["chosen"][0]["content"], r["rejected"][0]["content"]) == (answers[2], answers[0])
    assert not set(written[0]) & set(written[1])  # fresh prompts each round


def test_only_a_prompt_writer_may_name_a_model():
    stages = yaml.safe_load((PIPELINES / "self_rewarding_gen_tiny.yaml").read_text())["pairs"]["stages"]
    for i in (1, 2):
        bad = [dict(s) for s in stages]
        bad[i]["model"] = "other-model"
        with pytest.raises(LoopError, match=rf"pairs.stages\[{i}\].model: set by the loop .*only a prompt-writing "
                                            r"stage, self_instruct_bootstrap, may name a fixed model"):
            _load("self_rewarding_gen_tiny", pairs={"stages": bad})
    # without `model:` the round's policy writes the prompts (the pipeline's model)
    cfg = _load("self_rewarding_gen_tiny", pairs={"stages": [{k: v for k, v in stages[0].items() if k != "model"},
                                                             *stages[1:]]})
    assert cfg.fixed_stage_models() == [] and cfg.prompt_writers()[0]["model"] is None


def test_loop_card_cites_the_method():
    from synthfb.loop.card import render_card

    for method, paper in (("spin", "Self-Play Fine-Tuning"), ("self_rewarding", "Self-Rewarding Language Models"),
                          ("rft", "RAFT: Reward rAnked FineTuning")):
        text = render_card({"name": "x", "status": "running", "config": {"method": method}, "rounds": []})
        assert "## References" in text and paper in text
    assert "## References" not in render_card({"name": "x", "config": {"method": "dpo"}, "rounds": []})


# -- end to end on the tiny model -----------------------------------------------------------------------------------

def _fewer_samples(name: str, n: int) -> dict:
    """The file's ``pairs`` with ``n`` samples per prompt (shorter tests)."""
    pairs = yaml.safe_load((PIPELINES / f"{name}.yaml").read_text())["pairs"]
    pairs["stages"][0]["n"] = n
    return pairs


def _run(name, tmp_path, tiny_model, hf_tiny, **overrides):
    return run_loop(PIPELINES / f"{name}.yaml", tmp_path / name, engines={str(tiny_model): hf_tiny},
                    progress=False, overrides={"policy": str(tiny_model), **overrides})


@pytest.mark.timeout(600)
def test_spin_two_rounds(tmp_path, tiny_model, hf_tiny):
    res = _run("spin_tiny", tmp_path, tiny_model, hf_tiny, limit=3)
    gold = {json.loads(x)["prompt"]: json.loads(x)["completion"]
            for x in (PIPELINES / "data" / "spin_sft.jsonl").read_text().splitlines()}
    ck0 = res.out / "round-00" / "checkpoint"
    for k, policy in ((0, tiny_model), (1, ck0)):
        m = json.loads((res.out / f"round-{k:02d}" / "metrics.json").read_text())
        assert m["policy"]["path"] == str(policy)
        pairs = datasets.load_from_disk(str(res.out / f"round-{k:02d}" / "round_data")).to_list()
        samples = {r["prompt"]: r["response"] for r in
                   datasets.load_from_disk(str(res.out / f"round-{k:02d}" / "pairs" / "dataset"))}
        assert len(pairs) == m["pairs"]["pairs_built"] == 3 - m["pairs"]["round_data"]["counts"].get(
            "dropped_identical_to_gold", 0) >= 1
        for p in pairs:
            user = p["prompt"][-1]["content"]
            assert p["chosen"][0]["content"] == gold[user] and p["rejected"][0]["content"] == samples[user]
            assert p["provenance"][-1]["model"] == policy.name and p["iteration"] == k
            assert p["provenance"][-1]["model_revision"] == model_revision(str(policy))
        # DPO against the previous iterate: at step 0 the policy is its reference, so the loss is ln 2
        assert m["train"]["first_loss"] == pytest.approx(LN2, abs=1e-5)
        # round 1 trains on its own pairs and round 0's (SPIN's iteration t mixes in iteration t-1)
        assert len(m["train"]["pair_datasets"]) == k + 1
    r0 = json.loads((res.out / "round-00" / "metrics.json").read_text())
    r1 = json.loads((res.out / "round-01" / "metrics.json").read_text())
    assert r1["train"]["pairs"] == r0["pairs"]["pairs_built"] + r1["pairs"]["pairs_built"]


@pytest.mark.timeout(600)
def test_self_rewarding_two_rounds(tmp_path, tiny_model, hf_tiny):
    res = _run("self_rewarding_tiny", tmp_path, tiny_model, hf_tiny, limit=2,
               pairs=_fewer_samples("self_rewarding_tiny", 3))
    state = json.loads((res.out / "loop.json").read_text())
    assert state["eval_judge"]["path"] == str(tiny_model)  # frozen: the initial model, not the policy
    ck0 = res.out / "round-00" / "checkpoint"
    for k, policy in ((0, tiny_model), (1, ck0)):
        m = json.loads((res.out / f"round-{k:02d}" / "metrics.json").read_text())
        assert m["policy"]["path"] == m["judge"]["path"] == str(policy)  # the policy judges itself
        ds = datasets.load_from_disk(str(res.out / f"round-{k:02d}" / "pairs" / "dataset"))
        assert len(ds) == m["pairs"]["pairs_built"] >= 1
        for row in ds:
            assert row["score_chosen"] - row["score_rejected"] == pytest.approx(row["score_margin"])
            assert row["score_margin"] > 0  # min_margin 0: ties dropped
            assert {(p["model"], p["model_revision"]) for p in row["provenance"][1:]} == {
                (policy.name, model_revision(str(policy)))}  # sampled and judged by it
            assert row["score_probs"] is not None  # label log-probs on a local backend
        assert m["train"]["first_loss"] == pytest.approx(LN2, abs=1e-5)


@pytest.mark.timeout(600)
def test_self_rewarding_with_written_prompts_two_rounds(tmp_path, tiny_model, hf_tiny):
    """The loop end to end with per-round prompts: the fixed writer (scripted: a tiny random model
    writes no task lists) writes each round's prompts, the round's policy samples and judges them,
    DPO trains; the loop card says how the prompts were made."""
    writer = _writer()
    res = run_loop(PIPELINES / "self_rewarding_gen_tiny.yaml", tmp_path / "gen", progress=False,
                   engines={str(tiny_model): hf_tiny, "default": writer}, overrides={"policy": str(tiny_model)})
    state = json.loads((res.out / "loop.json").read_text())
    [w] = state["prompt_writers"]
    assert (w["kind"], w["model"]["name"], w["model"]["revision"]) == ("self_instruct_bootstrap", "default",
                                                                       "fake-rev-1")
    ck0 = res.out / "round-00" / "checkpoint"
    written = []
    for k, policy in ((0, tiny_model), (1, ck0)):
        rdir = res.out / f"round-{k:02d}"
        m = json.loads((rdir / "metrics.json").read_text())
        assert m["policy"]["path"] == m["judge"]["path"] == str(policy)  # the policy judges itself
        wp = m["pairs"]["written_prompts"]
        assert (wp["model"], wp["fixed_model"], wp["written"], wp["seed"]) == ("default", True, 3, k)
        written.append({json.loads(x)["prompt"] for x in (rdir / "prompts.jsonl").read_text().splitlines()})
        ds = datasets.load_from_disk(str(rdir / "pairs" / "dataset"))
        assert len(ds) == m["pairs"]["pairs_built"] >= 1
        for row in ds:
            assert row["prompt"][-1]["content"] in written[k]
            writer_rec, *policy_recs = row["provenance"]
            assert writer_rec["model"] == "default" and {(p["model"], p["model_revision"]) for p in policy_recs} == {
                (policy.name, model_revision(str(policy)))}
        assert m["train"]["first_loss"] == pytest.approx(LN2, abs=1e-5)
    assert len(written[0]) == len(written[1]) == 3 and not written[0] & written[1]
    from fakes import request_text  # on sys.path via _writer()

    assert writer.requests and all("new and varied tasks" in request_text(r) for r in writer.requests)
    card = (res.out / "README.md").read_text()
    assert "Prompts: written afresh each round by `default` (revision `fake-rev-1`; fixed across rounds, not " \
           "the policy), few-shot from the seed prompts" in card
    assert "3 prompts (written by `default` from 8 seed prompts) sampled by" in card


@pytest.mark.timeout(600)
def test_rft_two_rounds(tmp_path, tiny_model, hf_tiny):
    res = _run("rft_tiny", tmp_path, tiny_model, hf_tiny, limit=2, pairs=_fewer_samples("rft_tiny", 3))
    ck0 = res.out / "round-00" / "checkpoint"
    for k, policy in ((0, tiny_model), (1, ck0)):
        m = json.loads((res.out / f"round-{k:02d}" / "metrics.json").read_text())
        assert m["policy"]["path"] == str(policy) and m["judge"]["path"] == str(tiny_model)  # a fixed scorer
        winners = datasets.load_from_disk(str(res.out / f"round-{k:02d}" / "round_data")).to_list()
        assert len(winners) == m["pairs"]["pairs_built"] == m["pairs"]["pipeline_rows"] >= 1
        for w in winners:
            scores = [s for s in w["all_scores"] if s is not None]
            assert w["score"] == max(scores) and w["completion"][0]["content"] == \
                w["responses"][w["all_scores"].index(max(scores))]
        assert m["train"]["method"] == "rft" and m["train"]["steps"] == 2 and m["train"]["pairs"] == len(winners)
    assert res.policy == str(res.out / "round-01" / "checkpoint")


def test_history_sets():
    """Which earlier rounds' data the policy trains on: SPIN's previous round by default; the loop file's
    `history` overrides it (-1: all earlier rounds, Llama 2's pool of winners; 0: none)."""
    from synthfb.loop.train import history_sets

    earlier = [{"fingerprint": f"r{k}"} for k in range(3)]
    assert history_sets(_load("spin_tiny"), earlier) == earlier[-1:]
    assert history_sets(_load("spin_tiny", history=0), earlier) == []
    assert history_sets(_load("rft_tiny"), earlier) == []
    assert history_sets(_load("rft_tiny", history=-1), earlier) == earlier
    assert history_sets(_load("rft_tiny", history=2), earlier) == earlier[1:]
    assert history_sets(_load("rft_tiny", history=2), []) == []
    with pytest.raises(LoopError, match="history: must be >= -1"):
        _load("rft_tiny", history=-2)
