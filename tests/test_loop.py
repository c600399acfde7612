"""The RLAIF loop (``synthfb loop``) on the tiny model through real vLLM engines:
two rounds end to end (round 1 generates with round 0's checkpoint), a loop
killed mid-round resumes without redoing round 0 or finished training, and
bad loop files fail before any work with an error naming file and field."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest

from synthfb.llm.models import model_revision
from synthfb.loop import LoopError, load_loop, run_loop

REPO = Path(__file__).resolve().parent.parent
LOOP = REPO / "pipelines" / "rlaif_tiny.yaml"


@pytest.fixture(scope="module")
def tiny_loop(tmp_path_factory, tiny_model, vllm_tiny):
    """One uninterrupted 2-round loop; the session engine serves the round-0
    policy and the judge, the loop starts one engine per new checkpoint.
    The resumable checkpoint-N folders are kept for the kill test below."""
    out = tmp_path_factory.mktemp("loop") / "out"
    return run_loop(LOOP, out, engines={str(tiny_model): vllm_tiny}, progress=False,
                    overrides={"policy": str(tiny_model), "keep_checkpoints": True})


@pytest.mark.timeout(900)
def test_two_rounds_end_to_end(tiny_loop, tiny_model):
    out = tiny_loop.out
    state = json.loads((out / "loop.json").read_text())
    assert state["status"] == "finished" and [r["round"] for r in state["rounds"]] == [0, 1]
    ck0, ck1 = out / "round-00" / "checkpoint", out / "round-01" / "checkpoint"
    assert tiny_loop.policy == str(ck1)
    for k, policy in ((0, tiny_model), (1, ck0)):
        rdir = out / f"round-{k:02d}"
        metrics = json.loads((rdir / "metrics.json").read_text())
        assert metrics == state["rounds"][k]["metrics"]
        # the round generated with the previous round's checkpoint, as its provenance says
        assert metrics["policy"]["path"] == str(policy) and metrics["policy"]["revision"] == model_revision(str(policy))
        ds = datasets.load_from_disk(str(rdir / "pairs" / "dataset"))
        for row in ds:
            gen, judged = row["provenance"]
            assert gen["model"] == policy.name and gen["model_revision"] == model_revision(str(policy))
            # the fixed judge (the round-0 policy); rows name a local model by folder name + hash, never its path
            assert judged["model"] == tiny_model.name and judged["model_revision"] == model_revision(str(tiny_model))
        run = json.loads((rdir / "pairs" / "run.json").read_text())
        assert run["stages"][1]["model"]["revision"] == model_revision(str(policy))  # named, never by path
        assert run["stages"][1]["model"]["name"] == policy.name
        # pairs: every prompt becomes a pair or a counted drop
        p = metrics["pairs"]
        assert p["prompts"] == 4 and p["pairs_built"] == len(ds) >= 1
        assert p["pairs_built"] + p["ties_dropped"] + p["counts"].get("all_responses_identical", 0) == 4
        assert p["position_bias_gap"] == pytest.approx(sum(ds["position_bias"]) / len(ds))
        # training: 2 DPO steps from the round's policy (step 1: loss ln 2, policy == reference)
        t = metrics["train"]
        assert t["steps"] == 2 and t["first_loss"] == pytest.approx(0.6931, abs=1e-3)
        assert t["final_loss"] is not None and 0 <= t["final_reward_accuracy"] <= 1
        assert isinstance(t["final_reward_margin"], float) and 0 <= t["pair_accuracy"] <= 1
        # held-out: new policy vs round 0, judged in both orders on the fixed prompts
        e = json.loads((rdir / "eval.json").read_text())["metrics"]
        assert e["prompts"] == e["judged"] == 3 and e["wins"] + e["ties"] + e["losses"] == 3
        assert e["win_rate"] == pytest.approx((e["wins"] + e["ties"] / 2) / 3)
        assert metrics["eval"]["win_rate"] == e["win_rate"] and e["judge"]["path"] == str(tiny_model)
        for pp in e["per_prompt"]:
            assert 0 < pp["p_new"] < 1 and -1 < pp["position_gap"] < 1
            if pp["identical"]:
                assert pp["p_new"] == pytest.approx(0.5)
        answers = json.loads((rdir / "heldout-answers.json").read_text())
        assert answers["model"]["path"] == str(rdir / "checkpoint")
    base = json.loads((out / "heldout-base.json").read_text())
    assert base["model"]["path"] == str(tiny_model) and len(base["responses"]) == 3
    assert model_revision(str(ck0)) != model_revision(str(tiny_model))


def _as_killed_in_round_1_training(out: Path, marker: str, keep: tuple[str, ...]) -> None:
    """Put a finished loop folder into the on-disk state of a kill in round 1
    after training step 1 (its resumable checkpoint-1 kept): the final model
    files (except names starting with ``keep``), the eval and the round's
    metrics gone, the training's ``marker`` and the round unfinished."""
    r1 = out / "round-01"
    for p in (r1 / "checkpoint").iterdir():
        # the folder's synthfb marker is written before any training file, so a real kill leaves it
        if p.is_file() and not p.name.startswith((*keep, ".synthfb")):
            p.unlink()
    for name in ("eval.json", "heldout-answers.json", "metrics.json"):
        (r1 / name).unlink()
    rec = json.loads((r1 / marker).read_text())
    (r1 / marker).write_text(json.dumps({"fingerprint": rec["fingerprint"], "finished": False}))
    state = json.loads((out / "loop.json").read_text())
    state["status"] = "running"
    state["rounds"][1] = {k: v for k, v in state["rounds"][1].items() if k in ("round", "fingerprint", "policy")}
    state["rounds"][1]["status"] = "running"
    (out / "loop.json").write_text(json.dumps(state))


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.timeout(900)
def test_killed_loop_resumes_mid_round(tiny_loop, tiny_model, vllm_tiny):
    out = tiny_loop.out
    r1 = out / "round-01"
    ckpt = r1 / "checkpoint"
    # 1. the on-disk state of a kill in round 1 between DPO step 1 and the final save:
    #    pairs and checkpoint-1 on disk, no final model, no eval, round 1 unfinished
    import safetensors.torch as st

    uninterrupted = st.load_file(str(ckpt / "model.safetensors"))
    assert (ckpt / "checkpoint-1" / "trainer_state.pt").exists()
    _as_killed_in_round_1_training(out, "train.json", keep=("ref_logps", "metrics"))
    step1 = (ckpt / "metrics.jsonl").read_text().splitlines()[0]  # with its timings: rewritten if step 1 is redone
    round0 = _files(out / "round-00")
    pairs1 = _files(r1 / "pairs" / "stages")

    # 2. a real `synthfb loop --resume`, SIGKILLed mid-round once its training finished
    #    (it is then starting the engine of the new checkpoint for the held-out eval)
    cmd = [sys.executable, "-m", "synthfb.cli", "loop", str(LOOP), "--policy", str(tiny_model), "--out", str(out),
           "--resume", "--quiet"]
    log = out.parent / "killed.log"
    with open(log, "wb") as err:  # a file, not a pipe: a full pipe would stall the child
        proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if json.loads((r1 / "train.json").read_text()).get("finished"):
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the loop ended before the kill: {log.read_text()[-3000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # the engines the loop started wrote to OUT/logs/engine.log, not to the terminal (stderr)
    assert "vllm" not in log.read_text().lower(), log.read_text()[-2000:]
    assert not (r1 / "eval.json").exists() and json.loads((out / "loop.json").read_text())["status"] == "running"
    train = json.loads((r1 / "train.json").read_text())
    assert train["finished"] and train["metrics"]["resumed_from_step"] == 1  # resumed from checkpoint-1
    assert (ckpt / "metrics.jsonl").read_text().splitlines()[0] == step1, "DPO step 1 was redone"
    resumed = st.load_file(str(ckpt / "model.safetensors"))
    for name, w in uninterrupted.items():  # resuming gives the uninterrupted weights
        assert (resumed[name] - w).abs().max() <= 1e-6, name
    train_mtime = (r1 / "train.json").stat().st_mtime_ns

    # 3. resume again: round 0, round 1's pairs and its finished training are reused
    res = run_loop(LOOP, out, resume=True, engines={str(tiny_model): vllm_tiny}, progress=False,
                   overrides={"policy": str(tiny_model)})
    state = json.loads((out / "loop.json").read_text())
    assert state["status"] == "finished" and [r["status"] for r in state["rounds"]] == ["finished", "finished"]
    assert _files(out / "round-00") == round0, "round 0 was redone"
    assert _files(r1 / "pairs" / "stages") == pairs1, "round 1's pairs were regenerated"
    assert (r1 / "train.json").stat().st_mtime_ns == train_mtime, "finished training was redone"
    assert not list(ckpt.glob("checkpoint-*"))  # resumable states dropped once training finished
    m1 = json.loads((r1 / "metrics.json").read_text())
    assert m1["train"]["resumed_from_step"] == 1 and m1["eval"]["judged"] == 3
    assert res.rounds[1] == m1 and m1["policy"]["path"] == str(out / "round-00" / "checkpoint")


@pytest.mark.engine  # a whole loop on the transformers backend (generation, training)
@pytest.mark.timeout(600)
def test_self_judging_loop_on_transformers_backend(tmp_path, tiny_model):
    """`judge: policy`: each round's policy ranks its own samples, while the
    held-out win rate keeps the fixed round-0 judge (no engine start-up costs
    on the transformers backend, so this runs the loop's other path cheaply)."""
    text = (GOOD.replace("backend: vllm", "backend: transformers").replace("  max_model_len: 2048\n", "")
            .replace("# judge: omitted", "judge: policy\n# judge: omitted")
            .replace("prompts: data/", f"prompts: {REPO}/pipelines/data/"))
    res = run_loop(_write(tmp_path, text), tmp_path / "out", progress=False,
                   overrides={"policy": str(tiny_model), "limit": 2})
    assert (tmp_path / "out" / "logs" / "engine.log").is_file()  # engine/library output of the loop itself
    ck0 = tmp_path / "out" / "round-00" / "checkpoint"
    for k, policy in ((0, tiny_model), (1, ck0)):
        ds = datasets.load_from_disk(str(tmp_path / "out" / f"round-{k:02d}" / "pairs" / "dataset"))
        assert len(ds) == res.rounds[k]["pairs"]["pairs_built"] >= 1
        for row in ds:
            # samples, then judges; rows name a local model by its folder name and content hash, never its path
            assert [p["model"] for p in row["provenance"]] == [policy.name, policy.name]
            assert {p["model_revision"] for p in row["provenance"]} == {model_revision(str(policy))}
            assert {p["backend"] for p in row["provenance"]} == {"transformers"}
        assert res.rounds[k]["judge"]["path"] == str(policy)
        assert res.rounds[k]["eval"]["judge"]["path"] == str(tiny_model)
    assert res.policy == str(tmp_path / "out" / "round-01" / "checkpoint")


def test_engine_pool_closes_old_policy_never_judges(tiny_model, tmp_path):
    """Starting a policy engine closes the previous policy's; starting a
    (pinned) judge late, e.g. on resume, closes nothing. The engines' own
    start-up is covered above; here started engines are recorded objects."""
    from synthfb.llm.tiny import make_tiny_model
    from synthfb.loop.engines import EnginePool

    class Started:
        closed = False

        def close(self):
            self.closed = True

    pool = EnginePool("vllm", {}, {}, 0, progress=False)
    pool.pin(str(tiny_model))
    ck = [str(make_tiny_model(tmp_path / f"ck{i}", seed=i)) for i in range(2)]
    judge, p0, p1 = pool.get(str(tiny_model)), pool.get(ck[0]), pool.get(ck[1])
    assert p0.info.revision == model_revision(ck[0]) and not p0.started  # identity without an engine
    e0, ej = Started(), Started()
    p0._gen = e0
    pool._make_room(judge)  # the judge starts while round 0's policy runs
    assert not e0.closed
    judge._gen = ej
    pool._make_room(p1)  # the next policy starts
    assert e0.closed and not p0.started and not ej.closed and judge.started


def _write(tmp_path: Path, text: str) -> Path:
    f = tmp_path / "loop.yaml"
    f.write_text(text)
    return f


GOOD = LOOP.read_text()


@pytest.mark.parametrize("edit,expected", [
    (("rounds: 2", "rounds: two"), r"rounds: expected integer, got str 'two'"),
    (("      n: 3", "      n: many"), r"pairs\.stages\[0\]\.n: expected"),
    (("  max_steps: 2", "  max_step: 2"), r"train: unknown field\(s\) \['max_step'\]"),
    (("  max_steps: 2", "  model: other"), r"train\.model: set by the loop"),
    (("    - stage: onpolicy_pairs", "    - stage: onpolicy_pair"), r"pairs\.stages\[0\]\.stage: unknown stage"),
    (("      ranker: llm_judge", "      ranker_model: x"), r"pairs\.stages\[0\]\.ranker_model: set by the loop"),
    (("limit: 4", "limit: 4\nroundz: 3"), r"unknown field\(s\) \['roundz'\]"),
    (("    - \"Name two rivers in Europe.\"", "    - \"Give three tips for staying healthy.\""),
     r"eval\.prompts: 1 held-out prompt\(s\) are also training prompts"),
    (("prompts: data/feedback_prompts.jsonl", "prompts: nope/missing.jsonl"),
     r"prompts: prompts file 'nope/missing\.jsonl' not found"),
    (("  beta: 0.1", "  beta: -1"), r"train: field `beta` must be > 0"),
])
def test_bad_loop_file_names_file_and_field(tmp_path, edit, expected):
    old, new = edit
    assert old in GOOD
    text = GOOD.replace(old, new, 1).replace("prompts: data/", f"prompts: {REPO}/pipelines/data/")
    f = _write(tmp_path, text)
    with pytest.raises(LoopError, match=expected) as e:
        load_loop(f)
    assert str(e.value).startswith(str(f) + ": ")


def test_bad_loop_file_cli_exit_2_before_any_work(tmp_path):
    f = _write(tmp_path, GOOD.replace("      n: 3", "      n: many"))
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "synthfb.cli", "loop", str(f), "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        f"synthfb: error: {f}: pairs.stages[0].n: expected integer, got str 'many'")
    assert not out.exists()
    with pytest.raises(LoopError, match=r"expected a mapping at the top level"):
        load_loop(_write(tmp_path, "- just a list\n"))
    with pytest.raises(LoopError, match=r"line \d+, column \d+: invalid YAML"):
        load_loop(_write(tmp_path, "name: [unclosed\n"))


# --- method: rm_ppo (reward model on the pairs, then PPO against it) --------------------------

LOOP_PPO = REPO / "pipelines" / "rlaif_tiny_ppo.yaml"


@pytest.fixture(scope="module")
def tiny_ppo_loop(tmp_path_factory, tiny_model, vllm_tiny):
    out = tmp_path_factory.mktemp("loop_ppo") / "out"
    return run_loop(LOOP_PPO, out, engines={str(tiny_model): vllm_tiny}, progress=False,
                    overrides={"policy": str(tiny_model), "keep_checkpoints": True})


def _pair_accuracy(rm_dir: Path, datasets_: list[str]) -> float:
    """Recomputed independently of the loop: the RM checkpoint as plain
    transformers scores each chosen and rejected at the last real token."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(rm_dir)
    model = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    right = n = 0
    for d in datasets_:
        for row in datasets.load_from_disk(d):
            head = tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
            scores = []
            for side in ("chosen", "rejected"):
                full = tok.apply_chat_template(row["prompt"] + row[side], tokenize=False)
                ids = tok(head, add_special_tokens=False)["input_ids"] + tok(full[len(head):], add_special_tokens=False)["input_ids"]
                with torch.no_grad():
                    scores.append(float(model(input_ids=torch.tensor([ids])).logits[0, 0]))
            right += scores[0] > scores[1]
            n += 1
    return right / n


@pytest.mark.timeout(900)
def test_rm_ppo_rounds_end_to_end(tiny_ppo_loop, tiny_model):
    out = tiny_ppo_loop.out
    state = json.loads((out / "loop.json").read_text())
    assert state["status"] == "finished" and [r["round"] for r in state["rounds"]] == [0, 1]
    ck0 = out / "round-00" / "checkpoint"
    assert tiny_ppo_loop.policy == str(out / "round-01" / "checkpoint")
    prompts = [json.loads(x) for x in (out / "data" / "prompts.jsonl").read_text().splitlines()]
    ppo_prompts = [json.loads(x) for x in (out / "data" / "ppo_prompts.jsonl").read_text().splitlines()]
    assert [p["prompt"] for p in ppo_prompts] == [[{"role": "user", "content": p["prompt"]}] for p in prompts]
    pair_sets = []
    for k, policy in ((0, tiny_model), (1, ck0)):
        rdir = out / f"round-{k:02d}"
        metrics = json.loads((rdir / "metrics.json").read_text())
        assert metrics == state["rounds"][k]["metrics"]
        assert metrics["policy"]["path"] == str(policy) and metrics["pairs"]["pairs_built"] >= 1
        pair_sets.append(str(rdir / "pairs" / "dataset"))
        t = metrics["train"]
        assert t["method"] == "rm_ppo"
        # reward model: from the round-0 policy, on the pairs of rounds 0..k (rm_pairs: all_rounds)
        rm = t["rm"]
        assert rm["init"]["path"] == str(tiny_model) and rm["pair_datasets"] == pair_sets
        assert rm["pairs"] == sum(len(datasets.load_from_disk(d)) for d in pair_sets) and rm["steps"] == 3
        assert rm["pair_accuracy"] == pytest.approx(_pair_accuracy(rdir / "reward_model", pair_sets))
        # PPO: 2 iterations from the round's policy; the first rollout's KL to the reference is 0 (reference =
        # the round's policy) and its first minibatch reproduces the rollout log-probs
        p = t["ppo"]
        assert p["steps"] == 2 and p["rollout_backend"] == "transformers"
        hist = [json.loads(x) for x in (rdir / "checkpoint" / "metrics.jsonl").read_text().splitlines()]
        assert [h["step"] for h in hist] == [1, 2] and hist[0]["kl"] == 0.0
        assert all(h["first_minibatch_ratio"] == pytest.approx(1.0, abs=1e-5) for h in hist)
        assert p["first_score_mean"] == hist[0]["score_mean"] and p["final_kl"] == hist[-1]["kl"]
        cfg = (rdir / "checkpoint" / "train_config.yaml").read_text()
        assert f"model: {policy}\n" in cfg and f"reward_model: {rdir / 'reward_model'}\n" in cfg
        assert model_revision(str(rdir / "checkpoint")) == metrics["checkpoint_revision"] != metrics["policy"]["revision"]
        e = metrics["eval"]
        assert e["prompts"] == e["judged"] == 3 and e["judge"]["path"] == str(tiny_model)


@pytest.mark.timeout(900)
def test_rm_ppo_loop_resumes_mid_ppo(tiny_ppo_loop, tiny_model, vllm_tiny):
    """The state of a kill in round 1 between PPO iterations 1 and 2: the
    resumed loop reuses round 0, round 1's pairs and its finished reward
    model, and continues PPO from checkpoint-1 to the uninterrupted weights."""
    import safetensors.torch as st

    out = tiny_ppo_loop.out
    r1 = out / "round-01"
    ckpt = r1 / "checkpoint"
    uninterrupted = st.load_file(str(ckpt / "model.safetensors"))
    assert (ckpt / "checkpoint-1" / "value_head.pt").exists()
    _as_killed_in_round_1_training(out, "ppo.json", keep=("metrics",))
    step1 = (ckpt / "metrics.jsonl").read_text().splitlines()[0]  # with its timings: rewritten if step 1 is redone
    round0 = _files(out / "round-00")

    def kept_files():  # the reward model's own resumable checkpoint-N folders are dropped on reuse
        rm = {k: v for k, v in _files(r1 / "reward_model").items() if not k.startswith("checkpoint-")}
        return {**_files(r1 / "pairs" / "stages"), **rm, "rm.json": (r1 / "rm.json").stat().st_mtime_ns}

    kept = kept_files()

    res = run_loop(LOOP_PPO, out, resume=True, engines={str(tiny_model): vllm_tiny}, progress=False,
                   overrides={"policy": str(tiny_model)})
    assert json.loads((out / "loop.json").read_text())["status"] == "finished"
    assert _files(out / "round-00") == round0, "round 0 was redone"
    assert kept_files() == kept, "round 1's pairs or reward model were redone"
    ppo = res.rounds[1]["train"]["ppo"]
    assert ppo["resumed_from_step"] == 1 and ppo["steps"] == 2
    lines = (ckpt / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and lines[0] == step1, "PPO iteration 1 was redone"
    resumed = st.load_file(str(ckpt / "model.safetensors"))
    for name, w in uninterrupted.items():
        assert (resumed[name] - w).abs().max() <= 1e-6, name
    assert not list(ckpt.glob("checkpoint-*")) and not list((r1 / "reward_model").glob("checkpoint-*"))


PPO_GOOD = LOOP_PPO.read_text()


@pytest.mark.parametrize("edit,expected", [
    (("  max_steps: 3\n", "  dataset: x.jsonl\n"), r"rm\.dataset: set by the loop"),
    (("  kl_coef: 0.05", "  reward_model: rm/"), r"ppo\.reward_model: set by the loop"),
    (("  kl_coef: 0.05", "  kl_coeff: 0.05"), r"ppo: unknown field\(s\) \['kl_coeff'\]"),
    (("method: rm_ppo", "method: ppo"), r"method: 'ppo' is not one of \['dpo', 'kto', 'rm_ppo', 'spin', 'self_rewarding', 'rft', 'humpback'\]"),
    (("method: rm_ppo", "method: rm_ppo\ntrain: {beta: 0.1}"), r"train: not used by method 'rm_ppo'"),
    (("method: rm_ppo", "method: dpo"), r"rm: not used by method 'dpo'"),
    (("rm_pairs: all_rounds", "rm_pairs: every"), r"rm_pairs: 'every' is not one of"),
])
def test_bad_rm_ppo_loop_file_names_file_and_field(tmp_path, edit, expected):
    old, new = edit
    assert old in PPO_GOOD
    f = _write(tmp_path, PPO_GOOD.replace(old, new, 1).replace("prompts: data/", f"prompts: {REPO}/pipelines/data/"))
    with pytest.raises(LoopError, match=expected) as e:
        load_loop(f)
    assert str(e.value).startswith(str(f) + ": ")
