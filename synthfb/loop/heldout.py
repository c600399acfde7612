"""Step 3 of a round: held-out win rate of the new policy vs the round-0 policy.

The round-0 policy answers the fixed held-out prompts once
(``heldout-base.json``); each round's new policy answers the same prompts
with the same decoding, and a fixed pairwise judge compares the two answers
in BOTH orders (new as (A), then base as (A)) through
:class:`synthfb.rank.llm_judge.LLMPairwiseJudge`. Per prompt,
``p_new = (P(A | new first) + 1 - P(A | base first)) / 2`` (position bias
averaged out) and the gap ``P(A | new first) - (1 - P(A | base first))``
measures the judge's position bias. Win rate = (wins + ties / 2) / prompts,
a win being ``p_new > 0.5`` (identical answers are ties).

The held-out judge is frozen across rounds (a fixed model, never a
checkpoint the loop trains, with a fixed template; its revision is part of
every round's fingerprint) and is not the training ranker read back: the
loop file is refused when both are the same model with the same template
(:mod:`synthfb.loop.config`). The default template ``heldout_judge.jinja`` is
not the rankers' default ``pairwise_judge.jinja``.

Uncertainty: a percentile bootstrap over the judged held-out prompts (each
prompt scores 1 for a win, 1/2 for a tie, 0 for a loss; ``resamples`` draws
of as many prompts with replacement from a fixed-seed ``numpy`` generator;
the 2.5th and 97.5th percentiles of the resampled win rates) gives
``win_rate_ci95``. It covers the sampling of prompts only, not the judge's
own error.

With an SFT warm-up the same comparison also measures the SFT checkpoint and
the last round's policy against the loop's initial ``policy``
(:func:`compare`, on answers already generated).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..data.io import atomic_write_json
from ..llm.types import GenerationRequest, Generator, SamplingParams
from ..rank import load_ranker
from ..rank.llm_judge import merge_orders, soft_label
from ..llm.prompts import PromptTemplate
from .config import CI_LEVEL, LoopConfig, stable_hash
from .state import read_json

_TIE = 1e-9
ORDERS = "both: the new answer as (A), then the baseline answer as (A); P(new better) averaged over the two"


def answer(cfg: LoopConfig, gen: Generator, path: Path, log) -> dict[str, Any]:
    """``gen``'s answers to the held-out prompts, stored in ``path`` (reused
    when the prompts, decoding and model revision are unchanged)."""
    fp = stable_hash({"prompts": cfg.eval.prompts, "sampling": cfg.eval.sampling, "model": gen.info.revision})
    rec = read_json(path)
    if rec and rec.get("fingerprint") == fp:
        return rec
    log(f"held-out answers of {gen.info.name} ({len(cfg.eval.prompts)} prompts)")
    params = SamplingParams.from_dict(cfg.eval.sampling)
    res = gen.generate([GenerationRequest(messages=[{"role": "user", "content": p}], params=params)
                        for p in cfg.eval.prompts], desc="held-out answers")
    rec = {
        "fingerprint": fp,
        "model": gen.info.to_dict(),
        "sampling": params.to_dict(),
        "responses": [None if r.error else r.completions[0].text for r in res],
        "finish_reasons": [None if r.error else r.completions[0].finish_reason for r in res],
        "errors": [r.error for r in res],
    }
    atomic_write_json(path, rec)
    return rec


def bootstrap_ci(scores: list[float], resamples: int, seed: int, level: float = CI_LEVEL) -> list[float] | None:
    """Percentile bootstrap interval of the mean of ``scores`` (per-prompt
    1 / 0.5 / 0): ``resamples`` means of ``len(scores)`` draws with
    replacement from ``numpy.random.default_rng(seed)``, cut at
    ``(1 - level) / 2`` and ``(1 + level) / 2``. None without scores."""
    import numpy as np

    if not scores:
        return None
    x = np.asarray(scores, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return [round(float(lo), 6), round(float(hi), 6)]


def judge_record(cfg: LoopConfig, judge: Generator) -> dict[str, Any]:
    """What judged a held-out comparison: model (name, path, revision), the
    template (name and sha256), options, chat or raw, orders."""
    tpl = PromptTemplate.load(cfg.eval.judge_prompt, cfg.base_dir)
    return judge.info.to_dict() | {"template": cfg.eval.judge_prompt, "template_sha256": tpl.sha256,
                                   "options": list(cfg.eval.options), "chat": cfg.eval.judge_chat,
                                   "orders": ORDERS, "frozen": True}


def win_rate(cfg: LoopConfig, new: dict[str, Any], base: dict[str, Any], judge: Generator) -> dict[str, Any]:
    """Judge every (new, base) answer pair in both orders; see the module doc."""
    tpl = PromptTemplate.load(cfg.eval.judge_prompt, cfg.base_dir)
    ranker = load_ranker("llm_judge", generator=judge, template=tpl, options=cfg.eval.options, chat=cfg.eval.judge_chat)
    idx = [i for i, (a, b) in enumerate(zip(new["responses"], base["responses"])) if a is not None and b is not None]
    mats = ranker.compare([cfg.eval.prompts[i] for i in idx],
                          [[new["responses"][i], base["responses"][i]] for i in idx]) if idx else []
    per_prompt = []
    wins = ties = 0
    scores = []
    for i, m in zip(idx, mats):
        p_new_first = soft_label(m[0][1], 0.0)  # P(A) with the new answer as (A): sigmoid(lp_A - lp_B)
        p_base_first = soft_label(m[1][0], 0.0)  # P(A) with the base answer as (A)
        p_new, gap = merge_orders(p_new_first, p_base_first)
        tie = new["responses"][i] == base["responses"][i] or abs(p_new - 0.5) <= _TIE
        won = (not tie) and p_new > 0.5
        ties += tie
        wins += won
        scores.append(0.5 if tie else float(won))
        per_prompt.append({"index": i, "p_new": p_new, "position_gap": gap, "logit_new_first": float(m[0][1]),
                           "logit_base_first": float(m[1][0]), "identical": new["responses"][i] == base["responses"][i]})
    n = len(per_prompt)
    ev = cfg.eval
    return {
        "prompts": len(cfg.eval.prompts),
        "judged": n,
        "wins": int(wins),
        "ties": int(ties),
        "losses": int(n - wins - ties),
        "win_rate": (wins + 0.5 * ties) / n if n else None,
        "win_rate_ci95": bootstrap_ci(scores, ev.bootstrap_resamples, ev.bootstrap_seed),
        "ci": {"method": "percentile bootstrap over held-out prompts (win 1, tie 0.5, loss 0)", "level": CI_LEVEL,
               "resamples": ev.bootstrap_resamples, "seed": ev.bootstrap_seed},
        "mean_p_new": sum(r["p_new"] for r in per_prompt) / n if n else None,
        "position_bias_gap": sum(r["position_gap"] for r in per_prompt) / n if n else None,
        "new": {"path": new["model"].get("path"), "revision": new["model"].get("revision")},
        "baseline": {"path": base["model"].get("path"), "revision": base["model"].get("revision")},
        "judge": judge_record(cfg, judge),
        "per_prompt": per_prompt,
    }


def compare(cfg: LoopConfig, new: dict[str, Any], base: dict[str, Any], judge: Generator, path: Path,
            log, what: str) -> dict[str, Any]:
    """Held-out comparison of two sets of answers (records of :func:`answer`),
    stored in ``path`` and reused when nothing it depends on changed."""
    fp = stable_hash({"eval": dataclasses.asdict(cfg.eval), "new": new["fingerprint"], "base": base["fingerprint"],
                      "judge": judge.info.revision})
    rec = read_json(path)
    if rec and rec.get("fingerprint") == fp:
        return rec["metrics"]
    log(f"judging held-out answers: {what} (both orders)")
    metrics = win_rate(cfg, new, base, judge)
    atomic_write_json(path, {"fingerprint": fp, "metrics": metrics})
    return metrics


def evaluate(cfg: LoopConfig, new_gen: Generator, base: dict[str, Any], judge: Generator, rdir: Path,
             log) -> dict[str, Any]:
    """Held-out comparison of the round's new policy (``new_gen``) with the
    round-0 answers ``base``; stored in ``rdir/eval.json`` and reused when
    nothing it depends on changed."""
    path = rdir / "eval.json"
    fp = stable_hash({"eval": dataclasses.asdict(cfg.eval), "new": new_gen.info.revision, "base": base["fingerprint"],
                      "judge": judge.info.revision})
    rec = read_json(path)
    if rec and rec.get("fingerprint") == fp:
        return rec["metrics"]
    new = answer(cfg, new_gen, rdir / "heldout-answers.json", log)
    log(f"{rdir.name}: judging held-out answers of the new policy vs the round-0 policy (both orders)")
    metrics = win_rate(cfg, new, base, judge)
    atomic_write_json(path, {"fingerprint": fp, "metrics": metrics})
    return metrics


def summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """The headline of a held-out comparison (no per-prompt records)."""
    return {k: v for k, v in metrics.items() if k != "per_prompt"}
