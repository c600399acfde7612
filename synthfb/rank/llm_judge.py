"""Pairwise A/B judging with an LLM, read from log-probabilities.

The judge sees a prompt with two responses labelled (A) and (B) and we ask the
backend (``Generator.score``) for the log-probability of each option string
(e.g. ``" (A)"`` and ``" (B)"``) as the continuation. The normalized
probability ``p_A = exp(lp_A) / (exp(lp_A) + exp(lp_B))`` is the soft label; no
free text is parsed. Every pair is judged in both orders, so position bias can
be averaged out and measured.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..llm.prompts import PromptTemplate
from ..llm.types import Generator, ScoreRequest

DEFAULT_OPTIONS = (" (A)", " (B)")


def soft_label(lp_a: float, lp_b: float) -> float:
    """``exp(lp_a) / (exp(lp_a) + exp(lp_b))``, computed without overflow."""
    d = float(lp_a) - float(lp_b)
    if d >= 0:
        return 1.0 / (1.0 + math.exp(-d))
    e = math.exp(d)
    return e / (1.0 + e)


def merge_orders(p_first_as_a: float, p_second_as_a: float) -> tuple[float, float]:
    """Combine the two presentation orders of one pair (x, y).

    ``p_first_as_a``: P(A) when x is shown as (A); ``p_second_as_a``: P(A)
    when y is shown as (A), i.e. the swapped order. Returns ``(p_x, gap)``:
    the probability that x is better, averaged over both orders with the
    swap mapped back (``1 - p_second_as_a``), and the position-bias gap
    ``p_first_as_a - (1 - p_second_as_a)`` (0 for an order-blind judge,
    > 0 when the judge favours slot A).
    """
    p_x_swapped = 1.0 - p_second_as_a
    return 0.5 * (p_first_as_a + p_x_swapped), p_first_as_a - p_x_swapped


def clamp(p: float, lo: float, hi: float) -> float:
    return min(max(p, lo), hi)


class OptionScorer:
    """Log-probabilities of a fixed set of option strings after many contexts,
    in ONE ``Generator.score`` call."""

    def __init__(self, options: Sequence[str] = DEFAULT_OPTIONS, chat: bool = False):
        if len(options) != 2 or options[0] == options[1]:
            raise ValueError(f"need exactly two distinct option strings, got {list(options)!r}")
        self.options = tuple(options)
        self.chat = chat

    def requests(self, context: str | list[dict[str, str]]) -> list[ScoreRequest]:
        out = []
        for opt in self.options:
            if isinstance(context, list):
                out.append(ScoreRequest(continuation=opt, messages=context))
            elif self.chat:
                out.append(ScoreRequest(continuation=opt, messages=[{"role": "user", "content": context}]))
            else:
                out.append(ScoreRequest(continuation=opt, prompt=context))
        return out

    def logprobs(self, gen: Generator, contexts: list[Any]) -> np.ndarray:
        """Array of shape (len(contexts), 2): log-probs of option A and B."""
        if not contexts:
            return np.zeros((0, 2))
        reqs = [r for c in contexts for r in self.requests(c)]
        res = gen.score(reqs)
        lp = np.array([r.logprob for r in res], dtype=np.float64).reshape(len(contexts), 2)
        return lp


class LLMPairwiseJudge:
    """A :class:`~synthfb.rank.PairwiseRanker` backed by an LLM.

    ``compare`` fills the full N x N matrix for each prompt: ``M[i, j] =
    lp_A - lp_B`` with candidate i shown as (A) and j as (B), i.e. the
    log-odds that i is better in that order. All ordered pairs of all prompts
    go to the backend in one call.
    """

    def __init__(
        self,
        generator: Generator,
        template: Any = "pairwise_judge.jinja",
        options: Sequence[str] = DEFAULT_OPTIONS,
        chat: bool = False,
        base_dir: str | Path = ".",
    ):

        self.gen = generator
        self.template = template if isinstance(template, PromptTemplate) else PromptTemplate.load(template, Path(base_dir))
        missing = {"prompt", "response_a", "response_b"} - self.template.variables
        if missing:
            raise ValueError(f"{self.template.source}: pairwise judge template must use {sorted(missing)}")
        self.scorer = OptionScorer(options, chat)
        self.name = f"llm_judge:{generator.info.name}"

    def render(self, prompt: str, a: str, b: str) -> str:
        return self.template.render({"prompt": prompt, "response_a": a, "response_b": b})

    def compare(self, prompts: list[str], candidates: list[list[str]]) -> list[np.ndarray]:
        if len(prompts) != len(candidates):
            raise ValueError(f"{len(prompts)} prompts but {len(candidates)} candidate lists")
        contexts, index = [], []
        for k, (p, cands) in enumerate(zip(prompts, candidates)):
            for i, a in enumerate(cands):
                for j, b in enumerate(cands):
                    if i != j:
                        contexts.append(self.render(p, a, b))
                        index.append((k, i, j))
        lp = self.scorer.logprobs(self.gen, contexts)
        mats = [np.zeros((len(c), len(c))) for c in candidates]
        for (k, i, j), (la, lb) in zip(index, lp):
            mats[k][i, j] = la - lb
        return mats
