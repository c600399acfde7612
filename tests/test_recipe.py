"""The whole recipe in one command (``pipelines/recipe_tiny.yaml``): seed tasks
-> Self-Instruct -> SFT -> on-policy pairs -> DPO -> held-out win rates, on
the tiny model with the transformers backend (no engine start-up). The
Self-Instruct data is written by a scripted model (tests/fakes.py): a tiny
random model writes no parseable task lists. Checks that the SFT checkpoint
is the round-0 policy and round 0's DPO reference, that the rounds train
DPO, that every held-out comparison has its 95% bootstrap interval and
names its frozen judge (not the training ranker), and that a resumed loop
reuses everything, also after a kill inside the SFT step."""

from __future__ import annotations

import itertools
import json
import random
import re
import sys
from pathlib import Path

import datasets
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ has no __init__.py
from fakes import FakeGenerator, Reply

from synthfb.llm.models import model_revision
from synthfb.loop import load_loop, run_loop
from synthfb.loop.config import LoopError

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "pipelines" / "recipe_tiny.yaml"

WORDS = ["amber", "basil", "cedar", "delta", "ember", "fjord", "garnet", "harbor", "iris", "juniper", "kelp",
         "lagoon", "meadow", "nectar", "orchid", "pebble", "quartz", "raven", "saffron", "tundra", "umber",
         "violet", "willow", "yarrow", "zephyr", "acorn", "bramble", "canyon", "dune", "estuary"]


class SelfInstructTeacher:
    """Scripted answers to the three Self-Instruct prompts: novel task
    instructions (random words, so the ROUGE-L filter keeps them), "No" to
    "is it classification?", and two input/output examples per task."""

    def __init__(self):
        self.count = itertools.count()

    def bootstrap(self, req, k):
        a, b = ("Describe " + " ".join(random.Random(next(self.count)).sample(WORDS, 7)) for _ in range(2))
        return f" {a}\n10. {b}\n"

    def generator(self) -> FakeGenerator:
        return FakeGenerator(rules=[
            ("Write a list of new and varied tasks:", self.bootstrap),
            ("Is it classification?", " No"),
            ("For each task, write one or more examples.", ("\nExample 1\nInput: two apples\nOutput: a pair of "
                                                            "apples\nExample 2\nInput: three pears\nOutput: a few "
                                                            "pears")),
        ], default=Reply("unexpected prompt", "stop"), name="default")


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def _check_ci(e: dict) -> None:
    """The win rate lies in its 95% interval, and the interval is the
    percentile bootstrap over the judged prompts (recomputed here)."""
    import numpy as np

    lo, hi = e["win_rate_ci95"]
    assert 0 <= lo <= e["win_rate"] <= hi <= 1
    assert e["ci"]["level"] == 0.95 and "bootstrap" in e["ci"]["method"] and e["ci"]["seed"] == 0
    per = e.get("per_prompt")
    if per is not None:
        scores = np.array([0.5 if p["identical"] or abs(p["p_new"] - 0.5) <= 1e-9 else float(p["p_new"] > 0.5)
                           for p in per])
        assert scores.mean() == pytest.approx(e["win_rate"])
        rng = np.random.default_rng(e["ci"]["seed"])
        means = scores[rng.integers(0, len(scores), size=(e["ci"]["resamples"], len(scores)))].mean(axis=1)
        assert [lo, hi] == pytest.approx(list(np.quantile(means, [0.025, 0.975])), abs=1e-6)


def _check_judge(j: dict, tiny_model: Path) -> None:
    """The frozen held-out judge: the initial model with heldout_judge.jinja, both orders."""
    assert j["path"] == str(tiny_model) and j["template"] == "heldout_judge.jinja" and j["frozen"]
    assert j["orders"].startswith("both")


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_model, hf_tiny):
    out = tmp_path_factory.mktemp("recipe") / "out"
    teacher = SelfInstructTeacher().generator()
    res = run_loop(RECIPE, out, engines={"default": teacher, str(tiny_model): hf_tiny}, progress=False,
                   overrides={"policy": str(tiny_model), "keep_checkpoints": True})
    return res, teacher


@pytest.mark.engine  # transformers generation and four trainings
@pytest.mark.timeout(900)
def test_recipe_end_to_end(recipe, tiny_model):
    res, teacher = recipe
    out = res.out
    state = json.loads((out / "loop.json").read_text())
    assert state["status"] == "finished" and [r["round"] for r in state["rounds"]] == [0, 1]

    # 1. the warm-up: Self-Instruct rows written by the data model, then SFT of the initial policy
    sft = state["sft"]
    assert sft["status"] == "finished" and sft["data_model"]["name"] == "default"
    rows = datasets.load_from_disk(str(out / "sft" / "data" / "dataset")).to_list()
    assert len(rows) == sft["metrics"]["data"]["rows"] == 8  # 4 tasks x 2 instances
    assert "unexpected prompt" not in json.dumps(rows)
    for r in rows:
        assert r["prompt"] == [{"role": "user", "content": r["instruction"] + "\n\n" + r["input"]}]
        assert r["completion"] == [{"role": "assistant", "content": r["output"]}]
    t = sft["metrics"]["train"]
    assert t["method"] == "sft" and t["steps"] == 2 and t["rows"] == 8 and t["final_loss"] is not None
    ck_sft = out / "sft" / "checkpoint"
    assert sft["checkpoint"] == str(ck_sft) and json.loads((out / "sft" / "train.json").read_text())["finished"]
    assert "model: " + str(tiny_model) + "\n" in (ck_sft / "train_config.yaml").read_text()
    assert model_revision(str(ck_sft)) != model_revision(str(tiny_model))

    # 2. the SFT checkpoint is the round-0 policy and round 0's DPO reference; round 1 starts from round 0's
    for k, policy in ((0, ck_sft), (1, out / "round-00" / "checkpoint")):
        rdir = out / f"round-{k:02d}"
        m = json.loads((rdir / "metrics.json").read_text())
        assert m == state["rounds"][k]["metrics"]
        assert m["policy"]["path"] == str(policy) and m["policy"]["revision"] == model_revision(str(policy))
        pairs = datasets.load_from_disk(str(rdir / "pairs" / "dataset"))
        assert len(pairs) == m["pairs"]["pairs_built"] >= 1
        for row in pairs:
            gen, judged = row["provenance"]
            assert (gen["model"], gen["model_revision"]) == (policy.name, model_revision(str(policy)))
            assert judged["model"] == tiny_model.name  # the fixed training judge (rows never carry a local path)
        # DPO from the round's policy with it as the reference: the first step's loss is ln 2
        tr = m["train"]
        assert tr["method"] == "dpo" and tr["steps"] == 2 and tr["first_loss"] == pytest.approx(0.6931, abs=1e-3)
        assert "model: " + str(policy) + "\n" in (rdir / "checkpoint" / "train_config.yaml").read_text()
        # 3. the round's held-out win rate vs the round-0 (SFT) policy, with its interval and judge
        e = json.loads((rdir / "eval.json").read_text())["metrics"]
        assert e["judged"] == 4 and e["baseline"]["path"] == str(ck_sft)
        assert {k: v for k, v in e.items() if k != "per_prompt"} == m["eval"]
        _check_ci(e)
        _check_judge(e["judge"], tiny_model)
    base = json.loads((out / "heldout-base.json").read_text())
    assert base["model"]["path"] == str(ck_sft)

    # 4. the SFT checkpoint and the final policy against the initial policy
    se = json.loads((out / "sft" / "eval.json").read_text())["metrics"]
    assert se["new"]["path"] == str(ck_sft) and se["baseline"]["path"] == str(tiny_model)
    _check_ci(se)
    fe = json.loads((out / "final-eval.json").read_text())["metrics"]
    assert fe["new"]["path"] == str(out / "round-01" / "checkpoint") and fe["baseline"]["path"] == str(tiny_model)
    _check_ci(fe)

    # 5. the held-out judge is recorded once, frozen, and is not the training ranker
    _check_judge(state["eval_judge"], tiny_model)
    [ranker] = state["training_rankers"]
    assert ranker["template"] == "pairwise_judge.jinja" and ranker["model"] == str(tiny_model)
    assert ranker["template_sha256"] != state["eval_judge"]["template_sha256"]
    s = state["summary"]
    assert s["sft"]["rows"] == 8 and s["sft"]["vs_initial"]["win_rate_ci95"] == se["win_rate_ci95"]
    assert [r["vs_round_0"]["win_rate_ci95"] for r in s["rounds"]] == [
        r["metrics"]["eval"]["win_rate_ci95"] for r in state["rounds"]]
    assert s["final_vs_initial"]["win_rate"] == fe["win_rate"]
    card = (out / "README.md").read_text()
    for text in ("heldout_judge.jinja", "pairwise_judge.jinja", "percentile bootstrap", "frozen across rounds",
                 "SFT checkpoint vs initial policy", "round 1 vs round-0 policy", "final policy vs initial policy"):
        assert text in card, text


@pytest.mark.engine
@pytest.mark.timeout(900)
def test_recipe_resume_reuses_everything_and_resumes_sft(recipe, tiny_model, hf_tiny):
    res, teacher = recipe
    out = res.out
    engines = {"default": teacher, str(tiny_model): hf_tiny}
    kw = dict(engines=engines, progress=False, overrides={"policy": str(tiny_model)})
    rewritten = ("loop.json", "README.md", ".synthfb.json")  # the state, the card, the folder's marker

    def kept_files():
        return {k: v for k, v in _files(out).items() if k not in rewritten}

    kept = kept_files()

    # a resumed finished loop: no data model call, no file rewritten
    teacher.forget()
    again = run_loop(RECIPE, out, resume=True, **kw)
    assert teacher.num_generate_calls == 0
    assert kept_files() == kept
    assert again.rounds == res.rounds and again.state["summary"] == res.state["summary"]

    # a kill inside SFT after step 1 (its resumable checkpoint-1 on disk): SFT resumes from step 1,
    # the data run is reused, and the same weights come out
    import safetensors.torch as st

    ck = out / "sft" / "checkpoint"
    assert (ck / "checkpoint-1" / "trainer_state.pt").exists()  # the first run kept the resumable states
    uninterrupted = st.load_file(str(ck / "model.safetensors"))
    data_files = _files(out / "sft" / "data" / "stages")
    for p in ck.iterdir():
        if p.is_file() and not p.name.startswith(("metrics", ".synthfb")):
            p.unlink()
    rec = json.loads((out / "sft" / "train.json").read_text())
    (out / "sft" / "train.json").write_text(json.dumps({"fingerprint": rec["fingerprint"], "finished": False}))
    state = json.loads((out / "loop.json").read_text())
    state["sft"] = {k: v for k, v in state["sft"].items() if k in ("fingerprint", "started")} | {"status": "running"}
    state["status"] = "running"
    (out / "loop.json").write_text(json.dumps(state))
    teacher.forget()
    resumed = run_loop(RECIPE, out, resume=True, **kw)
    assert teacher.num_generate_calls == 0 and _files(out / "sft" / "data" / "stages") == data_files
    t = resumed.state["sft"]["metrics"]["train"]
    assert t["resumed_from_step"] == 1 and t["steps"] == 2
    weights = st.load_file(str(ck / "model.safetensors"))
    for name, w in uninterrupted.items():
        assert (weights[name] - w).abs().max() <= 1e-6, name
    assert resumed.state["status"] == "finished" and len(resumed.rounds) == 2


def test_recipe_files_validate_and_eval_judge_must_differ(tmp_path):
    """Both recipes load; an eval judge that is the training ranker (same
    model, same template) is refused with one line naming the field."""
    for name in ("recipe_tiny", "recipe_smol"):
        cfg = load_loop(REPO / "pipelines" / f"{name}.yaml")
        assert cfg.sft is not None and cfg.sft.method == "sft" and cfg.eval.judge_prompt == "heldout_judge.jinja"
        assert cfg.rounds >= 1 and cfg.method == "dpo"
    text = RECIPE.read_text().replace("path: data/", f"path: {REPO}/pipelines/data/").replace(
        "prompts: data/", f"prompts: {REPO}/pipelines/data/")
    f = tmp_path / "loop.yaml"
    f.write_text(text.replace("  judge_prompt: heldout_judge.jinja", "  judge_prompt: pairwise_judge.jinja"))
    with pytest.raises(LoopError, match=r"eval\.judge_prompt: the held-out judge would be the training ranker"):
        load_loop(f)
    # another model as the held-out judge may use the same template
    f.write_text(text.replace("  judge_prompt: heldout_judge.jinja",
                              "  judge_prompt: pairwise_judge.jinja\n  judge: default"))
    assert load_loop(f).eval_judge() == "default"
    f.write_text(text.replace("    max_steps: 2\n    save_steps: 1\n    batch_size: 4\n",
                              "    max_steps: 2\n    dataset: x.jsonl\n    batch_size: 4\n", 1))
    with pytest.raises(LoopError, match=r"sft\.train\.dataset: set by the loop"):
        load_loop(f)
    f.write_text(re.sub(r"      - stage: self_instruct_instances\n(        .*\n)+", "", text, count=1))
    with pytest.raises(LoopError, match=r"sft\.pipeline: the last stage must emit SFT rows"):
        load_loop(f)
