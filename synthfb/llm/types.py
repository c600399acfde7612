"""Plain data passed to and from every Generator backend.

A backend receives a list of :class:`GenerationRequest` and returns one
:class:`GenerationResult` per request, in the same order. Nothing here imports
an inference engine, so stages can build requests without loading one.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


def _show(v: Any) -> str:
    return f"{type(v).__name__} {v!r}"


def _need_int(name: str, v: Any, lo: int | None = None) -> None:
    # bool is an int subclass in Python; `n: true` is a mistake, not 1
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"sampling.{name}: expected an integer, got {_show(v)}")
    if lo is not None and v < lo:
        raise ValueError(f"sampling.{name} must be >= {lo}, got {v}")


def _need_number(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"sampling.{name}: expected a finite number, got {_show(v)}")


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings for one request (the subset every backend supports).

    ``seed`` is recorded in provenance; the vLLM CPU build cannot take a
    per-request seed, so the vllm backend derives reproducibility from the
    engine seed instead (see ENVIRONMENT.md).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        elif isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop):
            stop = tuple(stop)
        elif stop is None:
            stop = ()
        else:
            raise ValueError(f"sampling.stop: expected a string or a list of strings, got {_show(stop)}")
        if any(not s for s in stop):
            raise ValueError("sampling.stop: stop strings must be non-empty")
        object.__setattr__(self, "stop", stop)
        _need_int("n", self.n, lo=1)
        _need_int("max_tokens", self.max_tokens, lo=1)
        if self.seed is not None:
            _need_int("seed", self.seed)
        _need_number("temperature", self.temperature)
        _need_number("top_p", self.top_p)
        _need_number("presence_penalty", self.presence_penalty)
        _need_number("frequency_penalty", self.frequency_penalty)
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"sampling.{name} must be in [-2, 2], got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, where: str = "sampling") -> "SamplingParams":
        """Build from a config mapping; errors name ``where`` (the config field),
        e.g. ``sampling.temperature: expected a finite number, got str 'hot'``."""
        if d is not None and not isinstance(d, dict):
            raise ValueError(f"{where}: expected a mapping, got {_show(d)}")
        d = dict(d or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known, key=str)
        if unknown:
            raise ValueError(f"{where}: unknown sampling parameter(s) {unknown}; expected some of {sorted(known)}")
        try:
            return cls(**d)
        except ValueError as e:
            msg = str(e)
            if where != "sampling" and msg.startswith("sampling."):
                msg = where + msg[len("sampling"):]
            raise ValueError(msg) from None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["stop"] = list(self.stop)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


@dataclass
class GenerationRequest:
    """One prompt: either chat ``messages`` (rendered with the model's chat
    template) or a raw ``prompt`` string, never both.

    ``json_schema``: constrain the output to this JSON schema (vLLM structured
    outputs / OpenAI ``response_format``) and validate it with ``jsonschema``.
    ``token_logprobs``: also return the log-prob of each sampled token
    (:attr:`Completion.logprobs`) where the backend can (vLLM); off by default,
    since it costs a log-softmax and a Python float per generated token.
    """

    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    json_schema: dict[str, Any] | None = None
    token_logprobs: bool = False

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("a GenerationRequest needs exactly one of `messages` or `prompt`")


@dataclass
class Completion:
    """One sampled output. ``parsed`` holds the decoded JSON when the request
    had a schema and the text validated; otherwise ``error`` says why not.

    ``token_ids``: the generated token ids exactly as the engine sampled them
    (the stop token, e.g. EOS, included when generation stopped on it; local
    backends fill it, None where unknown). Use them instead of re-tokenizing
    ``text``: decoding and encoding again need not give the same ids.
    ``logprobs``: one log-prob per ``token_ids`` entry, of that token under the
    model's distribution before temperature / top-p (vLLM's raw log-probs),
    when the request asked for ``token_logprobs`` and the backend supports it.
    """

    text: str
    finish_reason: str
    num_tokens: int
    parsed: Any = None
    error: str | None = None
    token_ids: list[int] | None = None
    logprobs: list[float] | None = None


@dataclass
class GenerationResult:
    """All ``n`` completions of one request, or ``error`` if it failed for good.
    ``prompt_token_ids``: the prompt as the backend tokenized it (chat template
    applied), where known (local backends)."""

    completions: list[Completion]
    prompt_tokens: int = 0
    error: str | None = None
    prompt_token_ids: list[int] | None = None


@dataclass
class ScoreRequest:
    """Log-probability of ``continuation`` given a context (chat ``messages``
    rendered with the generation prompt, or a raw ``prompt``)."""

    continuation: str
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("a ScoreRequest needs exactly one of `messages` or `prompt`")


@dataclass
class ScoreResult:
    """Sum and per-token log-probabilities of the continuation tokens."""

    logprob: float
    token_logprobs: list[float]


@dataclass(frozen=True)
class ModelInfo:
    """What produced an output: recorded in every row's provenance."""

    name: str
    path: str
    revision: str
    backend: str

    def to_dict(self) -> dict[str, str]:
        """``{name, path, revision, backend}``: how run and loop records name a model."""
        return dataclasses.asdict(self)


@dataclass
class UsageCounter:
    """Running totals a backend keeps; the runner reports them as progress."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0
    failures: int = 0

    def snapshot(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@runtime_checkable
class Generator(Protocol):
    """The one interface every stage talks to.

    Implementations take a whole chunk of requests per call (the vLLM backend
    hands them to the engine in a single ``generate`` call).
    """

    info: ModelInfo
    usage: UsageCounter

    def generate(self, requests: list[GenerationRequest], desc: str = "") -> list[GenerationResult]: ...

    def score(self, requests: list[ScoreRequest]) -> list[ScoreResult]: ...

    def close(self) -> None: ...
