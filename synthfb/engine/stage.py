"""The Stage protocol: a Dataset chunk in, rows out, one config.

A stage is a small class with a config dataclass. The runner owns chunking,
checkpoints, progress and model lifetimes; a stage only builds requests for
the whole chunk, hands them to ``ctx.generator`` in one call, and parses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import jsonschema

from ..data import PROVENANCE, ROW_ID
from ..llm.types import Generator, SamplingParams

# Columns synthfb keeps for itself: no stage field may name them as a column
# (a stage writing `row_id` or `provenance` would overwrite the record of
# where each row came from).
RESERVED_COLUMNS = (ROW_ID, PROVENANCE)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@contextlib.contextmanager
def config_field(name: str):
    """Prefix a ValueError / FileNotFoundError raised inside with the config
    field it concerns (``formats: formats file 'x' not found ...``), so the
    pipeline loader can name ``stages[i].formats``."""
    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"{name}: {e}") from None


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


def _is_strict_int(checker: Any, instance: Any) -> bool:
    # JSON Schema's "integer" accepts 2.0; a config field typed `int` must not
    # (`n: 2.0` is a typo or a computed value, not a count). bool is not an int.
    return isinstance(instance, int) and not isinstance(instance, bool)


StrictValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_strict_int),
)
"""The validator for config files: Draft 2020-12 with "integer" meaning a
Python int (not 2.0, not true)."""


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
    # Config fields that name a prompt template file (loaded with
    # ``stages.templates.load_template(self, field)``); the data card copies
    # these files' text, and only these.
    template_fields: ClassVar[tuple[str, ...]] = ()
    # ``*_column`` fields allowed to name a reserved column (RESERVED_COLUMNS).
    reserved_column_fields: ClassVar[tuple[str, ...]] = ()
    is_source: ClassVar[bool] = False
    is_iterative: ClassVar[bool] = False
    max_steps: ClassVar[int] = 100_000
    uses_model: ClassVar[bool] = False

    def __init__(self, config: Any, base_dir: Path):
        self.config = config
        self.base_dir = Path(base_dir)
        # field -> PromptTemplate, filled by stages.templates.load_template
        self.prompt_templates: dict[str, Any] = {}
        self._check_column_fields()

    def _check_column_fields(self) -> None:
        """Every ``*_column`` field names a real column: a non-empty string,
        and not one of RESERVED_COLUMNS (unless the stage allows it)."""
        if not dataclasses.is_dataclass(self.config):
            return
        for f in dataclasses.fields(self.config):
            if not f.name.endswith("_column"):
                continue
            v = getattr(self.config, f.name)
            if v is None:
                continue
            if not isinstance(v, str) or not v.strip():
                raise ValueError(f"{f.name}: expected a column name (a non-empty string), got {v!r}")
            if v in RESERVED_COLUMNS and f.name not in self.reserved_column_fields:
                raise ValueError(f"{f.name}: {v!r} is reserved (synthfb keeps the columns {list(RESERVED_COLUMNS)} "
                                 f"for row ids and provenance); choose another column name")

    @classmethod
    def from_dict(cls, d: dict[str, Any], base_dir: Path) -> "Stage":
        return cls(cls.Config(**d), base_dir)

    def sampling_params(self, field: str = "sampling", defaults: dict[str, Any] | None = None,
                        **set_by: str) -> SamplingParams:
        """SamplingParams from ``defaults`` overridden by the config mapping
        ``field``. ``set_by`` names sampling keys that other config fields
        set (``n="num_ratings"``): writing them in the mapping as well is an
        error, not silently overridden. Errors name the field
        (``sampling.temperature: expected a finite number, got str 'hot'``)."""
        user = getattr(self.config, field) or {}
        if not isinstance(user, dict):
            raise ValueError(f"{field}: expected a mapping, got {type(user).__name__} {user!r}")
        fixed = {}
        for key, other in set_by.items():
            if key in user:
                raise ValueError(f"{field}.{key}: set by the stage's `{other}` field; remove it from `{field}`")
            fixed[key] = getattr(self.config, other)
        try:
            return SamplingParams.from_dict({**(defaults or {}), **user, **fixed}, where=field)
        except ValueError as e:
            msg = str(e)
            for key, other in set_by.items():
                if msg.startswith(f"{field}.{key}"):
                    msg = other + msg[len(f"{field}.{key}"):]
            raise ValueError(msg) from None

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
