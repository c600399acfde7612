"""RSO: statistical rejection sampling for preference pairs (Liu et al. 2024, arXiv:2309.06657).

The optimal policy of the KL-regularised reward objective is
``pi_r(y|x) ∝ pi_sft(y|x) exp(r(x, y) / beta)``. RSO samples preference
data from (an estimate of) ``pi_r`` instead of from ``pi_sft``
(specs/methods-2.md section 4):

1. sample ``n`` candidates per prompt from the policy (paper: 64, T = 0.7,
   top_k = 40), one engine call per chunk;
2. score each: the paper's pointwise reward is ``r(x, y) = logit rho(x, y,
   y_b)``, a pairwise ranking model's probability that y beats a baseline
   ``y_b``, one more random SFT decode (``scorer: pairwise_judge``: the LLM
   A/B judge of ``synthfb.rank.llm_judge`` in both orders, averaged, clipped
   to [1e-6, 1 - 1e-6]); or a reward model / the additive judge (shared with
   ``best_of_n``);
3. statistical rejection sampling (:func:`rso_sample`) keeps
   ``num_samples`` (paper: 8) with ``beta`` (paper: 0.5): ``mode: paper``
   is Algorithm 1 (the max reward among the remaining candidates is the
   envelope; each remaining candidate, in a freshly shuffled order, is
   accepted when ``u < exp((r - r_max) / beta)``; passes repeat until
   enough are accepted); ``mode: exact`` draws candidates uniformly and
   accepts them with the same probability, so each draw follows
   ``softmax(r / beta)`` over the remaining candidates exactly;
4. pairs of accepted samples (:func:`rso_pairs`), labelled by the reward:
   ``first_round`` splits them into n/2 disjoint random pairs (the paper's
   "first-round-rank", default), ``tournament`` plays a single-elimination
   tournament (n - 1 pairs, biased to high rewards).

Randomness comes from ``ctx.rng(row_id)``: the same seed and row give the
same accepted set and pairs, whatever the chunking. Rows: TRL preference
rows with ``score_chosen``/``score_rejected``/``score_margin`` in reward
units (``pairwise_judge``: log-odds against the baseline, so the margin
estimates the log-odds that chosen beats rejected; ``reward_model``: the
RM's Bradley-Terry logit difference; ``judge``: rubric points).

Deviations: the paper labels each pair with the pairwise model rho(x, y1,
y2) directly; we order pairs by the pointwise reward used for sampling. Our
sampling parameters have no top_k (the paper's 40). Training with RSO's
losses is the DPO trainer's: sigmoid-norm = DPO ``sigmoid`` with beta =
gamma (paper 0.05), hinge-norm = ``hinge`` (spec 4.2 on the name clash with
TRL's ``sigmoid_norm``).
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field
from typing import Any, Literal

from ..data import ROW_ID
from ..data.trl import trl_pair
from ..engine.stage import Ask, Drop, StageContext
from ..rank.llm_judge import OptionScorer, merge_orders, soft_label
from .best_of_n import ScoredSamplesConfig, ScoredSamplesStage

P_CLIP = 1e-6
"""rho is clipped to [P_CLIP, 1 - P_CLIP] before the logit (spec 4.2)."""


def rso_sample(rewards: list[float], num_samples: int, beta: float, rng: random.Random,
               mode: Literal["paper", "exact"] = "paper") -> list[int]:
    """Indices of the accepted candidates, in acceptance order.

    ``paper``: Algorithm 1 of Liu et al. 2024, keyed by index (not by the
    response text), with the order of the remaining candidates shuffled
    before each pass (spec 4.2). ``exact``: repeatedly draw a remaining
    candidate uniformly and accept it with probability exp((r - r_max) /
    beta), r_max over the remaining ones, i.e. sample ``softmax(r / beta)``
    without replacement. ``num_samples`` is capped at the number of
    candidates; NaN rewards (unscored) are never accepted."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    remaining = [i for i, r in enumerate(rewards) if not math.isnan(float(r))]
    want = min(num_samples, len(remaining))
    accepted: list[int] = []
    if mode == "exact":
        while len(accepted) < want:
            r_max = max(rewards[i] for i in remaining)
            i = remaining[rng.randrange(len(remaining))]
            if rng.random() < math.exp((rewards[i] - r_max) / beta):
                accepted.append(i)
                remaining.remove(i)
        return accepted
    if mode != "paper":
        raise ValueError(f"mode: expected paper or exact, got {mode!r}")
    while len(accepted) < want:
        rng.shuffle(remaining)
        r_max = max(rewards[i] for i in remaining)
        taken = []
        for i in remaining:
            if rng.random() >= math.exp((rewards[i] - r_max) / beta):
                continue
            taken.append(i)
            if len(accepted) + len(taken) == want:
                break
        accepted += taken
        remaining = [i for i in remaining if i not in set(taken)]
    return accepted


def rso_pairs(accepted: list[int], rewards: list[float], rng: random.Random,
              pairing: Literal["first_round", "tournament"] = "first_round") -> list[tuple[int, int]]:
    """(winner, loser) index pairs of the accepted candidates, the winner
    having the higher reward (equal rewards: the pair is still returned,
    in draw order; the stage drops ties). ``first_round``: the accepted set
    shuffled and split into consecutive disjoint pairs (an odd one out is
    left); ``tournament``: shuffled single-elimination rounds, winners
    advance, an odd one out gets a bye (n - 1 pairs)."""
    order = list(accepted)
    rng.shuffle(order)

    def play(a: int, b: int) -> tuple[int, int]:
        return (a, b) if rewards[a] >= rewards[b] else (b, a)

    if pairing == "first_round":
        return [play(order[k], order[k + 1]) for k in range(0, len(order) - 1, 2)]
    if pairing != "tournament":
        raise ValueError(f"pairing: expected first_round or tournament, got {pairing!r}")
    pairs = []
    while len(order) > 1:
        nxt = []
        for k in range(0, len(order) - 1, 2):
            w, lo = play(order[k], order[k + 1])
            pairs.append((w, lo))
            nxt.append(w)
        if len(order) % 2:
            nxt.append(order[-1])
        order = nxt
    return pairs


@dataclass
class RSOPairsConfig(ScoredSamplesConfig):
    n: int = field(default=64, metadata={"help": "candidates sampled per prompt from the policy (paper: 64)"})
    num_samples: int = field(default=8, metadata={"help": "candidates accepted by rejection sampling (paper: 8); "
                                                          "capped at the distinct candidates"})
    beta: float = field(default=0.5, metadata={
        "help": "sampling temperature beta of pi_r ∝ pi_sft exp(r/beta), in reward units (paper: 0.5); -> 0: top "
                "rewards (best-of-N), -> inf: uniform over the candidates"})
    mode: Literal["paper", "exact"] = field(default="paper", metadata={
        "help": "paper: Algorithm 1 (passes over shuffled candidates, envelope = max remaining reward); exact: "
                "uniform draws accepted with exp((r - r_max)/beta), exactly softmax(r/beta) per draw"})
    pairing: Literal["first_round", "tournament"] = field(default="first_round", metadata={
        "help": "first_round: num_samples/2 disjoint random pairs (paper default); tournament: single elimination, "
                "num_samples - 1 pairs"})
    min_margin: float = field(default=0.0, metadata={"help": "drop pairs whose reward gap is <= this (0: exact ties)"})
    scorer: Literal["pairwise_judge", "reward_model", "judge"] = field(default="pairwise_judge", metadata={
        "help": "pairwise_judge: r = logit P(candidate beats a baseline sample), the LLM A/B judge in both orders "
                "(the paper's pointwise reward); reward_model: a checkpoint at `reward_model_path`; judge: the "
                "additive 5-point LLM judge"})
    pairwise_prompt: str = field(default="pairwise_judge.jinja", metadata={
        "help": "scorer pairwise_judge: A/B template (prompt, response_a, response_b)"})
    pairwise_chat: bool = field(default=False, metadata={"help": "scorer pairwise_judge: send the A/B prompt as a chat turn"})
    pairwise_options: list[str] = field(default_factory=lambda: [" (A)", " (B)"], metadata={
        "help": "scorer pairwise_judge: the two option strings scored as continuations"})


class RSOPairsStage(ScoredSamplesStage):
    """Sample n, score, accept num_samples by statistical rejection sampling, pair by reward."""

    kind = "rso_pairs"
    Config = RSOPairsConfig
    scorers = ("pairwise_judge", "reward_model", "judge")
    sampling_defaults = {"temperature": 0.7, "top_p": 1.0, "max_tokens": 256}

    def __init__(self, config: RSOPairsConfig, base_dir):
        super().__init__(config, base_dir)
        if config.n < 2 or config.num_samples < 2:
            raise ValueError(f"n and num_samples must be >= 2, got n={config.n}, num_samples={config.num_samples}")
        if not (config.beta > 0 and math.isfinite(config.beta)):
            raise ValueError(f"beta must be a finite number > 0, got {config.beta}")
        if config.mode not in ("paper", "exact") or config.pairing not in ("first_round", "tournament"):
            raise ValueError(f"mode: expected paper or exact, pairing: first_round or tournament; got "
                             f"{config.mode!r}, {config.pairing!r}")
        # the baseline y_b is one more policy sample
        self.extra_candidates = 1 if config.scorer == "pairwise_judge" and not config.candidates_column else 0
        self.params = self.sampling(n="n")
        if self.extra_candidates:
            self.params = dataclasses.replace(self.params, n=config.n + 1)
        if config.scorer == "pairwise_judge":
            self.ab = self.load_template("pairwise_prompt")
            missing = {"prompt", "response_a", "response_b"} - self.ab.variables
            if missing:
                raise ValueError(f"{self.ab.source}: pairwise template must use {sorted(missing)}")
            self.options = OptionScorer(config.pairwise_options, config.pairwise_chat)

    def output_columns(self, input_columns: list[str]) -> list[str]:
        new = ["prompt", "chosen", "rejected", "score_chosen", "score_rejected", "score_margin", "all_scores",
               "accepted", "pair_index"]
        drop = {self.config.prompt_column, "provenance", "scorer", *new}
        return [c for c in input_columns if c not in drop] + new + ["scorer", "provenance"]

    def extra_scores(self, row, prompt, cands, ctx):
        if self.config.scorer != "pairwise_judge":
            return (yield from super().extra_scores(row, prompt, cands, ctx))
        return None  # scored in candidates() below, against the baseline

    def candidates(self, row, prompt, ctx):
        cands = yield from super().candidates(row, prompt, ctx)
        if self.config.scorer != "pairwise_judge":
            return cands
        if self.config.candidates_column:  # the baseline: a random one of the given candidates
            base = cands[ctx.rng(row.get(ROW_ID), "baseline").randrange(len(cands))] if cands else None
        else:
            cands, base = cands[:-1], (cands[-1] if cands else None)
        if not cands:
            return cands
        reqs = []
        for c in cands:  # candidate as (A) vs baseline as (B), and the swapped order
            reqs += self.options.requests(self.ab.render({"prompt": prompt, "response_a": c, "response_b": base}))
            reqs += self.options.requests(self.ab.render({"prompt": prompt, "response_a": base, "response_b": c}))
        res = yield Ask(reqs, model=self.config.judge_model, call="judgements")
        lp = [r.logprob for r in res]
        self._pending[row.get(ROW_ID)] = [
            _logit(merge_orders(soft_label(lp[4 * k], lp[4 * k + 1]), soft_label(lp[4 * k + 2], lp[4 * k + 3]))[0])
            for k in range(len(cands))]
        ctx.stats.add("scored_against_baseline", len(cands))
        # parse figure: one reward per candidate, read from the A/B option log-probs (always readable)
        ctx.stats.add("outputs", len(cands))
        ctx.stats.add("parsed", len(cands))
        return cands

    def run(self, row: dict[str, Any], ctx: StageContext):
        out = yield from super().run(row, ctx)
        if isinstance(out, dict) and self.config.scorer == "pairwise_judge":
            out["all_scores"] = self._pending.pop(row.get(ROW_ID))
        return out

    def process(self, rows, ctx):
        self._pending: dict[Any, list[float]] = {}
        return super().process(rows, ctx)

    def finish(self, row, prompt, cands, scores, ctx):
        cfg = self.config
        # key by index, one index per distinct text (duplicates would collapse in the paper's dict)
        first: dict[str, int] = {}
        for i, c in enumerate(cands):
            first.setdefault(c, i)
        distinct = sorted(first.values())
        if len(distinct) < 2:
            return Drop("fewer_than_two_distinct")
        rng = ctx.rng(row.get(ROW_ID))
        sub = [scores[i] for i in distinct]
        acc = [distinct[k] for k in rso_sample(sub, cfg.num_samples, cfg.beta, rng, cfg.mode)]
        ctx.stats.add("candidates", len(cands))
        ctx.stats.add("accepted", len(acc))
        out = []
        for w, lo in rso_pairs(acc, scores, rng, cfg.pairing):
            margin = scores[w] - scores[lo]
            if margin <= cfg.min_margin:
                ctx.stats.add("dropped_tied_pairs")
                continue
            out.append({**trl_pair(prompt, cands[w], cands[lo], cfg.format, cfg.system),
                        "score_chosen": scores[w], "score_rejected": scores[lo], "score_margin": margin,
                        "all_scores": [None if math.isnan(x) else x for x in scores], "accepted": acc,
                        "pair_index": [w, lo]})
        return out or Drop("no_pairs")


def _logit(p: float) -> float:
    p = min(max(p, P_CLIP), 1.0 - P_CLIP)
    return math.log(p / (1.0 - p))


__all__ = ["RSOPairsConfig", "RSOPairsStage", "rso_pairs", "rso_sample"]
