"""Self-Rewarding's per-round prompts (``self_rewarding_gen_*.yaml``): a written prompt that repeats a
held-out prompt or one an earlier round wrote (casefolded, whitespace collapsed) is dropped from the
round's training pairs, and the drops are counted per reason in the round's metrics. The loop's own
pieces (run_pairs, record_prompts, drop_repeated_prompts) run on scripted models, as in
tests/test_loop_methods.py; no training."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import datasets
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ has no __init__.py
from fakes import FakeGenerator, Reply, last_user, request_text  # noqa: E402
from scripted_runs import novel_instruction  # noqa: E402

from synthfb.loop import load_loop  # noqa: E402
from synthfb.loop.card import render_card  # noqa: E402
from synthfb.loop.pairs import (drop_repeated_prompts, normalize_prompt, pairs_metrics,  # noqa: E402
                                record_prompts, run_pairs, write_prompts)

PIPELINES = Path(__file__).resolve().parent.parent / "pipelines"
REPEATED = novel_instruction(4242)  # written in round 0 and again (other case and spacing) in round 1


def test_normalize_prompt():
    assert normalize_prompt("  Name two\n RIVERS\tin Europe. ") == "name two rivers in europe."


def test_repeats_of_heldout_and_earlier_prompts_are_dropped_and_counted(tmp_path):
    data = yaml.safe_load((PIPELINES / "self_rewarding_gen_tiny.yaml").read_text())
    cfg = load_loop("self_rewarding_gen_tiny.yaml", data=data, base_dir=PIPELINES)
    heldout = cfg.eval.prompts[0]  # "Name two rivers in Europe."
    state = {"round": 0, "calls": 0}

    def write(req, k):  # the first list of each round repeats something; the rest are novel
        state["calls"] += 1
        h = int(hashlib.sha256(request_text(req).encode()).hexdigest()[:12], 16)
        if state["calls"] == 1:
            first = f"  {heldout.upper()}" if state["round"] == 0 else " " + "  ".join(REPEATED.lower().split())
            second = REPEATED if state["round"] == 0 else novel_instruction(h)
            return f" {first}\n6. {second}\n"
        return f" {novel_instruction(h)}\n6. {novel_instruction(h + 1)}\n"

    writer = FakeGenerator(rules=[("Write a list of new and varied tasks:", write)],
                           default=Reply("unexpected prompt", "stop"), name="default")
    answers = ["off-topic", "a short answer", "the best answer"]

    def score(req, k):
        return f"Score: {answers.index(last_user(req).split('<response>')[1].split('<')[0])}"

    prompts_file = write_prompts(tmp_path / "prompts.jsonl", cfg.prompts)
    recs, pms = [], []
    for k in (0, 1):
        state.update(round=k, calls=0)
        policy = f"policy-{k}"
        engines = {"default": writer, policy: FakeGenerator(rules=[("<response>", score)],
                                                            default=lambda req, i: answers[i], name=policy)}
        rdir = tmp_path / f"round-{k:02d}"
        res = run_pairs(cfg, k, policy, prompts_file, rdir / "pairs", engines, progress=False)
        pm = pairs_metrics(res)
        rec = record_prompts(cfg, k, res, rdir)
        kept = drop_repeated_prompts(pm, rec, rdir)
        lines = [json.loads(x) for x in (rdir / "prompts.jsonl").read_text().splitlines()]
        written = {normalize_prompt(x["prompt"]): x["dropped"] for x in lines}
        recs.append(rec)
        pms.append((pm, kept))
        want = ({normalize_prompt(heldout): "in_heldout"} if k == 0
                else {normalize_prompt(REPEATED): "in_earlier_rounds"})
        assert {p: why for p, why in written.items() if why} == want
        assert rec["dropped"] == {"in_heldout": 1 - k, "in_earlier_rounds": k}
        assert (rec["in_heldout"], rec["in_earlier_rounds"]) == (1 - k, k)
        assert rec["written"] == len(lines) and rec["kept"] == len(lines) - 1 and len(rec["dropped_ids"]) == 1
        # the round trains on the kept prompts' pairs only
        rows = datasets.load_from_disk(kept["dataset"]).to_list()
        trained = {normalize_prompt(r["prompt"][-1]["content"]) for r in rows}
        assert trained == {p for p, why in written.items() if not why} and len(rows) == kept["pairs_built"]
        assert kept["pairs_built"] == pm["pairs_built"] - 1 and kept["dataset"] == str(rdir / "pairs_kept")
        reason = "in_heldout" if k == 0 else "in_earlier_rounds"
        assert kept["counts"][f"dropped_prompt_{reason}"] == 1 and kept["counts"]["dropped_prompt_pairs"] == 1
        assert kept["fingerprint"] != pm["fingerprint"]
        # the pipeline's own dataset is untouched (a resumed round drops the same rows again)
        assert len(datasets.load_from_disk(pm["dataset"])) == pm["pairs_built"]
        assert drop_repeated_prompts(pm, record_prompts(cfg, k, res, rdir), rdir)["fingerprint"] == kept["fingerprint"]
    # the card says what was dropped
    state = {"name": "x", "status": "finished", "rounds_planned": 2, "config": {"method": "self_rewarding"},
             "rounds": [{"status": "finished", "metrics": {
                 "round": k, "pairs": {**kept, "written_prompts": rec}, "policy": {"name": f"policy-{k}"},
                 "train": {"method": "self_rewarding"}, "eval": {}}}
                 for k, ((_, kept), rec) in enumerate(zip(pms, recs))]}
    card = render_card(state)
    assert "seed prompts; dropped: 1 repeating a held-out prompt)" in card
    assert "seed prompts; dropped: 1 repeating an earlier round's)" in card


def test_no_repeat_no_change(tmp_path):
    pm = {"pairs_built": 3, "dataset": "d", "counts": {}, "fingerprint": "f"}
    rec = {"dropped": {"in_heldout": 0, "in_earlier_rounds": 0}, "dropped_ids": []}
    assert drop_repeated_prompts(pm, rec, tmp_path) is pm


def test_pairs_made_several_per_prompt_are_dropped_too(tmp_path):
    """A stage that makes several rows of one prompt names them ``id/k`` (generate with explode,
    onpolicy_pairs, best_of_n): every one of a dropped prompt leaves, and no other."""
    rows = [{"row_id": rid, "prompt": rid, "chosen": "c", "rejected": "r"}
            for rid in ("w-1/0", "w-1/1", "w-10/0", "w-2", "w-3/0")]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    pm = {"pairs_built": len(rows), "dataset": str(tmp_path / "ds"), "counts": {}, "fingerprint": "f"}
    written = {"dropped_ids": ["w-1", "w-2"], "dropped": {"in_heldout": 1, "in_earlier_rounds": 1}}
    out = drop_repeated_prompts(pm, written, tmp_path)
    kept = [r["row_id"] for r in datasets.load_from_disk(out["dataset"])]
    assert kept == ["w-10/0", "w-3/0"] and out["pairs_built"] == 2
    assert out["counts"]["dropped_prompt_pairs"] == 3
