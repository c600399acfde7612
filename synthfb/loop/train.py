"""Step 2 of a round: train the round's policy on the round's pairs.

A round runs the steps of the loop's ``method``, an entry of the method
registry (:mod:`synthfb.train.methods`, the same one ``synthfb train`` uses):

- ``dpo`` (default): DPO of the round's policy on its pairs (reference = the
  round's policy) into ``round-NN/checkpoint``;
- ``rm_ppo``: a reward model (Bradley-Terry) trained on the round's pairs (or
  on the pairs of rounds 0..k with ``rm_pairs: all_rounds``) into
  ``round-NN/reward_model``, then PPO from the round's policy on the training
  prompts against that reward model (KL to the round's policy) into
  ``round-NN/checkpoint``.

Nothing here names a method: a step's inputs follow from what its trainer
reads (``data``: pairs or prompts) and produces (a policy starts from the
round's policy and is the round's checkpoint; a reward model starts from its
section's ``model`` or the round-0 policy and feeds the next step's
``reward_from`` field).

Each training is a resumable step with a marker file in the round folder
named after its loop-file section (``train.json`` for DPO, ``rm.json`` and
``ppo.json``) holding its fingerprint (settings, inputs' fingerprints,
starting weights' revision) and whether it finished. A finished step with the
same fingerprint is never redone; an unfinished one resumes from its newest
``checkpoint-N`` (``synthfb.train.loop``); a changed one starts over.
"""

from __future__ import annotations

import gc
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.io import atomic_write_json
from .config import DEFAULT_METHOD, WARMUP_PHASE, LoopConfig, LoopError, stable_hash
from .state import read_json


def _history_summary(out: dict) -> tuple[dict, dict]:
    hist = out.get("history") or []
    return (hist[0] if hist else {}), (out.get("last") or (hist[-1] if hist else {}))


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


@dataclass
class TrainingSetup:
    """What every round's training shares, prepared once per loop: the
    training prompts as chat turns (for steps that sample from prompts) and
    the initial weights (path, revision) of steps that train a model other
    than the policy, by loop-file section."""

    prompts_file: Path | None = None
    inits: dict[str, tuple[str, str]] = field(default_factory=dict)
    base: tuple[str, str] | None = None  # the loop's `policy` (path, revision): where `policy_start: initial` starts

    def round_parts(self, cfg: LoopConfig, earlier_pairs: list[dict[str, Any]]) -> dict[str, Any]:
        """What a round's fingerprint adds for training besides the loop's settings."""
        parts: dict[str, Any] = {f"{section}_init": rev for section, (_, rev) in self.inits.items()}
        if uses_earlier_pairs(cfg):
            parts["earlier_pairs"] = [p["fingerprint"] for p in earlier_pairs]
        if cfg.history:
            parts["history"] = [p["fingerprint"] for p in history_sets(cfg, earlier_pairs)]
        return parts


def history_sets(cfg: LoopConfig, earlier: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The earlier rounds' data the policy step also trains on: the last
    ``cfg.history`` rounds (the loop file's ``history``, else the method's;
    SPIN: the previous iteration's pairs), all with -1."""
    h = cfg.history
    return [] if not h else (list(earlier) if h < 0 else list(earlier[-h:]))


# what a step reads from the round: the pairs pipeline's rows (or the method's round data built from them)
ROUND_DATA_KINDS = ("pairs", "sft")


def uses_earlier_pairs(cfg: LoopConfig) -> bool:
    """Whether a step of the method trains on the pairs of rounds 0..k (``rm_pairs: all_rounds``)."""
    return cfg.rm_pairs == "all_rounds" and any(s.produces == "reward_model" for s in cfg.steps)


def prepare_training(cfg: LoopConfig, out: Path, initial_policy: str,
                     base: tuple[str, str] | None = None) -> TrainingSetup:
    """Write the chat-turn prompts file if a step samples from prompts, and
    resolve the initial weights of non-policy steps (their section's
    ``model``, default the round-0 policy ``initial_policy``); ``base`` is
    the loop's ``policy`` (path, revision), where a method with
    ``policy_start: initial`` starts every round's policy step."""
    from ..llm.models import model_revision, resolve_model

    setup = TrainingSetup(base=base)
    for step in cfg.steps:
        if step.data == "prompts" and setup.prompts_file is None:
            setup.prompts_file = ppo_prompts_file(cfg, out / "data" / "ppo_prompts.jsonl")
        if step.produces != "policy":
            settings = cfg.sections[step.section]
            path = resolve_model(settings["model"]) if settings.get("model") else initial_policy
            setup.inits[step.section] = (path, model_revision(path))
    return setup


def _summary(step, out: dict[str, Any], cfg: Any, resumed_from: int) -> dict[str, Any]:
    """A training's metrics: steps, the registry's first/last logged values,
    its evaluation on the training data, recorded config fields."""
    first, last = _history_summary(out)
    m: dict[str, Any] = {"steps": out["steps"], "resumed_from_step": resumed_from}
    for name, which, key in step.metrics:
        m[name] = (first if which == "first" else last).get(key)
    if step.evaluate is not None:
        m[step.evaluate_key] = step.evaluate(out, cfg)
    for f in step.record:
        m[f] = getattr(cfg, f)
    m["seconds"] = round(out["seconds"], 3)
    m["log"] = str(Path(cfg.output_dir) / "metrics.jsonl")
    return m


def _train_step(cfg: LoopConfig, step, setup: TrainingSetup, policy: tuple[str, str], pair_sets: list[dict],
                reward: tuple[str, str] | None, rdir: Path, log) -> tuple[dict[str, Any], str, Path]:
    """One registry trainer of the round: (metrics, fingerprint, output folder)."""
    own = step.produces == "policy"
    out_dir = rdir / ("checkpoint" if own else step.produces)
    settings = {**cfg.sections[step.section], **rollout_settings(cfg, step)}
    from_base = own and cfg.training.policy_start == "initial"  # Humpback: every M_t from the base model
    if from_base and setup.base is None:
        raise LoopError(f"{rdir.name}: method {cfg.method!r} trains each round from the loop's `policy`, which the "
                        f"loop did not hand to the training setup")
    start = (setup.base if from_base else policy) if own else setup.inits[step.section]
    values: dict[str, Any] = {**settings, "model": start[0], "output_dir": str(out_dir), "resume": True}
    parts: dict[str, Any] = {step.section: settings, "start": start[1]}
    if step.data in ROUND_DATA_KINDS:
        values["dataset"] = pair_sets[-1]["dataset"]
        parts["pairs"] = [p["fingerprint"] for p in pair_sets]
    elif step.data == "prompts":
        assert setup.prompts_file is not None
        values["dataset"] = str(setup.prompts_file)
        parts["prompts"] = stable_hash(setup.prompts_file.read_text(encoding="utf-8"))
    if step.reward_from:
        if reward is None:
            raise LoopError(f"{rdir.name}: {step.name} needs a reward model from an earlier step of method "
                            f"{cfg.method!r}")
        values[step.reward_from] = reward[0]
        parts["reward"] = reward[1]
    fp = stable_hash(parts)

    def run(resumed_from: int) -> dict[str, Any]:
        rows = None
        n = sum(p["pairs_built"] for p in pair_sets)
        if step.data in ROUND_DATA_KINDS:
            if n == 0:
                raise _no_pairs(rdir, pair_sets[-1])
            if len(pair_sets) > 1:
                from ..train.collate import load_rows

                rows = [r for p in pair_sets if p["pairs_built"] for r in load_rows(p["dataset"])]
        tcfg = _load(step.config, values, f"{rdir.name} {step.section}")
        what = (f"on {n} {'pairs' if step.data == 'pairs' else 'rows'} from {len(pair_sets)} round(s)"
                if step.data in ROUND_DATA_KINDS
                else f"on {len(cfg.prompts)} prompts")
        extra = "".join(f", {f} {getattr(tcfg, f)}" for f in step.record)
        log(f"{rdir.name}: {step.title} {what} from {start[0]}"
            + (f" against {reward[0]}" if step.reward_from and reward else "") + extra
            + (f" (resuming at step {resumed_from})" if resumed_from else ""))
        out = step.train(tcfg, rows)
        metrics = _summary(step, out, tcfg, resumed_from)
        if not own or from_base:
            metrics["init"] = {"path": start[0], "revision": start[1]}
        if step.data in ROUND_DATA_KINDS:
            metrics.update(pairs=n, pair_datasets=[p["dataset"] for p in pair_sets])
        return metrics

    metrics = resumable_step(rdir, step.section, fp, out_dir, cfg.keep_checkpoints, log, run)
    return metrics, fp, out_dir


def train_round(cfg: LoopConfig, setup: TrainingSetup, policy_path: str, policy_revision: str,
                pairs: dict[str, Any], earlier_pairs: list[dict[str, Any]], rdir: Path, log) -> dict[str, Any]:
    """Run the steps of the loop's method on the round's pairs; the last
    writes the new policy to ``rdir/checkpoint``. Returns the round's
    training metrics: ``{"method": NAME, **metrics}`` for a one-step method,
    ``{"method": NAME, SECTION: metrics, ...}`` for a composite one."""
    steps = cfg.steps
    results: dict[str, Any] = {}
    reward: tuple[str, str] | None = None
    for step in steps:
        if step.produces == "policy":
            sets = history_sets(cfg, earlier_pairs) + [pairs]
        else:
            sets = (earlier_pairs if uses_earlier_pairs(cfg) else []) + [pairs]
        metrics, fp, out_dir = _train_step(cfg, step, setup, (policy_path, policy_revision), sets, reward, rdir,
                                           log)
        results[step.section] = metrics
        if step.produces == "reward_model":
            reward = (str(out_dir), fp)
    if len(steps) == 1:
        return {"method": cfg.method, **results[steps[0].section]}
    return {"method": cfg.method, **results}


def headline(trained: dict[str, Any]) -> dict[str, Any]:
    """The registry's headline figures of a round's training metrics:
    ``{"final_loss": ...}`` for one step, ``{"rm_pair_accuracy": ..., "ppo_final_kl": ...}``
    (section-prefixed) for a composite method."""
    from ..train.methods import get

    method = get(trained.get("method") or DEFAULT_METHOD)
    steps = method.step_methods()
    if len(steps) == 1:
        return {short: trained.get(key) for short, key in steps[0].headline}
    return {f"{s.section}_{short}": (trained.get(s.section) or {}).get(key) for s in steps for short, key in s.headline}


def ppo_prompts_file(cfg: LoopConfig, path: Path) -> Path:
    """The training prompts as chat turns (``prompt`` = messages), the same
    turns the policy answered when it sampled the pairs."""
    from .pairs import write_prompts

    return write_prompts(path, [cfg.policy_messages(p) for p in cfg.prompts])


def rollout_settings(cfg: LoopConfig, step=None) -> dict[str, Any]:
    """A step that samples rollouts (its config has ``rollout_backend``) runs
    them on the loop's backend with its engine options unless its section
    picks its own (``rollout_backend``/``rollout_options``)."""
    import dataclasses

    if step is None:
        step = next((s for s in cfg.steps if s.data == "prompts"), None)
        if step is None:
            return {}
    names = {f.name for f in dataclasses.fields(step.config)}
    settings = cfg.sections.get(step.section, {})
    if "rollout_backend" not in names or "rollout_backend" in settings:
        return {}
    backend = "transformers" if cfg.backend == "transformers" else "vllm"
    opts = {k: v for k, v in cfg.backend_options.items() if k != "seed"}
    return {"rollout_backend": backend, **({} if "rollout_options" in settings else {"rollout_options": opts})}


def _drop_resume_states(ckpt: Path) -> None:
    """Remove the ``checkpoint-N`` folders (weights + optimizer state kept
    only to resume an interrupted training) once training has finished."""
    for p in Path(ckpt).glob("checkpoint-*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def train_warmup(cfg: LoopConfig, start: tuple[str, str], data: dict[str, Any], sdir: Path, log,
                 warmup=None, phase: str = WARMUP_PHASE) -> dict[str, Any]:
    """The warm-up trainer of ``sft:`` (a registry method with ``warmup``;
    or of ``backward:`` with ``warmup``/``phase``) on the rows of the
    phase's data pipeline (``data``: its dataset folder, fingerprint and row
    count), from the loop's initial policy ``start`` (path, revision) into
    ``sdir/checkpoint``: a resumable step with its marker
    ``sdir/train.json``, like a round's training."""
    w = warmup or cfg.warmup(phase)
    step = w.trainer
    out_dir = sdir / "checkpoint"
    settings = dict(w.settings)
    values: dict[str, Any] = {**settings, "model": start[0], "dataset": data["dataset"], "output_dir": str(out_dir),
                              "resume": True}
    fp = stable_hash({"method": step.name, "settings": settings, "start": start[1], "data": data["fingerprint"]})

    def run(resumed_from: int) -> dict[str, Any]:
        if not data["rows"]:
            raise LoopError(f"{phase}: the data pipeline wrote no rows to train on (stage counts: "
                            f"{data['counts']}); see {Path(data['dataset']).parent / 'run.json'}")
        tcfg = _load(step.config, values, f"{cfg.source}: {phase}.train")
        log(f"{phase}: {step.title} on {data['rows']} rows from {start[0]}"
            + (f" (resuming at step {resumed_from})" if resumed_from else ""))
        out = step.train(tcfg, None)
        metrics = _summary(step, out, tcfg, resumed_from)
        metrics.update(method=step.name, rows=data["rows"], dataset=data["dataset"])
        return metrics

    return resumable_step(sdir, "train", fp, out_dir, cfg.keep_checkpoints, log, run)
