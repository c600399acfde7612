"""The RLAIF loop: rounds of generate -> judge -> pairs -> DPO (or RM + PPO) -> new policy.

With an ``sft:`` section a warm-up runs first (``synthfb/loop/warmup.py``): a
data pipeline (e.g. seeds -> Self-Instruct) once, then SFT of the loop's
``policy`` on its rows; that checkpoint is ``P_0``. Round ``k`` starts from
policy ``P_k`` (``P_0`` = the loop's ``policy`` or the SFT checkpoint,
``P_k`` = the checkpoint round ``k-1`` trained) and

1. samples on-policy responses to the training prompts with ``P_k`` and has
   the judge rank them into preference pairs (``synthfb/loop/pairs.py``: the
   pipeline runner, chunked and resumable; a first prompt-writing stage may
   have a fixed model write the round's prompts from the seed prompts, with
   seed ``seed + k``); a method with ``round_data``
   (``spin``, ``rft``) turns those rows into its training rows
   (``synthfb/loop/round_data.py``, into ``round-NN/round_data``);
2. trains ``P_k`` into ``round-k/checkpoint`` (``synthfb/loop/train.py``,
   each training resumable from its last checkpoint) with the loop's
   ``method`` from the method registry shared with ``synthfb train``: DPO on
   those pairs (reference = ``P_k``), or (``method: rm_ppo``) a reward model
   trained on them, then PPO against it (KL to ``P_k``);
3. starts an engine on the new checkpoint, answers the fixed held-out prompts
   and has a fixed judge compare them with ``P_0``'s answers in both orders
   (``synthfb/loop/heldout.py``); that engine then generates round ``k+1``.

Method ``humpback`` (instruction backtranslation, Li et al. 2023) shapes the
same loop differently (method-registry fields ``fixed_candidates``,
``policy_start: initial``, ``self_judge``): the ``sft:`` warm-up trains the
seed model M_0 (the round-0 policy) and a ``backward:`` phase of the same
shape the backward model M_yx; before round 0 the pairs stages but the last
run once with M_yx (``synthfb/loop/candidates.py``: the candidate set); round
``k`` (the paper's iteration ``k+1``) has its policy M_k rate every candidate
(the last stage, ``self_curate``), mixes the kept A_5 rows with the seed rows
(round data ``humpback_union``) and trains M_(k+1) by SFT from the loop's
``policy`` (the base model), not from M_k.

The held-out judge is frozen: one model and template for every comparison,
set once per loop. With a warm-up, the SFT checkpoint and the final policy
are also compared with the initial ``policy``. After every round the loop
card ``OUT/README.md`` is rewritten (``synthfb/loop/card.py``).

A round whose record in ``loop.json`` is finished with the same fingerprint
(settings + starting policy and judge revisions) is reused untouched; an
unfinished one resumes step by step. See ``synthfb/loop/state.py`` for the
folder layout.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.io import atomic_write_json
from ..engine.progress import Console, TerminalLogHandler
from ..engine.runner import package_versions, scrub
from ..llm.types import Generator
from . import heldout
from .config import BACKWARD_PHASE, LoopConfig, load_loop, stable_hash
from .engines import EnginePool
from .pairs import drop_repeated_prompts, pairs_metrics, record_prompts, run_pairs, write_prompts
from .round_data import build_round_data
from .candidates import backward_model, candidates_file, run_candidates
from .card import loop_summary, write_card
from .state import LoopFolder, now, read_json, round_dir
from .train import TrainingSetup, headline, prepare_training, train_round
from .warmup import run_warmup, sft_dir


@dataclass
class LoopResult:
    """What a finished loop produced."""

    out: Path
    policy: str  # the last round's checkpoint
    rounds: list[dict[str, Any]]  # per-round metrics, as in loop.json
    state: dict[str, Any]


class _Loop:
    def __init__(self, cfg: LoopConfig, folder: LoopFolder, pool: EnginePool, progress: bool,
                 console: Console | None = None):
        self.cfg, self.folder, self.pool, self.progress = cfg, folder, pool, progress
        self.out = folder.out
        self.console = console

    def log(self, msg: str) -> None:
        if self.progress:
            print(f"synthfb loop: {msg}", file=self.console.out if self.console else sys.stderr, flush=True)

    def run(self) -> LoopResult:
        cfg, pool = self.cfg, self.pool
        initial = pool.get(cfg.policy)
        if not cfg.self_judging:
            pool.pin(cfg.judge_for(cfg.policy))
        pool.pin(cfg.eval_judge(), *cfg.fixed_stage_models())  # fixed models stay up across rounds
        eval_judge = pool.get(cfg.eval_judge())
        self.folder.start({
            "synthfb_loop": 1, "name": cfg.name, "description": cfg.description, "source": cfg.source,
            "config": scrub(cfg.raw), "rounds_planned": cfg.rounds, "initial_policy": scrub(initial.info.to_dict()),
            "judge": "the round's policy" if cfg.self_judging else cfg.judge_for(cfg.policy),
            "training_rankers": cfg.training_rankers(),
            "prompt_writers": [{**w, "model": scrub(pool.get(w["model"]).info.to_dict()) if w["model"]
                                else "the round's policy"} for w in cfg.prompt_writers()],
            "eval_judge": scrub(heldout.judge_record(cfg, eval_judge)), "versions": package_versions(),
        })
        prompts_file = write_prompts(self.out / "data" / "prompts.jsonl", cfg.prompts, cfg.prompt_extras)
        start = cfg.policy
        initial_answers = None
        self.seed_data: dict[str, Any] | None = None  # the warm-up's rows (humpback: each round's seed share)
        if cfg.sft is not None:
            # the initial policy's held-out answers first: its engine is up for the data pipeline anyway
            initial_answers = heldout.answer(cfg, initial, sft_dir(self.out) / "heldout-initial.json", self.log)
            rec = run_warmup(cfg, self.folder, pool, initial, self.progress, self.log)
            pool.release(cfg.policy)
            start = rec["checkpoint"]
            self.seed_data = rec["metrics"]["data"]
        if cfg.backward is not None:  # humpback: the backward model M_yx, SFT of `policy` on the reversed seed
            run_warmup(cfg, self.folder, pool, initial, self.progress, self.log, phase=BACKWARD_PHASE)
        self.candidates: dict[str, Any] | None = None
        if cfg.training.fixed_candidates:  # humpback: M_yx writes the candidates once; every round re-rates them
            self.candidates = run_candidates(cfg, self.folder, pool, backward_model(cfg, self.folder), prompts_file,
                                             self.progress, self.log)
            prompts_file = candidates_file(self.out)
        p0 = pool.get(start)
        base = heldout.answer(cfg, p0, self.out / "heldout-base.json", self.log)
        self.folder.update(heldout_base={"model": base["model"], "fingerprint": base["fingerprint"],
                                         "prompts": len(cfg.eval.prompts)})
        if initial_answers is not None:
            em = heldout.compare(cfg, base, initial_answers, eval_judge, sft_dir(self.out) / "eval.json", self.log,
                                 "the SFT checkpoint vs the initial policy")
            self.folder.update(sft={**self.folder.state["sft"], "eval": heldout.summary(em)})
            self.log(f"sft: held-out win rate vs the initial policy {_rate(em)}")
        self.training: TrainingSetup = prepare_training(cfg, self.out, p0.info.path,
                                                        (initial.info.path, initial.info.revision))
        cfg_fp = cfg.fingerprint()
        policy = start
        rounds: list[dict[str, Any]] = []
        for k in range(cfg.rounds):
            m = self.round(k, policy, prompts_file, base, cfg_fp, [r["pairs"] for r in rounds])
            rounds.append(m)
            policy = m["checkpoint"]
        final = None
        if initial_answers is not None:
            last = read_json(round_dir(self.out, cfg.rounds - 1) / "heldout-answers.json")
            if last is not None:
                final = heldout.summary(heldout.compare(cfg, last, initial_answers, eval_judge,
                                                        self.out / "final-eval.json", self.log,
                                                        "the final policy vs the initial policy"))
                self.log(f"final policy vs the initial policy: held-out win rate {_rate(final)}")
        pool.close()
        self.folder.update(status="finished", finished=now(), final_policy=policy,
                           summary=loop_summary(self.folder.state, rounds, final))
        write_card(self.out, self.folder.state)
        self.log(f"done: {cfg.rounds} round(s); final policy {policy}; card {self.out / 'README.md'}")
        return LoopResult(self.out, policy, rounds, self.folder.state)

    def round(self, k: int, policy_name: str, prompts_file: Path, base: dict, cfg_fp: str,
              earlier_pairs: list[dict[str, Any]]) -> dict[str, Any]:
        cfg, pool = self.cfg, self.pool
        rdir = round_dir(self.out, k)
        policy = pool.get(policy_name)
        judge_name = cfg.judge_for(policy_name)
        judge = pool.get(judge_name)
        eval_judge = pool.get(cfg.eval_judge())
        parts = {"config": cfg_fp, "policy": policy.info.revision, "judge": judge.info.revision,
                 "eval_judge": eval_judge.info.revision, "base": base["fingerprint"]}
        if cfg.fixed_stage_models():  # e.g. Self-Rewarding's fixed prompt writer
            parts["stage_models"] = [pool.get(n).info.revision for n in cfg.fixed_stage_models()]
        if self.candidates is not None:  # humpback: what M_yx wrote, and the seed rows mixed in
            parts["candidates"] = self.candidates["fingerprint"]
            parts["base_model"] = self.training.base[1] if self.training.base else None
            parts["seed_data"] = (self.seed_data or {}).get("fingerprint")
        fp = stable_hash({**parts, **self.training.round_parts(cfg, earlier_pairs)})
        rec = self.folder.round(k)
        ckpt = (rdir / "checkpoint").resolve()
        if (rec and rec.get("status") == "finished" and rec.get("fingerprint") == fp
                and (rdir / "metrics.json").exists() and (ckpt / "config.json").exists()):
            self.log(f"round {k}: finished before with the same settings and policy; reusing it")
            return rec["metrics"]
        self.log(f"round {k}: policy {policy_name}")
        self.folder.set_round(k, {"status": "running", "fingerprint": fp, "policy": policy.info.to_dict(),
                                  "started": now()})
        t0 = time.time()
        res = run_pairs(cfg, k, policy_name, prompts_file, rdir / "pairs",
                        {n: pool.get(n) for n in cfg.round_models(policy_name)}, self.progress)
        pm = pairs_metrics(res)
        written = record_prompts(cfg, k, res, rdir)  # a prompt writer's prompts -> round-NN/prompts.jsonl
        if written is not None:  # pairs of prompts that repeat a held-out or an earlier round's prompt: out
            pm = {**drop_repeated_prompts(pm, written, rdir), "written_prompts": written}
        pm = build_round_data(cfg, k, pm, rdir, self.seed_data)  # the method's round data (spin, rft, humpback)
        pool.release(policy_name)  # free its memory for training (a pinned judge stays)
        t1 = time.time()
        tm = train_round(cfg, self.training, policy.info.path, policy.info.revision, pm, earlier_pairs, rdir,
                         self.log)
        t2 = time.time()
        new = pool.get(str(ckpt))  # starts when needed; the old policy engine is closed first
        em = heldout.evaluate(cfg, new, base, eval_judge, rdir, self.log)
        metrics = {
            "round": k,
            "policy": policy.info.to_dict(),
            "judge": judge.info.to_dict(),
            "checkpoint": str(ckpt),
            "checkpoint_revision": new.info.revision,
            "pairs": pm,
            "train": tm,
            "eval": heldout.summary(em),
            "seconds": {"pairs": round(t1 - t0, 3), "train": round(t2 - t1, 3), "eval": round(time.time() - t2, 3)},
        }
        if self.candidates is not None:
            metrics["curation"] = curation_record(k, policy.info.to_dict(), self.candidates, pm, tm,
                                                  new.info.to_dict(), cfg.pairs_stages[-1].get("min_score", 4.5))
        atomic_write_json(rdir / "metrics.json", metrics)
        self.folder.set_round(k, {"status": "finished", "fingerprint": fp, "policy": policy.info.to_dict(),
                                  "checkpoint": str(ckpt), "metrics": metrics, "finished": now()})
        trained = f"{cfg.method}: " + ", ".join(f"{k} {v}" for k, v in headline(tm).items())
        cur = metrics.get("curation")
        built = (f"{cur['curator']} kept {cur['kept']} of {cur['candidates']} candidates, {pm['pairs_built']} "
                 f"training rows" if cur else f"{pm['pairs_built']} pairs")
        self.log(f"round {k}: {built}, {trained}, held-out win rate vs round 0 {_rate(em)}")
        write_card(self.out, self.folder.state)
        return metrics


def curation_record(k: int, curator: dict[str, Any], candidates: dict[str, Any], pm: dict[str, Any],
                    tm: dict[str, Any], trained: dict[str, Any], min_score: float) -> dict[str, Any]:
    """What a Humpback round did, in the paper's names: iteration ``k + 1``'s
    curator M_k rated the fixed candidates (written by M_yx), kept A_5^(k+1),
    and M_(k+1) was trained from the base model on seed + A_5^(k+1) (A_4 for
    ``min_score`` 4: the kept set is named after the rating it asks for)."""
    import math

    counts = (pm.get("round_data") or {}).get("counts") or {}
    return {"iteration": k + 1, "curator": f"M_{k}", "curator_model": curator,
            "candidates": pm.get("prompts"), "candidates_by": candidates.get("backward_model"),
            "kept": counts.get("curated_rows", pm.get("pipeline_rows")),
            "kept_name": f"A_{math.ceil(min_score)}^({k + 1})",
            "seed_rows": counts.get("seed_rows"), "trained": f"M_{k + 1}", "trained_model": trained,
            "trained_from": (tm.get("init") or {}), "training_rows": pm.get("pairs_built")}


def _rate(em: dict[str, Any]) -> str:
    """``0.625 [0.375, 0.875]``: a win rate and its 95% interval."""
    ci = em.get("win_rate_ci95")
    rate = em.get("win_rate")
    return f"{rate:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if rate is not None and ci else str(rate)


def run_loop(
    loop: LoopConfig | str | Path,
    out: str | Path | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    engines: dict[str, Generator] | None = None,
    progress: bool = True,
    overrides: dict[str, Any] | None = None,
    verbose: bool = False,
) -> LoopResult:
    """Run an RLAIF loop (a :class:`LoopConfig` or a loop YAML path) into
    ``out`` (default ``runs/NAME``).

    ``resume`` continues a stopped loop (finished rounds and steps are
    reused); ``overwrite`` starts afresh. ``engines`` hands in started
    generators keyed by model name (e.g. the round-0 policy in tests); they
    are used as given and never closed here. ``overrides`` replace top-level
    loop-file keys (``policy``, ``rounds``) before validation. While the loop
    runs, what the engine libraries print goes to ``OUT/logs/engine.log``
    (the loop's pipeline runs included); ``verbose`` shows
    it on the terminal too.
    """
    cfg = loop if isinstance(loop, LoopConfig) else load_loop(loop, overrides=overrides)
    out = Path(out) if out is not None else Path("runs") / cfg.name
    with LoopFolder(out, resume=resume, overwrite=overwrite) as folder:
        with Console(folder.out / "logs" / "engine.log", verbose=verbose) as console:
            # synthfb's own warnings (e.g. a served judge's retries) stay on the terminal
            shown = TerminalLogHandler.install(lambda line: print(line, file=console.out, flush=True))
            pool = EnginePool(cfg.backend, cfg.backend_options, cfg.models, cfg.seed, given=engines,
                              progress=progress, out=console.out)
            try:
                return _Loop(cfg, folder, pool, progress, console).run()
            finally:
                pool.close()  # engines shut down while their output still goes to the log
                if shown is not None:
                    shown.remove()
