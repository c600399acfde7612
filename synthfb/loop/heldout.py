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
from .config import LoopConfig, stable_hash
from .state import read_json

_TIE = 1e-9


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


def win_rate(cfg: LoopConfig, new: dict[str, Any], base: dict[str, Any], judge: Generator) -> dict[str, Any]:
    """Judge every (new, base) answer pair in both orders; see the module doc."""
    tpl = PromptTemplate.load(cfg.eval.judge_prompt, cfg.base_dir)
    ranker = load_ranker("llm_judge", generator=judge, template=tpl, options=cfg.eval.options, chat=cfg.eval.judge_chat)
    idx = [i for i, (a, b) in enumerate(zip(new["responses"], base["responses"])) if a is not None and b is not None]
    mats = ranker.compare([cfg.eval.prompts[i] for i in idx],
                          [[new["responses"][i], base["responses"][i]] for i in idx]) if idx else []
    per_prompt = []
    wins = ties = 0
    for i, m in zip(idx, mats):
        p_new_first = soft_label(m[0][1], 0.0)  # P(A) with the new answer as (A): sigmoid(lp_A - lp_B)
        p_base_first = soft_label(m[1][0], 0.0)  # P(A) with the base answer as (A)
        p_new, gap = merge_orders(p_new_first, p_base_first)
        tie = new["responses"][i] == base["responses"][i] or abs(p_new - 0.5) <= _TIE
        ties += tie
        wins += (not tie) and p_new > 0.5
        per_prompt.append({"index": i, "p_new": p_new, "position_gap": gap, "logit_new_first": float(m[0][1]),
                           "logit_base_first": float(m[1][0]), "identical": new["responses"][i] == base["responses"][i]})
    n = len(per_prompt)
    return {
        "prompts": len(cfg.eval.prompts),
        "judged": n,
        "wins": int(wins),
        "ties": int(ties),
        "losses": int(n - wins - ties),
        "win_rate": (wins + 0.5 * ties) / n if n else None,
        "mean_p_new": sum(r["p_new"] for r in per_prompt) / n if n else None,
        "position_bias_gap": sum(r["position_gap"] for r in per_prompt) / n if n else None,
        "judge": judge.info.to_dict() | {"template_sha256": tpl.sha256, "options": list(cfg.eval.options)},
        "per_prompt": per_prompt,
    }


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
