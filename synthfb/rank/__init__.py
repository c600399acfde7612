"""Pairwise rankers behind one interface, and their aggregation.

Every ranker has ``compare(prompts, candidates) -> list of N x N matrices``
(one per prompt; ``M[i, j] > 0``: candidate i, shown first, beats j), taking a
whole chunk of prompts at once. Scalar rankers (reward models) also have
``score(prompts, candidates) -> list of length-N reward vectors``.

- :class:`~synthfb.rank.llm_judge.LLMPairwiseJudge`: an LLM read through
  ``Generator.score`` log-probs of the options " (A)" / " (B)";
- :class:`~synthfb.rank.reward_model.RewardModelRanker`: any HF
  sequence-classification checkpoint;
- :class:`~synthfb.rank.pairrm.PairRMRanker`: a PairRM-style DeBERTa-v2
  cross-encoder from a local folder.

Torch-based rankers are imported lazily (``load_ranker``).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from .aggregate import pick_pair, position_bias, ranks_from_scores, scores_from_matrix

RANKERS = ("llm_judge", "reward_model", "pairrm")


@runtime_checkable
class PairwiseRanker(Protocol):
    """Anything that fills full comparison matrices for many prompts."""

    name: str

    def compare(self, prompts: list[str], candidates: list[list[str]]) -> list[np.ndarray]: ...


@runtime_checkable
class ScalarRanker(PairwiseRanker, Protocol):
    """A ranker with one scalar score per candidate (reward models)."""

    def score(self, prompts: list[str], candidates: list[list[str]]) -> list[np.ndarray]: ...


def load_ranker(kind: str, *, generator: Any = None, path: str | None = None, **options: Any) -> PairwiseRanker:
    """Build a ranker by name: ``llm_judge`` (needs ``generator``),
    ``reward_model`` or ``pairrm`` (need a local checkpoint ``path``)."""
    if kind == "llm_judge":
        if generator is None:
            raise ValueError("ranker llm_judge needs a generator")
        from .llm_judge import LLMPairwiseJudge

        return LLMPairwiseJudge(generator, **options)
    if kind in ("reward_model", "pairrm"):
        if not path:
            raise ValueError(f"ranker {kind} needs a checkpoint path (ranker_path)")
        if kind == "reward_model":
            from .reward_model import RewardModelRanker

            return RewardModelRanker(path, **options)
        from .pairrm import PairRMRanker

        return PairRMRanker(path, **options)
    raise ValueError(f"unknown ranker {kind!r}; expected one of {RANKERS}")


__all__ = [
    "RANKERS",
    "PairwiseRanker",
    "ScalarRanker",
    "load_ranker",
    "pick_pair",
    "position_bias",
    "ranks_from_scores",
    "scores_from_matrix",
]
