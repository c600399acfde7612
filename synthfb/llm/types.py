"""Plain data passed to and from every Generator backend.

A backend receives a list of :class:`GenerationRequest` and returns one
:class:`GenerationResult` per request, in the same order. Nothing here imports
an inference engine, so stages can build requests without loading one.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


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
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop or ()))
        if self.n < 1:
            raise ValueError(f"sampling.n must be >= 1, got {self.n}")
        if self.max_tokens < 1:
            raise ValueError(f"sampling.max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "SamplingParams":
        d = dict(d or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown sampling parameter(s) {unknown}; expected some of {sorted(known)}")
        return cls(**d)

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
    """

    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    json_schema: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("a GenerationRequest needs exactly one of `messages` or `prompt`")


@dataclass
class Completion:
    """One sampled output. ``parsed`` holds the decoded JSON when the request
    had a schema and the text validated; otherwise ``error`` says why not."""

    text: str
    finish_reason: str
    num_tokens: int
    parsed: Any = None
    error: str | None = None


@dataclass
class GenerationResult:
    """All ``n`` completions of one request, or ``error`` if it failed for good."""

    completions: list[Completion]
    prompt_tokens: int = 0
    error: str | None = None


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
