"""A scripted stand-in for a real inference engine, for the fast test tier.

:class:`FakeGenerator` implements the ``Generator`` protocol of
:mod:`synthfb.llm.types` (``info``, ``usage``, ``generate``, ``score``,
``close``) and returns what the real backends return: one
:class:`GenerationResult` per request, in order, with ``n`` completions each
(``finish_reason`` ``"stop"`` or ``"length"``, JSON-schema outputs parsed and
validated with the backends' own ``make_completion``), or a result with
``error`` set and no completions when a request fails. No model, no engine:
a pipeline that gets it through ``Runner(..., generators={"default": fake})``
runs in milliseconds per stage.

What it answers is scripted:

* ``FakeGenerator(lambda req, k: "...")``: a function of the request and the
  sample index ``k`` (0..n-1);
* ``FakeGenerator(rules=[(match, reply), ...], default="...")`` (or a dict
  ``{match: reply}``): the first rule whose ``match`` fits the request gives
  the reply. ``match`` is a substring of the request's text (see
  :func:`request_text`), a compiled regex searched in it, or a function of
  the request returning a bool. ``reply`` is a string, a list of strings
  (sample ``k`` gets item ``k % len``), a :class:`Reply` (text plus a forced
  finish reason), or a function ``(request, k)`` returning any of those.

Decoding is imitated where it changes what a stage sees: the text is cut at
the first stop string (``params.stop``; the stop string itself is not
returned, finish ``"stop"``) and at ``params.max_tokens`` whitespace
"tokens" (finish ``"length"``). ``num_tokens`` counts whitespace tokens.

Failures: ``failures=[(match, error), ...]`` (same ``match`` forms; ``error``
a string or a function of the request) make matching requests come back as
failed results (``usage.failures`` counts them, as the backends do).
Change ``fake.failures`` between runs to "fix the server".

Scoring: ``logprobs=f(context, continuation) -> float`` scripts
``score``; ``context`` is the request's raw ``prompt`` string or its
``messages`` list. The default is a deterministic pseudo-random value in
[-5, -0.1) from a hash of both. ``score_failures=[(match, error)]`` make a
``score`` call raise ``RuntimeError`` (the backends raise; a score result
has no error field), ``match`` tested on the score request's text.

Everything it saw is recorded: ``requests`` (every GenerationRequest, in
order), ``generate_calls`` (``(desc, [requests])`` per call),
``score_requests`` and ``score_calls`` (one list per call), with counts
``num_generate_calls`` / ``num_score_calls``; ``forget()`` clears them.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from synthfb.llm.base import make_completion
from synthfb.llm.types import (
    GenerationRequest,
    GenerationResult,
    ModelInfo,
    ScoreRequest,
    ScoreResult,
    UsageCounter,
)


@dataclass(frozen=True)
class Reply:
    """A scripted completion with a forced finish reason (e.g. ``"length"``)."""

    text: str
    finish_reason: str | None = None


Match = str | re.Pattern[str] | Callable[[Any], bool]
ReplySpec = str | Reply | list | Callable[[GenerationRequest, int], Any]


def render_messages(messages: list[dict[str, str]]) -> str:
    """A plain rendering of chat messages: ``role: content`` blocks."""
    return "\n\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in messages)


def request_text(req: GenerationRequest | ScoreRequest) -> str:
    """The text rules are matched against: the raw ``prompt``, or every chat
    message rendered as ``role: content`` (system prompt included)."""
    if req.prompt is not None:
        return req.prompt
    return render_messages(req.messages or [])


def last_user(req: GenerationRequest | ScoreRequest) -> str:
    """The last user turn of a chat request, or the raw prompt."""
    if req.prompt is not None:
        return req.prompt
    users = [m["content"] for m in req.messages or [] if m.get("role") == "user"]
    return users[-1] if users else ""


def system_prompt(req: GenerationRequest) -> str | None:
    """The system message of a chat request (None when there is none or the request is raw)."""
    for m in req.messages or []:
        if m.get("role") == "system":
            return m["content"]
    return None


def _matches(match: Match, req: Any) -> bool:
    if isinstance(match, str):
        return match in request_text(req)
    if isinstance(match, re.Pattern):
        return match.search(request_text(req)) is not None
    if callable(match):
        return bool(match(req))
    raise TypeError(f"a rule's match must be a substring, a compiled regex or a function, got {match!r}")


def _rules(rules: Any) -> list[tuple[Match, Any]]:
    if rules is None:
        return []
    if isinstance(rules, dict):
        return list(rules.items())
    out = []
    for r in rules:
        if not (isinstance(r, tuple) and len(r) == 2):
            raise TypeError(f"a rule is a (match, value) pair, got {r!r}")
        out.append(r)
    return out


def _tokens(text: str) -> int:
    return len(text.split())


def default_logprob(context: Any, continuation: str) -> float:
    """Deterministic pseudo-random log-probability in [-5, -0.1)."""
    key = repr(context) + "\x00" + continuation
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return -0.1 - 4.9 * (h / 2**64)


class FakeGenerator:
    """A scripted Generator (see the module docstring)."""

    def __init__(
        self,
        reply: ReplySpec | None = None,
        *,
        rules: Iterable[tuple[Match, ReplySpec]] | dict | None = None,
        default: ReplySpec = "fake reply",
        logprobs: Callable[[Any, str], float] | None = None,
        failures: Iterable[tuple[Match, Any]] | dict | None = None,
        score_failures: Iterable[tuple[Match, Any]] | dict | None = None,
        name: str = "default",
        revision: str = "fake-rev-1",
        backend: str = "fake",
    ):
        if reply is not None and rules is not None:
            raise ValueError("give either `reply` or `rules` (with `default`), not both")
        self.reply = reply
        self.rules = _rules(rules)
        self.default = default
        self.logprobs = logprobs or default_logprob
        self.failures = _rules(failures)
        self.score_failures = _rules(score_failures)
        self.info = ModelInfo(name=name, path=f"fake://{name}", revision=revision, backend=backend)
        self.usage = UsageCounter()
        self.closed = False
        self.forget()

    # -- records -----------------------------------------------------------
    def forget(self) -> None:
        """Clear the record of what was seen (not the usage counters)."""
        self.requests: list[GenerationRequest] = []
        self.generate_calls: list[tuple[str, list[GenerationRequest]]] = []
        self.score_requests: list[ScoreRequest] = []
        self.score_calls: list[list[ScoreRequest]] = []

    @property
    def num_generate_calls(self) -> int:
        return len(self.generate_calls)

    @property
    def num_score_calls(self) -> int:
        return len(self.score_calls)

    # -- scripting -----------------------------------------------------------
    def _spec(self, req: GenerationRequest) -> ReplySpec:
        if self.reply is not None:
            return self.reply
        for match, spec in self.rules:
            if _matches(match, req):
                return spec
        return self.default

    def _text(self, req: GenerationRequest, k: int) -> tuple[str, str | None]:
        spec = self._spec(req)
        if callable(spec) and not isinstance(spec, Reply):
            spec = spec(req, k)
        if isinstance(spec, (list, tuple)):
            if not spec:
                raise ValueError("a list reply needs at least one item")
            spec = spec[k % len(spec)]
        if isinstance(spec, Reply):
            return spec.text, spec.finish_reason
        if not isinstance(spec, str):
            raise TypeError(f"a scripted reply must be a str, Reply or list of them, got {spec!r}")
        return spec, None

    def _decode(self, text: str, req: GenerationRequest, forced: str | None):
        finish = "stop"
        p = req.params
        cuts = [i for i in (text.find(s) for s in p.stop) if i >= 0]
        if cuts:
            text = text[:min(cuts)]
        # cut at max_tokens whitespace tokens, keeping the original spacing
        spans = list(re.finditer(r"\S+", text))
        if len(spans) > p.max_tokens:
            text = text[:spans[p.max_tokens - 1].end()]
            finish = "length"
        return make_completion(text, forced or finish, _tokens(text), req.json_schema)

    def _failure(self, rules, req) -> str | None:
        for match, err in rules:
            if _matches(match, req):
                msg = err(req) if callable(err) else err
                if msg:
                    return str(msg)
        return None

    # -- the Generator protocol -------------------------------------------------
    def generate(self, requests: list[GenerationRequest], desc: str = "") -> list[GenerationResult]:
        if self.closed:
            raise RuntimeError("FakeGenerator is closed")
        requests = list(requests)
        for r in requests:
            if not isinstance(r, GenerationRequest):
                raise TypeError(f"generate() takes GenerationRequests, got {type(r).__name__}")
        self.generate_calls.append((desc, requests))
        self.requests.extend(requests)
        out = []
        for req in requests:
            ptoks = _tokens(request_text(req))
            err = self._failure(self.failures, req)
            if err is not None:
                self.usage.failures += 1
                out.append(GenerationResult(completions=[], prompt_tokens=ptoks, error=err))
                continue
            comps = []
            for k in range(req.params.n):
                text, forced = self._text(req, k)
                comps.append(self._decode(text, req, forced))
            out.append(GenerationResult(completions=comps, prompt_tokens=ptoks))
            self.usage.prompt_tokens += ptoks
            self.usage.completion_tokens += sum(c.num_tokens for c in comps)
        self.usage.requests += len(requests)
        return out

    def score(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        if self.closed:
            raise RuntimeError("FakeGenerator is closed")
        requests = list(requests)
        self.score_calls.append(requests)
        self.score_requests.extend(requests)
        out = []
        for i, req in enumerate(requests):
            if not isinstance(req, ScoreRequest):
                raise TypeError(f"score() takes ScoreRequests, got {type(req).__name__}")
            err = self._failure(self.score_failures, req)
            if err is not None:
                raise RuntimeError(f"score request {i}: {err}")
            if not req.continuation:
                raise ValueError(f"score request {i}: the continuation is empty after tokenization")
            context = req.prompt if req.prompt is not None else req.messages
            lp = float(self.logprobs(context, req.continuation))
            n = max(1, _tokens(req.continuation))
            out.append(ScoreResult(logprob=lp, token_logprobs=[lp / n] * n))
        self.usage.requests += len(requests)
        self.usage.prompt_tokens += sum(_tokens(request_text(r)) + _tokens(r.continuation) for r in requests)
        return out

    def close(self) -> None:
        self.closed = True

    def __repr__(self) -> str:
        return (f"FakeGenerator(name={self.info.name!r}, generate_calls={self.num_generate_calls}, "
                f"score_calls={self.num_score_calls})")


__all__ = ["FakeGenerator", "Reply", "default_logprob", "last_user", "render_messages", "request_text",
           "system_prompt"]
