"""Exact, fast ROUGE-L novelty filtering (the Self-Instruct filter).

Every decision and score here is bit-for-bit what
``rouge_score.rouge_scorer.RougeScorer(["rougeL"]).score(a, b)["rougeL"].fmeasure``
gives (no stemmer), but most pairs are never scored at all:

* tokens are interned to ints once per text;
* an inverted index (token, k) -> ids of stored texts with at least ``k``
  copies of the token gives, with one ``np.bincount``, the multiset overlap
  of a query with every stored text; ``LCS <= overlap``, so a pair whose
  overlap cannot reach the LCS needed to exceed the threshold is skipped
  (the needed LCS is found with the exact float formula, see ``_need_row``);
* the few survivors get a bit-parallel LCS (Allison-Dix / Hyyroe) on Python
  big ints, most promising first, stopping at the first pair over the
  threshold.
"""

from __future__ import annotations

import heapq
import re
from typing import Iterable

import numpy as np

__all__ = ["rouge_tokenize", "rougel_score", "RougeLIndex", "rougel_novel"]

_TOKEN_RE = re.compile(r"[a-z0-9]+")


def rouge_tokenize(text: str) -> list[str]:
    """Tokenize exactly like rouge_score's default tokenizer (no stemmer).

    rouge_score lower-cases, replaces every run of characters outside
    ``[a-z0-9]`` by a space and splits; that is the same as finding the
    ``[a-z0-9]+`` runs of the lower-cased text. Non-Latin text gives ``[]``.
    """
    return _TOKEN_RE.findall(text.lower())


def _f1(lcs: int, len_target: int, len_pred: int) -> float:
    """rouge_score's ROUGE-L F1 from an LCS length, same float operations."""
    if len_target == 0 or len_pred == 0:
        return 0.0
    precision = lcs / len_pred
    recall = lcs / len_target
    if precision + recall > 0:
        return 2 * precision * recall / (precision + recall)
    return 0.0


def _match_masks(tokens: Iterable) -> dict:
    """Bit ``i`` of ``masks[tok]`` is set iff ``tokens[i] == tok``."""
    masks: dict = {}
    for i, tok in enumerate(tokens):
        masks[tok] = masks.get(tok, 0) | (1 << i)
    return masks


def _lcs(masks: dict, n: int, other: Iterable) -> int:
    """LCS length of the ``n``-token sequence behind ``masks`` and ``other``.

    Bit-parallel LCS (Allison-Dix, Hyyroe's form): one big-int step per token
    of ``other``; tokens absent from the first sequence leave the state as is.
    Bits above ``n`` collect carries and are masked off at the end.
    """
    v = (1 << n) - 1
    for tok in other:
        m = masks.get(tok)
        if m:
            u = v & m
            v = (v + u) | (v - u)
    return n - (v & ((1 << n) - 1)).bit_count()


def rougel_score(target: str, prediction: str) -> float:
    """ROUGE-L F1 of two strings, identical to rouge_score's ``fmeasure``."""
    a, b = rouge_tokenize(target), rouge_tokenize(prediction)
    if not a or not b:
        return 0.0
    return _f1(_lcs(_match_masks(a), len(a), b), len(a), len(b))


def _need_row(len_a: int, max_len: int, threshold: float) -> np.ndarray:
    """``row[len_b]`` = smallest LCS whose rouge_score F1 is ``> threshold``.

    For a query of ``len_a`` tokens against texts of ``len_b`` tokens
    (``min(len_a, len_b) + 1`` when no LCS is enough; a huge value for empty
    texts). ``threshold >= 0`` is assumed (LCS 0 always scores 0).

    The exact F1 is ``2L/(len_a+len_b)``; with ``lo`` the largest ``L`` whose
    exact F1 is ``<= threshold`` (integer arithmetic on the float's exact
    ratio), every ``L < lo`` is below the threshold by at least
    ``2/(len_a+len_b)``, far more than the float formula's few-ulp error, and
    every ``L > lo + 1`` is above it by as much; only ``lo`` and ``lo + 1``
    need the float formula itself.
    """
    num, den = threshold.as_integer_ratio()
    row = np.empty(max_len + 1, dtype=np.int64)
    row[0] = 1 << 40
    for len_b in range(1, max_len + 1):
        cap = min(len_a, len_b) + 1
        lo = num * (len_a + len_b) // (2 * den)
        need = lo + 2
        for lcs in (lo + 1, lo):
            if 1 <= lcs < cap and _f1(lcs, len_a, len_b) > threshold:
                need = lcs
        row[len_b] = min(max(need, 1), cap)
    return row


class _Growable:
    """An int32 numpy array with amortised O(1) append."""

    def __init__(self) -> None:
        self._data = np.empty(8, dtype=np.int32)
        self._size = 0

    def append(self, value: int) -> None:
        if self._size == len(self._data):
            self._data = np.concatenate([self._data, np.empty_like(self._data)])
        self._data[self._size] = value
        self._size += 1

    def view(self) -> np.ndarray:
        return self._data[: self._size]


class RougeLIndex:
    """An incremental set of texts answering exact ROUGE-L queries fast.

    Text ``i`` is the ``i``-th one added. Queries score a text ``q`` against a
    stored text ``s`` as ``rouge_score``'s ``score(q, s)`` does (the F1 is
    symmetric, bit for bit).
    """

    def __init__(self, texts: Iterable[str] = ()) -> None:
        self._vocab: dict[str, int] = {}
        self._docs: list[tuple[int, ...]] = []
        self._lens = _Growable()
        self._postings: dict[tuple[int, int], _Growable] = {}
        self._need: dict[tuple[float, int], np.ndarray] = {}
        self._max_len = 0
        for text in texts:
            self.add(text)

    def __len__(self) -> int:
        return len(self._docs)

    def add(self, text: str) -> int:
        """Store ``text``; return its index."""
        doc_id = len(self._docs)
        ids = tuple(self._vocab.setdefault(t, len(self._vocab)) for t in rouge_tokenize(text))
        self._docs.append(ids)
        self._lens.append(len(ids))
        self._max_len = max(self._max_len, len(ids))
        seen: dict[int, int] = {}
        for tok in ids:
            seen[tok] = k = seen.get(tok, 0) + 1
            posting = self._postings.get((tok, k))
            if posting is None:
                posting = self._postings[(tok, k)] = _Growable()
            posting.append(doc_id)
        return doc_id

    def _query(self, text: str):
        """Token ids (``-1`` for unseen words), match masks, overlap counts."""
        ids = [self._vocab.get(t, -1) for t in rouge_tokenize(text)]
        counts: dict[int, int] = {}
        for tok in ids:
            counts[tok] = counts.get(tok, 0) + 1
        parts = [
            self._postings[(tok, k)].view()
            for tok, c in counts.items()
            if tok >= 0
            for k in range(1, c + 1)
            if (tok, k) in self._postings
        ]
        hits = np.concatenate(parts) if parts else np.empty(0, dtype=np.int32)
        overlap = np.bincount(hits, minlength=len(self._docs))
        return ids, _match_masks(ids), overlap

    def exceeds(self, text: str, threshold: float = 0.7) -> bool:
        """True iff some stored text has ROUGE-L F1 ``> threshold`` with ``text``."""
        if threshold < 0:
            return len(self._docs) > 0  # every F1, even 0, is above it
        if threshold >= 1:
            return False  # no F1 exceeds 1.0
        ids, masks, overlap = self._query(text)
        len_a = len(ids)
        if not len_a or not self._docs:
            return False
        row = self._need.get((threshold, len_a))
        if row is None or len(row) <= self._max_len:
            row = _need_row(len_a, max(2 * self._max_len, 64), threshold)
            self._need[(threshold, len_a)] = row
        lens = self._lens.view()
        survivors = np.flatnonzero(overlap >= row[lens])
        # Most overlap first: likeliest to exceed, so the early exit comes soon.
        survivors = survivors[np.argsort(-overlap[survivors], kind="stable")]
        for i in survivors.tolist():
            doc = self._docs[i]
            if _f1(_lcs(masks, len_a, doc), len_a, len(doc)) > threshold:
                return True
        return False

    def top_k(self, text: str, k: int = 10) -> list[tuple[float, int]]:
        """The ``k`` highest ``(score, index)`` pairs, by score then lowest index.

        Exactly what sorting rouge_score's F1 against every stored text would
        give. Texts sharing no token with ``text`` score 0 and fill the tail.
        """
        if k <= 0:
            return []
        ids, masks, overlap = self._query(text)
        len_a = len(ids)
        lens = self._lens.view()
        cand = np.flatnonzero(overlap) if len_a else np.empty(0, dtype=np.int64)
        # 2*overlap/(len_a+len_b) bounds the exact F1; the factor covers the
        # float formula's rounding so the bound is safe for the computed F1.
        bound = 2.0 * overlap[cand] / (len_a + lens[cand]) * (1 + 1e-9)
        order = cand[np.lexsort((cand, -bound))]
        bound_of = dict(zip(cand.tolist(), bound.tolist()))
        heap: list[tuple[float, int]] = []  # min-heap of (score, -index)
        for i in order.tolist():
            if len(heap) == k and bound_of[i] < heap[0][0]:
                break
            doc = self._docs[i]
            item = (_f1(_lcs(masks, len_a, doc), len_a, len(doc)), -i)
            if len(heap) < k:
                heapq.heappush(heap, item)
            elif item > heap[0]:
                heapq.heapreplace(heap, item)
        best = sorted(((s, -neg) for s, neg in heap), key=lambda x: (-x[0], x[1]))
        if len(best) < k:  # zero scores: every text sharing no token
            zeros = np.flatnonzero(overlap == 0) if len_a else np.arange(len(self._docs))
            best += [(0.0, int(i)) for i in zeros[: k - len(best)]]
        return best[:k]

    def max_score(self, text: str) -> tuple[float, int]:
        """``(best F1, lowest index reaching it)``; ``(0.0, -1)`` when empty."""
        best = self.top_k(text, 1)
        return best[0] if best else (0.0, -1)

    def filter(self, candidates: Iterable[str], threshold: float = 0.7) -> list[bool]:
        """Keep candidates in order; each kept one is added to the index.

        A candidate is kept iff no stored text (including candidates kept
        earlier in this call) has ROUGE-L F1 ``> threshold`` with it.
        """
        keep = []
        for text in candidates:
            novel = not self.exceeds(text, threshold)
            if novel:
                self.add(text)
            keep.append(novel)
        return keep


def rougel_novel(candidates: list[str], pool: list[str], threshold: float = 0.7) -> list[bool]:
    """Self-Instruct's ROUGE-L novelty filter, exact and fast.

    Candidate ``i`` is novel iff its ROUGE-L F1 (rouge_score, no stemmer)
    with every text of ``pool`` and every earlier novel candidate is
    ``<= threshold``; novel candidates join the pool. ``pool`` is not changed.
    """
    return RougeLIndex(pool).filter(candidates, threshold)
