"""The Generator interface and its backends (vllm, openai, transformers).

Only plain data types are imported eagerly; engines load on first use.
"""

from __future__ import annotations

from typing import Any

from .types import (
    Completion,
    GenerationRequest,
    GenerationResult,
    Generator,
    ModelInfo,
    SamplingParams,
    ScoreRequest,
    ScoreResult,
    UsageCounter,
)

BACKENDS = ("vllm", "vllm-cpu", "openai", "transformers")

# The constructor of each backend, as (module, class); read by signature only
# (these modules import their engines lazily, so no vllm/torch import here).
_BACKEND_CLASSES = {
    "vllm": (".vllm_backend", "VLLMGenerator"),
    "vllm-cpu": (".vllm_backend", "VLLMGenerator"),
    "transformers": (".hf_backend", "TransformersGenerator"),
    "openai": (".openai_backend", "OpenAIGenerator"),
}


def _named_options(backend: str) -> tuple[frozenset[str], bool]:
    """(named constructor options of ``backend``, whether it also takes any other keyword)."""
    import importlib
    import inspect

    if backend not in _BACKEND_CLASSES:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    module, cls = _BACKEND_CLASSES[backend]
    params = list(inspect.signature(getattr(importlib.import_module(module, __name__), cls).__init__).parameters.values())
    named = frozenset(q.name for q in params[2:]  # self, the model
                      if q.kind in (q.POSITIONAL_OR_KEYWORD, q.KEYWORD_ONLY)) - {"name"}
    return named, any(q.kind is q.VAR_KEYWORD for q in params)


def backend_options(backend: str) -> frozenset[str] | None:
    """The option names (``backend_options``, ``models`` entries) ``backend``
    accepts, from its constructor's signature; None when it takes any (vLLM
    hands options it does not name to ``vllm.LLM``)."""
    named, open_ = _named_options(backend)
    return None if open_ else named


def check_backend_options(backend: str, options: dict[str, Any], where: str = "backend_options") -> None:
    """Raise ValueError (one line, naming the option and the backend) for an
    option ``backend`` does not take. For vLLM, whose engine arguments are
    open-ended, the options that only another backend names are rejected
    (e.g. ``batch_size``); the engine checks the rest when it starts."""
    named, open_ = _named_options(backend)
    if open_:
        foreign = set()
        for other in {"transformers", "openai"} - {backend}:
            foreign |= _named_options(other)[0]
        bad = sorted(k for k in options if k in foreign - named)
    else:
        bad = sorted(k for k in options if k not in named)
    if bad:
        takes = ", ".join(sorted(named)) + (", and vLLM engine arguments" if open_ else "")
        raise ValueError(f"{where}.{bad[0]}: not an option of backend {backend} (it takes: {takes}); remove it "
                         f"or choose a backend that has it")


def engine_options(backend: str, backend_options: dict[str, Any], models: dict[str, dict[str, Any]], name: str,
                   seed: int, progress: bool) -> dict[str, Any]:
    """Constructor options for model ``name``: ``backend_options``, then its
    entry in ``models``; ``seed`` and ``progress`` unless set (local engines only).

    The options hold credentials as given (``base_url`` with ``user:pass@`` or
    ``?api-key=``); their secrets, and the key in the variable ``api_key_env``
    names, are registered with :mod:`synthfb.data.redact` here, so any record
    or message redacted later (``redact_obj``/``redact_text``) drops them. Show
    options only through ``redact_obj(opts)``."""
    from ..data.redact import register_secrets_in

    opts = dict(backend_options)
    opts.update(models.get(name, {}))
    if backend != "openai":
        opts.setdefault("seed", seed)
        opts.setdefault("progress", progress)
    register_secrets_in(opts)
    return opts


def served_model_info(name: str, base_url: str) -> ModelInfo:
    """The identity an ``openai`` model ``name`` served at ``base_url`` reports
    before a client is started: the path is the URL with its credentials
    redacted (``redact_url``), never the URL as configured."""
    from ..data.redact import redact_url, register_secrets_in

    register_secrets_in(base_url)
    return ModelInfo(name=name, path=redact_url(base_url or ""), revision="served", backend="openai")


def local_model_info(backend: str, name: str) -> ModelInfo:
    """The identity a local engine on ``name`` reports, without starting one.
    ``vllm-cpu`` is the vllm backend on a CPU build and reports ``vllm`` as a
    loaded engine does, so fingerprints do not depend on whether one is loaded."""
    from .models import model_revision, resolve_model

    path = resolve_model(name)
    return ModelInfo(name=name, path=path, revision=model_revision(path),
                     backend="vllm" if backend == "vllm-cpu" else backend)


def load_generator(backend: str, model: str, **options: Any) -> Generator:
    """Build a Generator: ``backend`` is one of BACKENDS; ``model`` a model
    alias (``default``), a local checkpoint folder, a hub id, or (openai) the
    served model name. ``options`` go to the backend's constructor."""
    from .models import resolve_model

    check_backend_options(backend, options, "options")
    if backend in ("vllm", "vllm-cpu"):
        from .vllm_backend import VLLMGenerator

        return VLLMGenerator(resolve_model(model), name=model, **options)
    if backend == "transformers":
        from .hf_backend import TransformersGenerator

        return TransformersGenerator(resolve_model(model), name=model, **options)
    if backend == "openai":
        from .openai_backend import OpenAIGenerator

        return OpenAIGenerator(model, **options)
    raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")


CONSTRAINED_BACKENDS = ("vllm", "vllm-cpu")
"""Where a stage's ``constrain: auto`` decodes under its JSON schema (vLLM's structured outputs; the transformers
backend cannot constrain, and a served API may not support every keyword)."""

CONSTRAIN_HELP = ("json: decode under the answer's JSON schema (vLLM structured outputs, or response_format on a "
                  "served model), so small models answer in the asked form; none: free text parsed as the paper's "
                  "GPT-4 answers were; auto: json on vllm/vllm-cpu, none elsewhere")


def constrained(mode: str, backend: str) -> bool:
    """Whether a stage's ``constrain`` setting decodes under its schema on ``backend``."""
    return backend in CONSTRAINED_BACKENDS if mode == "auto" else mode == "json"


__all__ = [
    "BACKENDS",
    "CONSTRAINED_BACKENDS",
    "CONSTRAIN_HELP",
    "Completion",
    "GenerationRequest",
    "GenerationResult",
    "Generator",
    "ModelInfo",
    "SamplingParams",
    "ScoreRequest",
    "ScoreResult",
    "UsageCounter",
    "backend_options",
    "check_backend_options",
    "constrained",
    "load_generator",
    "local_model_info",
    "served_model_info",
]

