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


__all__ = [
    "BACKENDS",
    "Completion",
    "GenerationRequest",
    "GenerationResult",
    "Generator",
    "ModelInfo",
    "SamplingParams",
    "ScoreRequest",
    "ScoreResult",
    "UsageCounter",
    "load_generator",
    "local_model_info",
    "served_model_info",
]
