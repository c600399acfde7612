"""Scores read from log-probabilities over a fixed set of labels (G-Eval).

A rating prompt ends right where the score goes ("... Score:"). Instead of
sampling an answer and parsing it, each allowed label (``"1"`` .. ``"5"``)
is scored as a continuation of that context with ``Generator.score``, the
label probabilities are renormalised over the allowed labels,

    p_i = exp(lp_i) / sum_j exp(lp_j),

and the score is their probability-weighted mean ``sum_i p_i * v_i``
(G-Eval, Liu et al. 2023, arXiv:2303.16634; specs/methods-2.md section 9).
Nothing is parsed, so a small model that would write "10." or no score at
all still gets a score; the expectation also breaks the ties that integer
ratings make.

Continuation strings. The label is written after the prefix with one
space, as the shipped templates ask for it ("Score: 4") and as a model
writes it: SmolLM2's tokenizer splits " 4" into " " and "4", GPT-2-style
BPE has " 4" as one token; either way the continuation is tokenized on its
own and appended to the context (``PromptTokenizer.score_ids``), so it is
the model's own spelling. Which request carries the prefix depends on the
request kind:

* raw prompt (``chat=False``): the context ends with ``"\\n" + prefix``
  ("...\\nScore:") and the continuation is ``" " + label`` (" 4");
* chat (``chat=True``): a chat request cannot start the assistant's reply,
  so the prefix is part of the continuation, ``prefix + " " + label``
  ("Score: 4"). Its log-probability is the same for every label and
  cancels in the normalisation.

With a tokenizer that splits digits, the probability of "1" also covers
replies that go on "10", "15", ... (as in G-Eval, which reads the next-token
distribution at the score position). Measured on SmolLM2-135M after a raw
"...\\nScore:" (the curation template in completion mode): the next token
after " 1" is ":" / "-" / "0" / " to" about half the time (the model starts
listing the rubric or the scale), so "1" takes ~0.4 of the mass and the
expected rating is pulled down; after a chat turn it is "\\n" or "." for
most of the mass, so the chat form reads the rating more cleanly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..llm.types import ScoreRequest, ScoreResult


def normalise(logprobs: Sequence[float]) -> list[float]:
    """``exp(lp_i) / sum_j exp(lp_j)`` without overflow. All ``-inf`` (no mass
    on any label) or a NaN gives NaNs."""
    lps = [float(x) for x in logprobs]
    if not lps or any(math.isnan(x) for x in lps):
        return [math.nan] * len(lps)
    top = max(lps)
    if top == -math.inf:
        return [math.nan] * len(lps)
    ws = [math.exp(x - top) for x in lps]
    z = sum(ws)
    return [w / z for w in ws]


def expected_value(probs: Sequence[float], values: Sequence[float]) -> float:
    """``sum_i p_i * v_i`` (NaN when the probabilities are)."""
    if len(probs) != len(values):
        raise ValueError(f"{len(probs)} probabilities for {len(values)} values")
    return math.fsum(p * v for p, v in zip(probs, values))


@dataclass(frozen=True)
class LabelScore:
    """What one context's label scores say.

    ``probs``: label -> probability renormalised over the labels;
    ``score``: the probability-weighted mean of the label values (NaN when
    no label had any mass); ``top``: the most probable label's value;
    ``mass``: ``sum_i exp(lp_i)``, the probability that the model would
    have written one of the label continuations right there (in chat mode
    including the prefix); ``logprobs``: the raw log-probabilities."""

    probs: dict[str, float]
    score: float
    top: float
    mass: float
    logprobs: tuple[float, ...]

    @property
    def ok(self) -> bool:
        return math.isfinite(self.score)

    def rounded(self, digits: int = 6) -> dict[str, float]:
        """``probs`` rounded for storage."""
        return {k: round(v, digits) for k, v in self.probs.items()}


class LabelScorer:
    """Score requests for a fixed label set after many contexts, and the
    label scores read back from their results (one ``Generator.score`` call
    per chunk when a stage yields all rows' requests together)."""

    def __init__(self, labels: Sequence[str], prefix: str = "Score:", chat: bool = True,
                 values: Sequence[float] | None = None):
        labels = tuple(labels)
        if len(labels) < 2 or len(set(labels)) != len(labels) or not all(isinstance(x, str) and x.strip()
                                                                          for x in labels):
            raise ValueError(f"need at least two distinct non-empty labels, got {list(labels)!r}")
        if values is None:
            try:
                values = [float(x) for x in labels]
            except ValueError:
                raise ValueError(f"labels {list(labels)!r} are not numbers; give their values") from None
        if len(values) != len(labels):
            raise ValueError(f"{len(values)} values for {len(labels)} labels")
        self.labels = labels
        self.values = tuple(float(v) for v in values)
        self.prefix = prefix
        self.chat = chat

    def continuations(self) -> list[str]:
        """The continuation string scored for each label (see the module docstring)."""
        if self.chat:
            return [f"{self.prefix} {x}" if self.prefix else x for x in self.labels]
        return [f" {x}" if self.prefix else x for x in self.labels]

    def context(self, text: str) -> str | list[dict[str, str]]:
        """The scored context for a rendered prompt ``text``. Raw prompts get
        ``"\n" + prefix`` appended, unless ``text`` already ends with the
        prefix (a few-shot template whose last line is ``"Category:"``)."""
        if self.chat:
            return [{"role": "user", "content": text}]
        if self.prefix and text.rstrip().endswith(self.prefix):
            return text.rstrip()
        return f"{text}\n{self.prefix}" if self.prefix else text

    def requests(self, text: str) -> list[ScoreRequest]:
        """One ScoreRequest per label, in label order."""
        ctx = self.context(text)
        if isinstance(ctx, list):
            return [ScoreRequest(continuation=c, messages=ctx) for c in self.continuations()]
        return [ScoreRequest(continuation=c, prompt=ctx) for c in self.continuations()]

    def read(self, results: Sequence[ScoreResult | Any]) -> LabelScore:
        """The label score of one context from its ``len(labels)`` results
        (ScoreResults, or plain log-probabilities)."""
        if len(results) != len(self.labels):
            raise ValueError(f"{len(results)} score results for {len(self.labels)} labels")
        lps = tuple(float(getattr(r, "logprob", r)) for r in results)
        probs = normalise(lps)
        score = expected_value(probs, self.values)
        top = self.values[max(range(len(probs)), key=lambda i: probs[i])] if math.isfinite(score) else math.nan
        mass = math.fsum(math.exp(x) for x in lps) if not any(math.isnan(x) for x in lps) else math.nan
        return LabelScore(dict(zip(self.labels, probs)), score, top, mass, lps)

    def read_all(self, results: Sequence[Any]) -> list[LabelScore]:
        """Label scores of consecutive contexts (``len(labels)`` results each)."""
        k = len(self.labels)
        if len(results) % k:
            raise ValueError(f"{len(results)} score results are not a multiple of {k} labels")
        return [self.read(results[i:i + k]) for i in range(0, len(results), k)]


SCORING_MODES = ("auto", "logprobs", "text")
LOGPROB_BACKENDS = ("vllm", "vllm-cpu", "transformers")
"""Backends whose prompt log-probabilities ``scoring: auto`` reads. The
``openai`` backend scores only on vLLM servers (``/tokenize`` and
``prompt_logprobs``), so ``auto`` parses text there; set ``scoring:
logprobs`` for a vLLM server."""


def resolve_scoring(mode: str, backend: str) -> str:
    """``logprobs`` or ``text`` for a stage's ``scoring`` option on ``backend``."""
    if mode not in SCORING_MODES:
        raise ValueError(f"scoring: expected one of {list(SCORING_MODES)}, got {mode!r}")
    if mode != "auto":
        return mode
    return "logprobs" if backend in LOGPROB_BACKENDS else "text"


__all__ = ["LOGPROB_BACKENDS", "SCORING_MODES", "LabelScore", "LabelScorer", "expected_value", "normalise",
           "resolve_scoring"]
