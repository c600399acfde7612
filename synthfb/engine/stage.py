"""The Stage protocol: a Dataset chunk in, rows out, one config.

A stage is a small class with a config dataclass. The runner owns chunking,
checkpoints, progress and model lifetimes; a stage only builds requests for
the whole chunk, hands them to ``ctx.generator`` in one call, and parses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..llm.types import Generator, SamplingParams


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def dataclass_schema(cls: type) -> dict[str, Any]:
    """JSON schema of a config dataclass (so YAML is checked against the
    same definition the code uses, with no second copy to drift)."""
    hints = typing.get_type_hints(cls)
    props: dict[str, Any] = {}
    required = []
    for f in dataclasses.fields(cls):
        if f.name.startswith("_"):
            continue
        props[f.name] = _type_schema(hints[f.name])
        if f.metadata.get("help"):
            props[f.name]["description"] = f.metadata["help"]
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
            required.append(f.name)
    schema = {"type": "object", "properties": props, "additionalProperties": False}
    if required:
        schema["required"] = required
    return schema


def _type_schema(tp: Any) -> dict[str, Any]:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        subs = [_type_schema(a) for a in args]
        return {"anyOf": subs}
    if origin is typing.Literal:
        return {"enum": list(args)}
    if tp is type(None):
        return {"type": "null"}
    if tp is bool:
        return {"type": "boolean"}
    if tp is int:
        return {"type": "integer"}
    if tp is float:
        return {"type": "number"}
    if tp is str:
        return {"type": "string"}
    if origin in (list, tuple) or tp in (list, tuple):
        item = _type_schema(args[0]) if args else {}
        return {"type": "array", "items": item} if item else {"type": "array"}
    if origin is dict or tp is dict:
        return {"type": "object"}
    return {}


@dataclass
class StageStats:
    """Counters a stage fills while processing a chunk (drop reasons etc.)."""

    counts: dict[str, int] = field(default_factory=dict)

    def add(self, key: str, n: int = 1) -> None:
        if n:
            self.counts[key] = self.counts.get(key, 0) + n


class StageContext:
    """What a stage may use while processing: generators, seed, stats, and
    the provenance record that every generated row carries."""

    def __init__(self, runner: Any, stage_index: int, stage_name: str):
        self._runner = runner
        self.stage_index = stage_index
        self.stage_name = stage_name
        self.seed: int = runner.pipeline.seed
        self.stats = StageStats()
        self.failures: list[dict[str, str]] = []

    def record_failure(self, row_id: Any, reason: str) -> None:
        """A row that could not be completed; kept in the run record."""
        self.failures.append({"row_id": str(row_id), "reason": reason})

    def generator(self, model: str | None = None) -> Generator:
        """The run's Generator for ``model`` (default: the pipeline's)."""
        return self._runner.generator(model)

    def provenance(
        self,
        gen: Generator,
        params: SamplingParams,
        template_sha256: str,
        finish_reason: str,
    ) -> dict[str, Any]:
        return {
            "stage": self.stage_name,
            "stage_index": self.stage_index,
            "backend": gen.info.backend,
            "model": gen.info.name,
            "model_revision": gen.info.revision,
            "sampling": params.to_json(),
            "template_sha256": template_sha256,
            "seed": self.seed,
            "finish_reason": finish_reason,
        }


class Stage:
    """Base class of pipeline stages.

    Subclasses set ``kind`` (the name used in YAML), ``Config`` (a dataclass)
    and implement ``process`` (a chunk of input rows -> output rows). Source
    stages (``is_source``) implement ``read`` and take no input. Iterative
    stages (``is_iterative``, e.g. Self-Instruct's bootstrap loop) implement
    ``step`` and grow their output step by step until they return None.
    """

    kind: ClassVar[str] = ""
    Config: ClassVar[type] = object
    is_source: ClassVar[bool] = False
    is_iterative: ClassVar[bool] = False
    max_steps: ClassVar[int] = 100_000
    uses_model: ClassVar[bool] = False

    def __init__(self, config: Any, base_dir: Path):
        self.config = config
        self.base_dir = Path(base_dir)

    @classmethod
    def from_dict(cls, d: dict[str, Any], base_dir: Path) -> "Stage":
        return cls(cls.Config(**d), base_dir)

    # -- overridable -----------------------------------------------------
    def check(self) -> None:
        """Validate files/templates before any work; raise ValueError."""

    def required_columns(self) -> set[str]:
        """Input columns this stage reads (checked before any model work)."""
        return set()

    def output_columns(self, input_columns: list[str]) -> list[str]:
        """Columns of this stage's output, given its input's."""
        return list(input_columns)

    def model_name(self) -> str | None:
        """The model this stage calls (None: the pipeline's default)."""
        return getattr(self.config, "model", None)

    def fingerprint(self) -> dict[str, Any]:
        """Everything that determines this stage's output besides its input
        and model: the config and the content of files it reads."""
        return {"kind": self.kind, "config": _jsonable(dataclasses.asdict(self.config))}

    def read(self, ctx: StageContext):  # pragma: no cover - source stages only
        raise NotImplementedError

    def step(
        self, rows: list[dict[str, Any]], produced: list[dict[str, Any]], step: int, ctx: StageContext
    ) -> list[dict[str, Any]] | None:  # pragma: no cover - iterative stages only
        """Iterative stages (``is_iterative``): given the whole input and all
        rows produced by earlier steps (read back from disk on resume), return
        the next step's new rows, or None when done. Each step is saved as
        one chunk; derive randomness from ``(ctx.seed, step)`` so a resumed
        run continues the same way."""
        raise NotImplementedError

    def process(self, rows: list[dict[str, Any]], ctx: StageContext) -> list[dict[str, Any]]:
        raise NotImplementedError


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, sort_keys=True, default=str))
