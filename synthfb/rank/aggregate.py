"""Turn a full comparison matrix into scores, ranks and one preference pair.

``M[i, j]`` is a logit: > 0 means candidate ``i`` (shown first) beats ``j``.
The diagonal is ignored (treated as 0). Aggregations follow LLM-Blender's
``get_scores_from_cmps`` (spec 5.2):

- ``max_logits`` (default): ``score_i = mean_j (M[i,j] - M[j,i])`` over all
  N columns, the zero diagonal included in the mean;
- ``max_wins``: ``(M > 0).sum(-1) + (M < 0).mean(-2)`` (wins, plus the share
  of comparisons in which the opponent shown first lost, as a tie-breaker).

Also: conversion of a pair to TRL's preference format (``prompt``,
``chosen``, ``rejected``; conversational or standard, never mixed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

AGGREGATIONS = ("max_logits", "max_wins")
from ..data.trl import FORMATS, ranks_of, trl_completion, trl_pair  # noqa: F401 - re-exported


def _square(m: Any) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"comparison matrix must be square (N x N), got shape {m.shape}")
    if not np.all(np.isfinite(m[~np.eye(len(m), dtype=bool)])):
        raise ValueError("comparison matrix has non-finite off-diagonal entries")
    m = m.copy()
    np.fill_diagonal(m, 0.0)
    return m


def scores_from_matrix(m: Any, method: str = "max_logits") -> np.ndarray:
    """Scores (higher is better) of the N candidates of one comparison matrix."""
    m = _square(m)
    if method == "max_logits":
        return (m - m.T).mean(axis=-1)
    if method == "max_wins":
        return (m > 0).sum(axis=-1) + (m < 0).mean(axis=-2)
    raise ValueError(f"unknown aggregation {method!r}; expected one of {AGGREGATIONS}")


def ranks_from_scores(scores: Any) -> np.ndarray:
    """Rank 1 = best; equal scores share a rank ("min" method: 1 + number of
    strictly better candidates): :func:`synthfb.data.trl.ranks_of` as an array."""
    return np.asarray(ranks_of(np.asarray(scores, dtype=np.float64).tolist()), dtype=np.int64)


def position_bias(m: Any) -> float:
    """Mean over unordered pairs of ``sigmoid(M[i,j]) + sigmoid(M[j,i]) - 1``:
    how much more likely the candidate shown first wins (0 for a judge that
    ignores position, > 0 when it favours the first slot). NaN if N < 2."""
    m = _square(m)
    n = len(m)
    if n < 2:
        return float("nan")
    iu = np.triu_indices(n, 1)
    p = 1.0 / (1.0 + np.exp(-m))
    return float(np.mean(p[iu] + p.T[iu] - 1.0))


@dataclass
class Pick:
    """The chosen/rejected choice among N candidates, or why none was made."""

    best: int | None
    worst: int | None
    scores: list[float]
    reason: str | None = None  # set when the prompt yields no pair

    @property
    def margin(self) -> float | None:
        if self.best is None or self.worst is None:
            return None
        return self.scores[self.best] - self.scores[self.worst]


def pick_pair(scores: Any, candidates: list[str] | None = None, min_margin: float = 0.0) -> Pick:
    """Best = highest score, worst = lowest; among equal scores the lowest
    index wins (deterministic). No pair (``reason`` set) when the top and
    bottom scores differ by ``<= min_margin`` ("tie") or when the two texts
    are identical ("identical_chosen_rejected"). NaN scores are unscored
    candidates and are ignored ("too_few_scored" when fewer than 2 remain)."""
    s = [float(x) for x in np.asarray(scores, dtype=np.float64)]
    ok = [i for i, x in enumerate(s) if not math.isnan(x)]
    if len(ok) < 2:
        return Pick(None, None, s, "too_few_scored")
    best = max(ok, key=lambda i: (s[i], -i))
    worst = min(ok, key=lambda i: (s[i], i))
    if s[best] - s[worst] <= min_margin:
        return Pick(None, None, s, "tie")
    if candidates is not None and candidates[best] == candidates[worst]:
        return Pick(None, None, s, "identical_chosen_rejected")
    return Pick(best, worst, s)


