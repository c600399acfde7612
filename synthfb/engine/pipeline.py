"""Pipelines: a list of stages declared in YAML or built in Python.

A pipeline file is validated with ``jsonschema`` before any work: the top
level against ``PIPELINE_SCHEMA``, each stage against the schema derived from
its config dataclass. Errors name the file, the field path and what was
expected.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data import yamlio
from ..llm import BACKENDS
from ..data.config import describe as _describe, validate as _validate_with  # noqa: F401 - _describe re-exported
from ..data.config import ConfigError, dataclass_schema, option
from .stage import SourceStage, Stage, stage_kinds

# A pipeline's (or loop's) name is the default output folder runs/NAME, so it
# must be one plain path component: no '/', no '..', no leading '.'.
NAME_SCHEMA: dict[str, Any] = {
    "type": "string",
    "pattern": r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
    "description": "a plain name (letters, digits, '.', '_', '-', starting with a letter or digit; "
                   "the default output folder is runs/NAME)",
}

@dataclass
class PipelineFile:
    """The top level of a pipeline file (the stages are checked one by one
    against their own config dataclasses)."""

    name: str = option(help=NAME_SCHEMA["description"], schema={"pattern": NAME_SCHEMA["pattern"]}, required=True)
    stages: list[dict] = option([], "the stages, in order; the first reads data (e.g. `stage: load`)", required=True,
                                schema={"minItems": 1, "items": {"type": "object", "required": ["stage"],
                                                                 "properties": {"stage": {"type": "string"}}}})
    description: str = option("", "what is built and why (goes into the data card)")
    license: str | None = option(None, "license of the output dataset")
    backend: str = option("vllm", "inference backend", schema={"enum": list(BACKENDS)})
    model: str = option("default", "default model: alias, local folder, or hub id")
    backend_options: dict = option({}, "passed to the backend constructor")
    models: dict[str, dict] = option({}, "per-model backend options, keyed by model name")
    seed: int = option(0, "run seed: engine sampling seed and every stage's ctx.rng")
    chunk_size: int = option(2048, "rows per chunk (the unit of checkpointing and of one batched engine call)",
                             ge=1)
    max_failure_rate: float = option(0.5, "a stage with a larger fraction of failed rows (or all of them) fails "
                                          "the run (exit 1); --resume retries them", ge=0, le=1)


PIPELINE_SCHEMA: dict[str, Any] = dataclass_schema(PipelineFile)


class PipelineError(ConfigError):
    """A pipeline file is invalid; the message names file and field."""


def _validate(obj: Any, schema: dict, source: str, prefix: list) -> None:
    _validate_with(obj, schema, source, prefix, error=PipelineError)


def with_input_file(data: dict[str, Any], input_file: str | Path, source: str) -> tuple[dict, dict]:
    """``synthfb run/validate --input FILE``: the pipeline dict ``data`` with
    its first stage (``load``) reading ``input_file`` instead of its own
    ``path``, e.g. the Self-Instruct paper's ``seed_tasks.jsonl`` for
    ``pipelines/self_instruct.yaml``. A relative ``input_file`` is taken from
    the working directory, not the pipeline's folder. Returns the dict to
    build (the absolute path) and the one to record in run.json and the card
    (the file's name only, as the load stage's fingerprint records it, so no
    machine-specific path is kept or published)."""
    given = Path(input_file).expanduser()
    if not given.exists():
        raise PipelineError(f"--input {str(input_file)!r}: no such file or folder")
    first, *rest = data["stages"]  # checked against PIPELINE_SCHEMA: at least one stage, each with `stage`
    if first["stage"] != "load":
        raise PipelineError(f"{source}: --input replaces the `path` of a first `load` stage; stages[0] is "
                            f"{first['stage']!r}")
    use = {**data, "stages": [{**first, "path": str(given.resolve())}, *rest]}
    recorded = {**data, "stages": [{**first, "path": given.name}, *rest]}
    return use, recorded


def stage_error(where: str, kind: str, stage_cls: type, err: Exception) -> str:
    """One line for an error raised while building or checking a stage:
    ``stages[1].sampling.temperature (generate): expected ...`` when the
    message starts with one of the stage's config fields, else
    ``stages[1] (generate): ...``."""
    msg = " ".join(str(err).split())
    head, sep, rest = msg.partition(": ")
    fields = {f.name for f in dataclasses.fields(stage_cls.Config)} if dataclasses.is_dataclass(stage_cls.Config) else set()
    if sep and head.split(".")[0] in fields and " " not in head:
        return f"{where}.{head} ({kind}): {rest}"
    return f"{where} ({kind}): {msg}"


@dataclass
class Pipeline:
    """A validated pipeline: settings plus instantiated stages."""

    name: str
    stages: list[Stage]
    description: str = ""
    license: str | None = None
    backend: str = "vllm"
    model: str = "default"
    backend_options: dict[str, Any] = field(default_factory=dict)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    seed: int = 0
    chunk_size: int = 2048
    max_failure_rate: float = 0.5
    source: str = "<python>"
    raw: dict[str, Any] = field(default_factory=dict)
    input_file: str | None = None
    """The name of the file ``--input`` gave (recorded in run.json; a resume must give it again)."""

    @classmethod
    def from_dict(cls, data: Any, base_dir: Path, source: str = "<python>", *,
                  input_file: str | Path | None = None) -> "Pipeline":
        """The pipeline in dict ``data`` (a parsed pipeline file; relative
        paths are taken from ``base_dir``). ``input_file``: read this data
        file instead of the first stage's (:func:`with_input_file`)."""
        if not isinstance(data, dict):
            raise PipelineError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
        _validate(data, PIPELINE_SCHEMA, source, [])
        recorded = data
        if input_file is not None:
            data, recorded = with_input_file(data, input_file, source)
        stages: list[Stage] = []
        for i, sd in enumerate(data["stages"]):
            kind = sd["stage"]
            STAGES = stage_kinds()
            if kind not in STAGES:
                raise PipelineError(f"{source}: stages[{i}].stage: unknown stage {kind!r}; expected one of {sorted(STAGES)}")
            cls_ = STAGES[kind]
            cfg = {k: v for k, v in sd.items() if k != "stage"}
            _validate(cfg, dataclass_schema(cls_.Config), source, ["stages", i])
            if i == 0 and not issubclass(cls_, SourceStage):
                raise PipelineError(f"{source}: stages[0]: the first stage must read data (e.g. `stage: load`), got {kind!r}")
            if i > 0 and issubclass(cls_, SourceStage):
                raise PipelineError(f"{source}: stages[{i}]: {kind!r} reads data and can only be the first stage")
            try:
                stage = cls_.from_dict(cfg, base_dir)
                stage.check()
            except (ValueError, FileNotFoundError) as e:
                raise PipelineError(f"{source}: {stage_error(f'stages[{i}]', kind, cls_, e)}") from e
            stages.append(stage)
        top = {k: v for k, v in data.items() if k != "stages"}
        pipeline = cls(stages=stages, source=source, raw=recorded, **top,
                       input_file=None if input_file is None else Path(input_file).expanduser().name)
        pipeline.check_backend_options()
        return pipeline

    @classmethod
    def from_yaml(cls, path: str | Path, *, input_file: str | Path | None = None) -> "Pipeline":
        """The pipeline in file ``path``; ``input_file``: see :func:`with_input_file`."""
        p = Path(path)
        try:
            data = yamlio.load_file(p, "pipeline file")
        except yamlio.YAMLInputError as e:
            raise PipelineError(str(e)) from e
        return cls.from_dict(data, p.parent.resolve(), str(p), input_file=input_file)

    def check_backend_options(self) -> None:
        """Every option in ``backend_options`` and ``models`` is one the
        backend takes (``synthfb.llm.check_backend_options``); run again after
        ``backend`` changes (``--backend``), before any model loads."""
        from ..llm import check_backend_options

        try:
            check_backend_options(self.backend, self.backend_options, "backend_options")
            for name, opts in self.models.items():
                check_backend_options(self.backend, opts, f"models.{name}")
        except ValueError as e:
            raise PipelineError(f"{self.source}: {e}") from None

    def check_columns(self) -> None:
        """Walk the stages' declared columns; fail before any model work if a
        stage reads a column that no earlier stage provides."""
        cols: list[str] = []
        for i, st in enumerate(self.stages):
            missing = sorted(st.required_columns() - set(cols)) if i else []
            if missing:
                raise PipelineError(
                    f"{self.source}: stages[{i}] ({st.kind}): needs column(s) {missing}, "
                    f"but its input has {cols}"
                )
            cols = st.output_columns(cols)
