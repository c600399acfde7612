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
]
