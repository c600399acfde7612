"""Humpback's two iterations as one loop (``method: humpback``, issue #14 item 7):
``pipelines/humpback_loop_tiny.yaml`` trains M_0 (seed) and M_yx (reversed seed) from
the base, M_yx writes the candidates once, M_0 then M_1 rate all of them, and each
next model is SFT of the base on seed + A_5.

Fast tier: the seed + A_5 rows (``humpback_union``) and the loop-file rules of the
method. Engine tier: two rounds with real training; the generators of M_yx and the
curators are scripted (a random tiny model writes no instruction and never rates
a 5), keyed by the checkpoint folders the loop trains, and a second run on the
tiny model throughout resumes a stopped loop.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import datasets
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ has no __init__.py
import scripted_runs as sr  # noqa: E402
from fakes import FakeGenerator, last_user, request_text  # noqa: E402

from synthfb.llm.models import model_revision  # noqa: E402
from synthfb.loop import LoopError, load_loop, run_loop  # noqa: E402
from synthfb.loop.round_data import HumpbackUnionConfig, humpback_union  # noqa: E402
from synthfb.stages.backtranslation import AUGMENTED_TAG, SEED_TAG  # noqa: E402
from synthfb.train import methods  # noqa: E402

PIPELINES = sr.PIPELINES
LOOP = PIPELINES / "humpback_loop_tiny.yaml"


def _load(name: str = "humpback_loop_tiny", **edits):
    return sr.shipped_loop(name, **edits)


# -- fast tier ---------------------------------------------------------------------------------------------------

def test_union_is_seed_then_curated_rows():
    seed = [{"row_id": "s1", "prompt": [{"role": "system", "content": SEED_TAG}, {"role": "user", "content": "Q"}],
             "completion": [{"role": "assistant", "content": "A"}], "instruction": "Q", "output": "A",
             "source": "seed", "system_tag": SEED_TAG, "provenance": []}]
    kept = [{"row_id": "c1", "prompt": [{"role": "system", "content": AUGMENTED_TAG},
                                        {"role": "user", "content": "How?"}],
             "completion": [{"role": "assistant", "content": "Like so."}], "instruction": "How?",
             "output": "Like so.", "source": "augmented", "system_tag": AUGMENTED_TAG, "curation_score": 5.0,
             "header": "x", "provenance": [{"model": "myx"}]}]
    rows, counts = humpback_union(kept, HumpbackUnionConfig(), 1, seed_rows=seed)
    assert counts == {"seed_rows": 1, "curated_rows": 1}
    assert [r["row_id"] for r in rows] == ["s1", "c1"] and {r["iteration"] for r in rows} == {1}
    assert rows[0]["curation_score"] is None and rows[1]["curation_score"] == 5.0
    assert set(rows[0]) == set(rows[1]) and "header" not in rows[1]  # one schema for both sides
    assert rows[1]["provenance"] == [{"model": "myx"}]
    only, counts = humpback_union(kept, HumpbackUnionConfig(with_seed=False), 0, seed_rows=seed)
    assert [r["row_id"] for r in only] == ["c1"] and counts["seed_rows"] == 0
    with pytest.raises(ValueError, match=r"humpback_union: seed row 's1' has no \['completion'\]"):
        humpback_union(kept, HumpbackUnionConfig(), 0, seed_rows=[{**seed[0], "completion": None}])


def test_method_declares_its_rounds():
    m = methods.get("humpback")
    assert [s.name for s in m.step_methods()] == ["sft"] and m.round_data == "humpback_union"
    assert m.self_judge and m.fixed_candidates and m.policy_start == "initial" and m.round_stages == ("self_curate",)


def test_loop_file_validates(capsys):
    from synthfb.cli import main

    for name in ("humpback_loop_tiny", "humpback_loop_smol"):
        assert main(["validate", str(PIPELINES / f"{name}.yaml")]) == 0
        assert "ok (2 rounds, method humpback, pairs stages: backtranslation_segments, backtranslate, self_curate" \
            in capsys.readouterr().out
    cfg = _load()
    assert cfg.self_judging and cfg.sft is not None and cfg.backward is not None
    assert [sd["stage"] for sd in cfg.candidate_stages()] == ["backtranslation_segments", "backtranslate"]
    assert [sd["stage"] for sd in cfg.stages_for("m")] == ["self_curate"]  # the round re-rates, nothing more


def test_loop_file_rules():
    stages = yaml.safe_load(LOOP.read_text())["pairs"]["stages"]
    with pytest.raises(LoopError, match="sft: method 'humpback' trains the seed model M_0"):
        _load(sft=None)
    with pytest.raises(LoopError, match="add a `backward:` section .* or name a given M_yx"):
        _load(backward=None)
    given = [stages[0], {**stages[1], "model": "runs/humpback/myx"}, stages[2]]
    assert _load(backward=None, pairs={"stages": given}).given_backward_model() == "runs/humpback/myx"
    with pytest.raises(LoopError, match=r"pairs.stages\[1\].model: set by the loop \(the `backward:` section"):
        _load(pairs={"stages": given})
    with pytest.raises(LoopError, match=r"pairs.stages\[1\]: method 'humpback' builds its pairs with self_curate"):
        _load(pairs={"stages": stages[:2]})
    with pytest.raises(LoopError, match="needs one `backtranslate` stage before the last .*; found 2"):
        _load(pairs={"stages": [stages[0], stages[1], stages[1], stages[2]]})
    with pytest.raises(LoopError, match=r"pairs.stages\[2\].model: set by the loop"):
        _load(pairs={"stages": [stages[0], stages[1], {**stages[2], "model": "x"}]})
    with pytest.raises(LoopError, match=r"pairs.stages\[2\].drop: false would train on every candidate"):
        _load(pairs={"stages": [stages[0], stages[1], {**stages[2], "drop": False}]})
    with pytest.raises(LoopError, match="backward: not used by method 'rft'"):
        rft = yaml.safe_load((PIPELINES / "rft_tiny.yaml").read_text())
        load_loop("rft_tiny.yaml", data={**rft, "backward": {"pipeline": "humpback_backward.yaml"}},
                  base_dir=PIPELINES)


# -- engine tier ---------------------------------------------------------------------------------------------------

def _rows(path: Path) -> list[dict]:
    return datasets.load_from_disk(str(path)).to_list()


@pytest.mark.timeout(600)
def test_two_iterations_m0_then_m1_rerate_the_same_candidates(tmp_path, tiny_model, hf_tiny):
    """Round 0 (iteration 1): M_0 rates every candidate M_yx wrote, M_1 = SFT of the base on seed + A_5^(1);
    round 1 (iteration 2): M_1 re-rates the same candidates (M_yx is not asked again), M_2 = SFT of the base
    on seed + A_5^(2). Training is real; the generators of the trained M_yx, M_0 and M_1 are scripted:
    M_yx turns a segment into "How do I ...?", M_0 rates as backtranslation's fake (one rating: "Deeper is
    better" 2, "balcony garden needs" unparseable, the rest 5), M_1 rates "Deeper is better" 5, the rest 3."""
    out = (tmp_path / "hb").resolve()
    myx = FakeGenerator(default=sr.trained_backward, name="myx", revision="myx-rev")
    m0 = FakeGenerator(rules=[("Judge whether", sr._ratings)], name="m0", revision="m0-rev")
    m1 = FakeGenerator(rules=[("Judge whether", lambda req, k: "Score: 5" if "Deeper is better" in last_user(req)
                               else "Fine.\nScore: 3")], name="m1", revision="m1-rev")
    engines = {str(tiny_model): hf_tiny, str(out / "backward" / "checkpoint"): myx,
               str(out / "sft" / "checkpoint"): m0, str(out / "round-00" / "checkpoint"): m1}
    res = run_loop(LOOP, out, engines=engines, progress=False, overrides={"policy": str(tiny_model)})
    state = json.loads((out / "loop.json").read_text())
    seed = _rows(out / "sft" / "data" / "dataset")
    assert state["sft"]["status"] == state["backward"]["status"] == "finished"
    assert (out / "backward" / "checkpoint" / "config.json").exists()  # M_yx really trained
    cands = [json.loads(x) for x in (out / "data" / "candidates.jsonl").read_text().splitlines()]
    assert state["candidates"]["rows"] == len(cands) == len(myx.requests) >= 4
    assert state["candidates"]["backward_model"]["revision"] == "myx-rev"
    assert all(c["instruction"].startswith("How do i") or c["instruction"].startswith("How do I") for c in cands)
    ids = {c["row_id"] for c in cands}
    kept = []
    for k, curator in ((0, m0), (1, m1)):
        rdir = out / f"round-{k:02d}"
        m = json.loads((rdir / "metrics.json").read_text())
        cur = m["curation"]
        assert (cur["iteration"], cur["curator"], cur["trained"]) == (k + 1, f"M_{k}", f"M_{k + 1}")
        assert cur["curator_model"]["revision"] == f"m{k}-rev" and m["judge"]["revision"] == f"m{k}-rev"
        assert cur["candidates_by"]["revision"] == "myx-rev" and cur["candidates"] == len(cands)
        # the round re-rated every candidate: a load of the candidates file and self_curate, no backtranslate
        run = json.loads((rdir / "pairs" / "run.json").read_text())
        assert [s["kind"] for s in run["stages"]] == ["load", "self_curate"]
        ratings = [r for r in curator.requests if "Judge whether" in request_text(r)]  # (it also answers held-out)
        assert run["stages"][1]["rows_in"] == len(cands) == len(ratings)
        a5 = _rows(rdir / "pairs" / "dataset")
        assert {r["row_id"] for r in a5} <= ids and all(r["curation_score"] == 5 for r in a5)
        assert all(r["prompt"][0]["content"] == AUGMENTED_TAG for r in a5)
        kept.append({r["row_id"] for r in a5})
        assert cur["kept"] == len(a5) and cur["kept_name"] == f"A_5^({k + 1})"
        # M_(k+1): SFT of the base (not of M_k) on seed + A_5^(k+1)
        union = _rows(rdir / "round_data")
        assert [r["row_id"] for r in union] == [r["row_id"] for r in seed] + [r["row_id"] for r in a5]
        assert [r["source"] for r in union] == ["seed"] * len(seed) + ["augmented"] * len(a5)
        assert all(r["prompt"][0]["content"] == SEED_TAG for r in union[:len(seed)])
        assert cur["seed_rows"] == len(seed) and cur["training_rows"] == m["train"]["pairs"] == len(union)
        assert m["train"]["init"]["path"] == cur["trained_from"]["path"] == str(tiny_model)
        assert m["train"]["steps"] == 2 and (rdir / "checkpoint" / "config.json").exists()
    assert len(myx.requests) == len(cands)  # M_yx wrote the candidates once, before round 0
    assert kept[0] and kept[1] and not kept[0] & kept[1]  # A_5^(2) is M_1's choice, not M_0's
    assert all("Deeper is better" in c["output"] for c in cands if c["row_id"] in kept[1])
    assert res.policy == str(out / "round-01" / "checkpoint")  # M_2, the final model
    card = (out / "README.md").read_text()
    assert "Round 0 (iteration 1): M_0 `m0` rated the" in card and "Round 1 (iteration 2): M_1 `m1` rated the" in card
    assert f"M_2 = SFT of `{tiny_model}` on {len(seed)} seed + {len(kept[1])} kept rows" in card
    assert "written once by M_yx `myx`" in card and "arXiv:2308.06259" in card
    # a finished loop resumed: everything reused, nobody asked again
    asked = (len(myx.requests), len(m0.requests), len(m1.requests))
    run_loop(LOOP, out, engines=engines, progress=False, overrides={"policy": str(tiny_model)}, resume=True)
    assert (len(myx.requests), len(m0.requests), len(m1.requests)) == asked
    # --overwrite clears what the loop wrote, M_yx's phase and the candidates included (nothing left over)
    from synthfb.loop.state import LoopFolder

    with LoopFolder(out, resume=False, overwrite=True):
        pass
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".synthfb")) == []


@pytest.mark.timeout(600)
def test_tiny_model_loop_stopped_after_iteration_1_resumes(tmp_path, tiny_model, hf_tiny):
    """The shipped file on the tiny model throughout (M_yx, M_0 and M_1 are the checkpoints the loop
    trains): a loop stopped after round 0 and resumed with 2 rounds reuses the candidates and round 0, and
    round 1 is curated by round 0's checkpoint M_1."""
    out = (tmp_path / "hb").resolve()
    kw = dict(engines={str(tiny_model): hf_tiny}, progress=False)
    run_loop(LOOP, out, overrides={"policy": str(tiny_model), "rounds": 1}, **kw)
    cands = (out / "data" / "candidates.jsonl").read_text()
    r0 = (out / "round-00" / "metrics.json").read_text()
    union0 = _rows(out / "round-00" / "round_data")
    mtime = (out / "data" / "candidates.jsonl").stat().st_mtime_ns
    res = run_loop(LOOP, out, overrides={"policy": str(tiny_model)}, resume=True, **kw)
    assert (out / "data" / "candidates.jsonl").read_text() == cands
    assert (out / "data" / "candidates.jsonl").stat().st_mtime_ns == mtime  # not rewritten
    assert (out / "round-00" / "metrics.json").read_text() == r0 and _rows(out / "round-00" / "round_data") == union0
    m1 = json.loads((out / "round-01" / "metrics.json").read_text())
    ck0 = str(out / "round-00" / "checkpoint")
    assert m1["curation"]["curator_model"]["path"] == m1["policy"]["path"] == ck0
    run = json.loads((out / "round-01" / "pairs" / "run.json").read_text())
    assert [s["kind"] for s in run["stages"]] == ["load", "self_curate"]
    assert run["stages"][1]["model"]["revision"] == model_revision(ck0) == m1["curation"]["curator_model"]["revision"]
    assert run["stages"][1]["rows_in"] == len(cands.splitlines())
    assert m1["train"]["init"]["path"] == str(tiny_model)
    assert res.policy == str(out / "round-01" / "checkpoint")
    assert (out / "round-01" / "checkpoint" / "config.json").exists()
    state = json.loads((out / "loop.json").read_text())
    assert [r["metrics"]["curation"]["curator"] for r in state["rounds"]] == ["M_0", "M_1"]


# -- `dataset:` as a list in `synthfb train` (the manual sequence's seed + A_5) ------------------------------------

def test_dataset_list_concatenates_in_order_and_names_a_mismatched_dataset(tmp_path):
    from synthfb.data.io import InputError
    from synthfb.train.collate import load_rows
    from synthfb.train.config import load_config
    from synthfb.train.sft import SFTConfig

    a, b, c = (tmp_path / f"{n}.jsonl" for n in "abc")
    a.write_text(json.dumps({"prompt": "Q1", "completion": "A1", "source": "seed"}) + "\n")
    b.write_text(json.dumps({"prompt": "Q2", "completion": "A2", "curation_score": 5}) + "\n")
    c.write_text(json.dumps({"messages": [{"role": "user", "content": "Q3"}]}) + "\n")
    rows = load_rows([str(a), str(b)])
    assert [r["prompt"] for r in rows] == ["Q1", "Q2"] and rows[1]["curation_score"] == 5  # other columns may differ
    with pytest.raises(InputError, match=rf"^{c}: training columns \['messages'\] differ from \['completion', "
                                         rf"'prompt'\] of {a}; every dataset of the `dataset` list"):
        load_rows([str(a), str(c)])
    # an empty part (an iteration that kept no A_5 row) adds nothing; all empty is the one-line error
    e = tmp_path / "empty.jsonl"
    e.write_text("")
    assert [r["prompt"] for r in load_rows([str(a), str(e)])] == ["Q1"]
    with pytest.raises(InputError, match="every dataset of the list is empty"):
        load_rows([str(e), str(e)])
    cfg = load_config(SFTConfig, {"model": "m", "dataset": [str(a), str(b)], "output_dir": "o"})
    assert cfg.dataset == [str(a), str(b)]
    from synthfb.train.config import ConfigError

    with pytest.raises(ConfigError, match="dataset"):
        load_config(SFTConfig, {"model": "m", "dataset": [], "output_dir": "o"})


@pytest.mark.engine  # trains (a few seconds)
def test_m1_config_trains_the_base_on_seed_and_a5(tmp_path, tiny_model):
    """`synthfb train sft` with the shipped M_1 config: the base model, 1 step on seed + A_5^(1) (both
    datasets written by the shipped pipelines on scripted models)."""
    from test_humpback_iterations import synthfb  # noqa: E402

    d, fake = sr.humpback_seed()
    sr.run(d, tmp_path / "seed", fake)
    d, fake = sr.humpback_iterate()
    sr.run(d, tmp_path / "iter1", fake)
    sets = [f"model={tiny_model}", f"dataset=[{tmp_path / 'seed' / 'dataset'}, {tmp_path / 'iter1' / 'dataset'}]",
            f"output_dir={tmp_path / 'm1'}", "max_steps=1", "batch_size=2", "max_length=128"]
    res = synthfb("train", "sft", "--config", PIPELINES / "train" / "humpback_m1_tiny.yaml",
                  *(x for kv in sets for x in ("--set", kv)))
    summary = json.loads(res.strip().splitlines()[-1])
    assert summary["steps"] == 1 and (tmp_path / "m1" / "config.json").exists()
