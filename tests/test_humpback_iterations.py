"""Humpback with trained models (issue #14 item 7): the backward model's rows
(seed output -> instruction), their training in ``synthfb train sft``, and the
two-iteration sequence (M_0 curates, M_1 re-curates the same candidates) on
scripted models."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
from pathlib import Path

import datasets
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ has no __init__.py
import scripted_runs as sr  # noqa: E402
from fakes import FakeGenerator, last_user  # noqa: E402

from synthfb.engine import Pipeline, Runner  # noqa: E402
from synthfb.stages.backtranslation import AUGMENTED_TAG, SEED_TAG  # noqa: E402
from synthfb.stages.backtranslation_data import backward_sft_row  # noqa: E402

PIPELINES = sr.PIPELINES
SEED = PIPELINES / "data" / "realign_examples.jsonl"


def seed_pairs() -> list[dict]:
    return [json.loads(line) for line in SEED.read_text().splitlines() if line.strip()]


def synthfb(*args) -> str:
    from synthfb.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    assert code == 0, f"synthfb {' '.join(map(str, args))} exited {code}:\n{err.getvalue()[-3000:]}"
    return out.getvalue()


def test_backward_row_swaps_the_pair():
    assert backward_sft_row("Name a fruit.", "An apple.") == {
        "prompt": [{"role": "user", "content": "An apple."}],
        "completion": [{"role": "assistant", "content": "Name a fruit."}]}
    assert backward_sft_row("Name a fruit.", "An apple.", "standard") == {"prompt": "An apple.",
                                                                          "completion": "Name a fruit."}


def test_backward_pipeline_rows_are_reversed_seed_pairs(tmp_path):
    d, fake = sr.humpback_backward()
    res = sr.run(d, tmp_path / "run", fake)
    rows = sr.rows(tmp_path / "run")
    seeds = seed_pairs()
    assert res.num_rows == len(rows) == len(seeds) and fake.num_generate_calls == 0
    got = {r["instruction"]: r for r in rows}
    for s in seeds:
        r = got[s["instruction"]]
        assert r["prompt"] == [{"role": "user", "content": s["output"]}]  # no system message: M_yx sees y only
        assert r["completion"] == [{"role": "assistant", "content": s["instruction"]}]
    synthfb("card", tmp_path / "run")
    assert "arXiv:2308.06259" in (tmp_path / "run" / "README.md").read_text()


def test_seed_pipeline_rows_carry_the_seed_tag(tmp_path):
    """M_0's rows: instruction -> output with S_a as the system message."""
    d, fake = sr.humpback_seed()
    sr.run(d, tmp_path / "run", fake)
    rows = sr.rows(tmp_path / "run")
    assert len(rows) == len(seed_pairs()) and fake.num_generate_calls == 0
    for r in rows:
        assert r["source"] == "seed" and r["prompt"] == [{"role": "system", "content": SEED_TAG},
                                                         {"role": "user", "content": r["instruction"]}]
        assert r["completion"] == [{"role": "assistant", "content": r["output"]}]


def test_backward_pairs_names_the_bad_row(tmp_path):
    data = tmp_path / "seed.jsonl"
    data.write_text(json.dumps({"id": "a", "instruction": "Say hi.", "output": "Hi."}) + "\n"
                    + json.dumps({"id": "b", "instruction": "", "output": "Hello."}) + "\n")
    p = Pipeline.from_dict({"name": "x", "stages": [{"stage": "load", "path": str(data), "id_column": "id"},
                                                    {"stage": "backward_pairs"}]}, tmp_path)
    with pytest.raises(Exception, match=r"row 'b'.*'instruction'.*non-empty text"):
        Runner(p, tmp_path / "run", generators={p.model: FakeGenerator()}, progress=False).run()


def test_backward_rows_train_one_step_in_synthfb_train_sft(tmp_path, tiny_model):
    """M_yx: `synthfb train sft` with the shipped config on the reversed seed rows (1 step)."""
    d, fake = sr.humpback_backward()
    sr.run(d, tmp_path / "run", fake)
    out = tmp_path / "myx"
    sets = [f"model={tiny_model}", f"dataset={tmp_path / 'run' / 'dataset'}", f"output_dir={out}", "max_steps=1",
            "batch_size=2", "max_length=128"]
    res = synthfb("train", "sft", "--config", PIPELINES / "train" / "humpback_myx_tiny.yaml",
                  *(x for kv in sets for x in ("--set", kv)))
    summary = json.loads(res.strip().splitlines()[-1])
    assert summary["steps"] == 1 and summary["last"]["loss"] > 0
    assert (out / "config.json").exists()


def test_shipped_train_configs_name_the_sequence():
    """The train configs chain: backward rows -> M_yx; seed rows -> M_0; the base on seed + iteration 1's
    A_5 -> M_1; the base on seed + iteration 2's A_5 -> M_2 (a `dataset` list, the paper's mix); and the
    iteration pipeline asks M_yx (bare segment, chat) for candidates."""
    from synthfb.train.sft import SFTConfig

    cfg = {n: yaml.safe_load((PIPELINES / "train" / f"humpback_{n}_tiny.yaml").read_text()) for n in ("myx", "m0", "m1", "m2")}
    for c in cfg.values():
        SFTConfig(**c)  # every field is an SFTConfig field
    it = yaml.safe_load((PIPELINES / "humpback_iterate.yaml").read_text())
    bt = sr.stage_cfg(it, "backtranslate")
    assert bt["model"] == cfg["myx"]["output_dir"] and bt["chat"] is True
    assert bt["prompt"] == "backtranslation_backward_trained.jinja"
    assert it["model"] == cfg["m0"]["output_dir"]
    assert cfg["myx"]["model"] == cfg["m0"]["model"] == cfg["m1"]["model"] == cfg["m2"]["model"]  # all from the base
    assert cfg["myx"]["dataset"] == "runs/humpback/backward/dataset"
    assert cfg["m0"]["dataset"] == "runs/humpback/seed/dataset"
    assert cfg["m1"]["dataset"] == ["runs/humpback/seed/dataset", "runs/humpback/iter1/dataset"]
    assert cfg["m2"]["dataset"] == ["runs/humpback/seed/dataset", "runs/humpback/iter2/dataset"]
    assert sr.stage_cfg(it, "self_curate")["min_score"] == 4.5  # A_5


@pytest.mark.parametrize("name", ["humpback_backward", "humpback_seed", "humpback_iterate"])
def test_shipped_files_validate(name):
    assert "ok" in synthfb("validate", PIPELINES / f"{name}.yaml")


def test_two_iterations_m0_then_m1_rerate_the_same_candidates(tmp_path):
    """Iteration 1: M_yx writes the instructions, M_0 curates (A_5^(1)); iteration 2 (the run folder copied,
    resumed with --model M_1): the segments and M_yx's candidates are reused, M_1 re-rates all of them
    (A_5^(2)). Scripted models: M_0 rates as backtranslation's fake, M_1 rates 'Deeper is better' 5 and
    every other answer 3."""
    d, _ = sr.humpback_iterate()
    myx = FakeGenerator(default=sr.trained_backward, name="myx")
    m0 = FakeGenerator(rules=[("Judge whether", sr._ratings)], name="m0", revision="m0-rev")
    m1 = FakeGenerator(rules=[("Judge whether", lambda req, k: "Score: 5" if "Deeper is better" in last_user(req)
                               else "Fine.\nScore: 3")], name="m1", revision="m1-rev")
    bt_model = sr.stage_cfg(d, "backtranslate")["model"]

    def run(model, gen, out, **kw):
        p = Pipeline.from_dict({**d, "model": model}, PIPELINES, "pipelines/humpback_iterate.yaml")
        return Runner(p, out, generators={model: gen, bt_model: myx}, progress=False, **kw).run()

    it1 = tmp_path / "iter1"
    r1 = run("runs/humpback/m0", m0, it1)
    a1 = sr.rows(it1)
    assert r1.manifest["status"] == "finished" and a1
    # M_yx was asked with the bare segment as the only (user) turn
    assert all(req.messages == [{"role": "user", "content": req.messages[0]["content"]}] for req in myx.requests)
    asked = len(myx.requests)
    cands = {r["row_id"]: r["instruction"] for r in datasets.load_dataset(
        "parquet", data_files=sorted(str(f) for f in (it1 / "stages").glob("*backtranslate/chunk-*.parquet")),
        split="train").to_list()}
    assert len(cands) == asked > len(a1)  # some candidates were curated away by M_0
    assert all(r["curation_score"] == 5 and r["instruction"] == cands[r["row_id"]] for r in a1)
    assert all(r["system_tag"] == AUGMENTED_TAG and r["prompt"][0]["content"] == AUGMENTED_TAG for r in a1)

    it2 = tmp_path / "iter2"
    shutil.copytree(it1, it2)
    r2 = run("runs/humpback/m1", m1, it2, resume=True)
    a2 = sr.rows(it2)
    assert r2.manifest["status"] == "finished"
    assert len(myx.requests) == asked  # the candidates were reused, not written again
    assert len(m1.requests) == len(cands)  # M_1 re-rated every candidate
    want = {rid for rid, inst in cands.items() if inst.lower().startswith("how do i")}
    deeper = {r["row_id"] for r in a2}
    assert a2 and all("Deeper is better" in r["output"] and r["curation_score"] == 5 for r in a2)
    assert deeper <= want and not deeper & {r["row_id"] for r in a1}  # A_5^(2) differs from A_5^(1)
    assert sr.rows(it1) == a1  # iteration 1's A_5 is still there for M_1's training
