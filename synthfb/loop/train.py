"""Step 2 of a round: DPO of the round's policy on the round's pairs.

``train.json`` in the round folder holds the training fingerprint (the
``train:`` settings, the pairs' fingerprint and the starting policy's
revision) and whether training finished. A finished training with the same
fingerprint is never redone; an unfinished one resumes from its newest
``checkpoint-N`` (``synthfb.train.loop``); a changed one starts over.
"""

from __future__ import annotations

import gc
import shutil
from pathlib import Path
from typing import Any

from ..data.io import atomic_write_json
from .config import LoopError, stable_hash
from .state import read_json


def _train_fingerprint(train: dict, pairs_fp: str, policy_revision: str) -> str:
    return stable_hash({"train": train, "pairs": pairs_fp, "policy": policy_revision})


def _summary(out: dict, pair_accuracy: float, resumed_from: int, log_file: Path) -> dict[str, Any]:
    """Training metrics of a round: the last logged step (loss, reward
    accuracy and margin of that batch), the first loss, and the accuracy of
    the trained implicit reward over all the round's pairs."""
    hist = out.get("history") or []
    last = out.get("last") or (hist[-1] if hist else {})
    return {
        "steps": out["steps"],
        "resumed_from_step": resumed_from,
        "first_loss": hist[0]["loss"] if hist else None,
        "final_loss": last.get("loss"),
        "final_reward_accuracy": last.get("reward_accuracy"),
        "final_reward_margin": last.get("reward_margin"),
        "final_rewards_chosen": last.get("rewards_chosen"),
        "final_rewards_rejected": last.get("rewards_rejected"),
        "pair_accuracy": pair_accuracy,
        "seconds": round(out["seconds"], 3),
        "log": str(log_file),
    }


def train_round(train: dict, policy_path: str, policy_revision: str, pairs: dict[str, Any], rdir: Path,
                keep_checkpoints: bool, log) -> dict[str, Any]:
    """Train (or resume, or reuse) the round's DPO into ``rdir/checkpoint``;
    returns the training metrics recorded in ``rdir/train.json``."""
    marker = rdir / "train.json"
    ckpt = rdir / "checkpoint"
    fp = _train_fingerprint(train, pairs["fingerprint"], policy_revision)
    rec = read_json(marker)
    if rec and rec.get("fingerprint") == fp and rec.get("finished") and (ckpt / "config.json").exists():
        log(f"{rdir.name}: training finished before; reusing {ckpt}")
        if not keep_checkpoints:
            _drop_resume_states(ckpt)
        return rec["metrics"]
    if rec and (rec.get("fingerprint") != fp or rec.get("finished")):
        log(f"{rdir.name}: pairs, policy or train settings changed (or the checkpoint is gone); training again")
        shutil.rmtree(ckpt, ignore_errors=True)
    if pairs["pairs_built"] == 0:
        raise LoopError(f"{rdir.name}: no preference pairs to train on (stage counts: {pairs['counts']}); use more "
                        f"prompts, more samples (n) or a lower min_margin")
    from ..train import loop as tloop
    from ..train.config import ConfigError, load_config
    from ..train.dpo import DPOConfig, preference_accuracy, train_dpo

    try:
        cfg = load_config(DPOConfig, {**train, "model": policy_path, "dataset": pairs["dataset"],
                                      "output_dir": str(ckpt), "resume": True}, where=f"{rdir.name} train")
    except ConfigError as e:
        raise LoopError(str(e)) from None
    atomic_write_json(marker, {"fingerprint": fp, "finished": False})
    start = tloop.latest_checkpoint(ckpt)
    resumed_from = int(start.name.split("-")[1]) if start else 0
    log(f"{rdir.name}: DPO on {pairs['pairs_built']} pairs from {policy_path}"
        + (f" (resuming at step {resumed_from})" if resumed_from else ""))
    out = train_dpo(cfg)
    acc = preference_accuracy(out["model"], out["tokenizer"], out["examples"], cfg)
    metrics = _summary(out, acc, resumed_from, ckpt / "metrics.jsonl")
    del out
    gc.collect()
    atomic_write_json(marker, {"fingerprint": fp, "finished": True, "metrics": metrics})
    if not keep_checkpoints:
        _drop_resume_states(ckpt)
    return metrics


def _drop_resume_states(ckpt: Path) -> None:
    """Remove the ``checkpoint-N`` folders (weights + optimizer state kept
    only to resume an interrupted training) once training has finished."""
    for p in ckpt.glob("checkpoint-*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
