"""Step 2 of a round: train the round's policy on the round's pairs.

``method: dpo`` (default): DPO of the round's policy on its pairs
(reference = the round's policy) into ``round-NN/checkpoint``.

``method: rm_ppo``: a reward model (Bradley-Terry) trained on the round's
pairs (or on the pairs of rounds 0..k with ``rm_pairs: all_rounds``) into
``round-NN/reward_model``, then PPO from the round's policy on the training
prompts against that reward model (KL to the round's policy) into
``round-NN/checkpoint``.

Each training is a resumable step with a marker file in the round folder
(``train.json`` for DPO, ``rm.json`` and ``ppo.json``) holding its
fingerprint (settings, inputs' fingerprints, starting weights' revision) and
whether it finished. A finished step with the same fingerprint is never
redone; an unfinished one resumes from its newest ``checkpoint-N``
(``synthfb.train.loop``); a changed one starts over.
"""

from __future__ import annotations

import gc
import shutil
from pathlib import Path
from typing import Any, Callable

from ..data.io import atomic_write_json
from .config import LoopConfig, LoopError, stable_hash
from .state import read_json


def _history_summary(out: dict) -> tuple[dict, dict]:
    hist = out.get("history") or []
    return (hist[0] if hist else {}), (out.get("last") or (hist[-1] if hist else {}))


def _pairwise_summary(out: dict, pair_accuracy: float, resumed_from: int, log_file: Path) -> dict[str, Any]:
    """Metrics of a training on preference pairs (DPO or a reward model): the
    last logged step (loss, reward accuracy and margin of that batch), the
    first loss, and the accuracy of the trained (implicit) reward over all the
    pairs it trained on."""
    first, last = _history_summary(out)
    return {
        "steps": out["steps"],
        "resumed_from_step": resumed_from,
        "first_loss": first.get("loss"),
        "final_loss": last.get("loss"),
        "final_reward_accuracy": last.get("reward_accuracy"),
        "final_reward_margin": last.get("reward_margin"),
        "pair_accuracy": pair_accuracy,
        "seconds": round(out["seconds"], 3),
        "log": str(log_file),
    }


def resumable_step(rdir: Path, name: str, fingerprint: str, out_dir: Path, keep_checkpoints: bool, log,
                   train: Callable[[int], dict[str, Any]]) -> dict[str, Any]:
    """Run ``train(resumed_from_step)`` into ``out_dir`` unless it finished
    before with the same fingerprint; its metrics are recorded in
    ``rdir/NAME.json``. An unfinished step resumes from its newest
    ``checkpoint-N``; a changed one starts over in an emptied ``out_dir``."""
    from ..train import loop as tloop

    marker = rdir / f"{name}.json"
    rec = read_json(marker)
    if rec and rec.get("fingerprint") == fingerprint and rec.get("finished") and (out_dir / "config.json").exists():
        log(f"{rdir.name}: {name} finished before; reusing {out_dir}")
        if not keep_checkpoints:
            _drop_resume_states(out_dir)
        return rec["metrics"]
    if rec and (rec.get("fingerprint") != fingerprint or rec.get("finished")):
        log(f"{rdir.name}: {name}: its inputs or settings changed (or its output is gone); training again")
        shutil.rmtree(out_dir, ignore_errors=True)
    atomic_write_json(marker, {"fingerprint": fingerprint, "finished": False})
    start = tloop.latest_checkpoint(out_dir)
    metrics = train(int(start.name.split("-")[1]) if start else 0)
    gc.collect()
    atomic_write_json(marker, {"fingerprint": fingerprint, "finished": True, "metrics": metrics})
    if not keep_checkpoints:
        _drop_resume_states(out_dir)
    return metrics


def _load(cls, values: dict, where: str):
    from ..train.config import ConfigError, load_config

    try:
        return load_config(cls, values, where=where)
    except ConfigError as e:
        raise LoopError(str(e)) from None


def _no_pairs(rdir: Path, pairs: dict[str, Any]) -> LoopError:
    return LoopError(f"{rdir.name}: no preference pairs to train on (stage counts: {pairs['counts']}); use more "
                     f"prompts, more samples (n) or a lower min_margin")


def train_round(train: dict, policy_path: str, policy_revision: str, pairs: dict[str, Any], rdir: Path,
                keep_checkpoints: bool, log) -> dict[str, Any]:
    """DPO (or resume, or reuse) of the round's policy into ``rdir/checkpoint``;
    returns the training metrics recorded in ``rdir/train.json``."""
    ckpt = rdir / "checkpoint"
    fp = stable_hash({"train": train, "pairs": pairs["fingerprint"], "policy": policy_revision})

    def run(resumed_from: int) -> dict[str, Any]:
        if pairs["pairs_built"] == 0:
            raise _no_pairs(rdir, pairs)
        from ..train.dpo import DPOConfig, preference_accuracy, train_dpo

        cfg = _load(DPOConfig, {**train, "model": policy_path, "dataset": pairs["dataset"], "output_dir": str(ckpt),
                                "resume": True}, f"{rdir.name} train")
        log(f"{rdir.name}: DPO on {pairs['pairs_built']} pairs from {policy_path}"
            + (f" (resuming at step {resumed_from})" if resumed_from else ""))
        out = train_dpo(cfg)
        acc = preference_accuracy(out["model"], out["tokenizer"], out["examples"], cfg)
        last = _history_summary(out)[1]
        return {"method": "dpo", **_pairwise_summary(out, acc, resumed_from, ckpt / "metrics.jsonl"),
                "final_rewards_chosen": last.get("rewards_chosen"),
                "final_rewards_rejected": last.get("rewards_rejected")}

    return resumable_step(rdir, "train", fp, ckpt, keep_checkpoints, log, run)


def train_reward_model(cfg: LoopConfig, rm_init: tuple[str, str], pair_sets: list[dict[str, Any]], rdir: Path,
                       fp: str, log) -> dict[str, Any]:
    """A Bradley-Terry reward model on ``pair_sets`` (this round's pairs, or
    those of rounds 0..k) into ``rdir/reward_model``, starting from
    ``rm_init`` = (path, revision) with a fresh score head; ``fp`` is its
    fingerprint (settings, pair sets, initial weights)."""
    out_dir = rdir / "reward_model"

    def run(resumed_from: int) -> dict[str, Any]:
        from ..train.collate import load_rows
        from ..train.rm import RMConfig, pair_accuracy, train_rm

        n = sum(p["pairs_built"] for p in pair_sets)
        if n == 0:
            raise _no_pairs(rdir, pair_sets[-1])
        rows = [r for p in pair_sets if p["pairs_built"] for r in load_rows(p["dataset"])]
        rm = _load(RMConfig, {**cfg.rm, "model": rm_init[0], "dataset": pair_sets[-1]["dataset"],
                              "output_dir": str(out_dir), "resume": True}, f"{rdir.name} rm")
        log(f"{rdir.name}: reward model on {n} pairs from {len(pair_sets)} round(s), initialized from {rm.model}"
            + (f" (resuming at step {resumed_from})" if resumed_from else ""))
        out = train_rm(rm, rows)
        acc = pair_accuracy(out["model"], out["tokenizer"], out["examples"])
        return {"init": {"path": rm_init[0], "revision": rm_init[1]}, "pairs": n,
                "pair_datasets": [p["dataset"] for p in pair_sets],
                **_pairwise_summary(out, acc, resumed_from, out_dir / "metrics.jsonl")}

    return resumable_step(rdir, "rm", fp, out_dir, cfg.keep_checkpoints, log, run)


def ppo_prompts_file(cfg: LoopConfig, path: Path) -> Path:
    """The training prompts as chat turns (``prompt`` = messages), the same
    turns the policy answered when it sampled the pairs."""
    from .pairs import write_prompts

    return write_prompts(path, [cfg.policy_messages(p) for p in cfg.prompts])


def rollout_settings(cfg: LoopConfig) -> dict[str, Any]:
    """PPO rollouts run on the loop's backend with its engine options unless
    the ``ppo:`` mapping picks its own (``rollout_backend``/``rollout_options``)."""
    if "rollout_backend" in cfg.ppo:
        return {}
    backend = "transformers" if cfg.backend == "transformers" else "vllm"
    opts = {k: v for k, v in cfg.backend_options.items() if k != "seed"}
    return {"rollout_backend": backend, **({} if "rollout_options" in cfg.ppo else {"rollout_options": opts})}


def train_ppo_round(cfg: LoopConfig, policy_path: str, policy_revision: str, rm_fp: str,
                    prompts_file: Path, rdir: Path, log) -> dict[str, Any]:
    """PPO from the round's policy against ``rdir/reward_model`` into ``rdir/checkpoint``."""
    ckpt = rdir / "checkpoint"
    settings = {**cfg.ppo, **rollout_settings(cfg)}
    fp = stable_hash({"ppo": settings, "rm": rm_fp, "policy": policy_revision,
                      "prompts": stable_hash(prompts_file.read_text(encoding="utf-8"))})

    def run(resumed_from: int) -> dict[str, Any]:
        from ..train.ppo import PPOConfig, train_ppo

        ppo = _load(PPOConfig, {**settings, "model": policy_path, "dataset": str(prompts_file),
                                "output_dir": str(ckpt), "reward_model": str(rdir / "reward_model"),
                                "resume": True}, f"{rdir.name} ppo")
        log(f"{rdir.name}: PPO from {policy_path} on {len(cfg.prompts)} prompts against the round's reward model "
            f"(rollouts on {ppo.rollout_backend})" + (f" (resuming at step {resumed_from})" if resumed_from else ""))
        out = train_ppo(ppo)
        first, last = _history_summary(out)
        return {
            "steps": out["steps"],
            "resumed_from_step": resumed_from,
            "rollout_backend": ppo.rollout_backend,
            "first_score_mean": first.get("score_mean"),
            "final_score_mean": last.get("score_mean"),
            "final_reward_mean": last.get("reward_mean"),
            "final_kl": last.get("kl"),
            "final_clipfrac": last.get("clipfrac"),
            "final_eos_fraction": last.get("eos_fraction"),
            "final_response_length": last.get("response_length"),
            "seconds": round(out["seconds"], 3),
            "log": str(ckpt / "metrics.jsonl"),
        }

    return resumable_step(rdir, "ppo", fp, ckpt, cfg.keep_checkpoints, log, run)


def train_rm_ppo(cfg: LoopConfig, rm_init: tuple[str, str], policy_path: str, policy_revision: str,
                 pair_sets: list[dict[str, Any]], prompts_file: Path, rdir: Path, log) -> dict[str, Any]:
    """Reward model, then PPO against it; the round's training metrics."""
    rm_fp = stable_hash({"rm": cfg.rm, "pairs": [p["fingerprint"] for p in pair_sets], "init": rm_init[1]})
    rm = train_reward_model(cfg, rm_init, pair_sets, rdir, rm_fp, log)
    ppo = train_ppo_round(cfg, policy_path, policy_revision, rm_fp, prompts_file, rdir, log)
    return {"method": "rm_ppo", "rm": rm, "ppo": ppo}


def _drop_resume_states(ckpt: Path) -> None:
    """Remove the ``checkpoint-N`` folders (weights + optimizer state kept
    only to resume an interrupted training) once training has finished."""
    for p in Path(ckpt).glob("checkpoint-*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
