"""Trainer configs: dataclasses whose fields are the YAML keys and the CLI help.

``load_config(cls, path_or_dict)`` checks the config against the JSON schema
that :func:`synthfb.data.config.dataclass_schema` derives from ``cls`` (the
same builder and validator as pipelines and loop files): every key (with a
close-match suggestion for typos), every value's type and each field's bounds
(``_f(..., ge=1)``: counts, ``gt=0``: rates), with one-line errors
``FILE: field: what was expected``. Then it checks that a local model folder
(``_f(..., path=True)``) exists and runs the config's own ``check()``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..data import config as dconfig


class ConfigError(dconfig.ConfigError):
    """A trainer config with an unknown, missing or mistyped field."""


def _f(default, help: str, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
       path: bool = False, **kw):
    """A config field (:func:`synthfb.data.config.option`). ``ge`` / ``gt`` /
    ``le``: bounds of a number (None values are not checked); ``path``: a
    model location that must exist when it is written as a local path (see
    :func:`looks_like_path`)."""
    return dconfig.option(default, help, ge=ge, gt=gt, le=le, path=path, **kw)


def looks_like_path(value: str) -> bool:
    """True for a value that can only be a local path, not a hub id
    (``user/name``): absolute, ``./``, ``../``, ``~``, a Windows separator, or
    more than one ``/``."""
    seps = {os.sep, os.altsep} - {None, "/"}
    return (value.startswith(("/", "./", "../", "~")) or value in (".", "..") or value.count("/") > 1
            or any(s in value for s in seps))


_NON_EMPTY = {"minLength": 1}


@dataclass
class TrainConfig:
    """Fields shared by every trainer."""

    model: str = _f("", "path of the HF checkpoint to start from", path=True, required=True, schema=_NON_EMPTY)
    dataset: str | list[str] = _f(
        "", "training data: a save_to_disk folder (what `synthfb run` emits), .jsonl, .json or .parquet; or a list of "
            "them, trained on as one dataset (their rows concatenated in order, e.g. Humpback's seed + A_5; each must "
            "have the same training columns)", required=True,
        schema={"anyOf": [{"type": "string", "minLength": 1},
                          {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}}]})
    output_dir: str = _f("", "where checkpoints, the final model and metrics.jsonl go", required=True,
                         schema=_NON_EMPTY)
    max_length: int = _f(1024, "max tokens per sequence (prompt + completion); longer prompts are cut from the left",
                         ge=1)
    max_prompt_length: int | None = _f(None, "max prompt tokens (cut from the left); none = only max_length applies",
                                       ge=1)
    batch_size: int = _f(8, "examples per micro-batch", ge=1)
    grad_accum: int = _f(1, "micro-batches per optimizer step (the same update as one batch of batch_size * grad_accum)",
                         ge=1)
    learning_rate: float = _f(1e-5, "peak learning rate (AdamW)", gt=0)
    weight_decay: float = _f(0.0, "AdamW weight decay", ge=0)
    adam_betas: list = _f([0.9, 0.999], "AdamW betas", expected="two numbers in [0, 1)",
                          schema={"minItems": 2, "maxItems": 2,
                                  "items": {"type": "number", "minimum": 0, "exclusiveMaximum": 1}})
    lr_scheduler: Literal["constant", "linear", "cosine"] = _f("linear", "learning-rate decay after warmup")
    warmup_steps: int = _f(0, "linear warmup optimizer steps", ge=0)
    num_epochs: float = _f(1.0, "passes over the data (ignored when max_steps is set)", gt=0)
    max_steps: int | None = _f(None, "optimizer steps to run; none = num_epochs", ge=1)
    max_grad_norm: float | None = _f(1.0, "gradient clipping norm; none = no clipping", gt=0)
    seed: int = _f(0, "seed for init, shuffling and sampling")
    dtype: Literal["float32", "bfloat16", "float16"] = _f("float32", "training dtype of the weights")
    device: str | None = _f(None, "torch device; none = cuda if available else cpu")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward to save memory")
    logging_steps: int = _f(1, "write a metrics.jsonl line every N optimizer steps", ge=1)
    save_steps: int | None = _f(None, "save a checkpoint-N folder every N optimizer steps (resumable)", ge=1)
    save_total_limit: int | None = _f(2, "keep at most this many checkpoint-N folders", ge=1)
    resume: bool = _f(False, "continue from the newest checkpoint-N in output_dir")
    resume_from: str | None = _f(None, "continue from this checkpoint folder", path=True)


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


@functools.cache
def config_schema(cls: type, exclude: frozenset[str] = frozenset()) -> dict[str, Any]:
    """JSON schema of trainer config ``cls`` without the fields in ``exclude``
    (fields a caller such as the loop sets itself)."""
    return dconfig.dataclass_schema(cls, exclude)


def load_config(cls, source: str | Path | dict, where: str | None = None, *, prefix: list | tuple = (),
                fixed: dict[str, Any] | None = None):
    """Build ``cls`` from a YAML file or a dict; errors are one line
    ``WHERE: field: ...`` (``prefix``: the path of the mapping inside the
    file, e.g. ``["train"]`` in a loop file). ``fixed``: fields the caller
    sets; they are not part of what the user may write, and are merged in
    after validation."""
    if isinstance(source, dict):
        data, where = dict(source), where or cls.__name__
    else:
        from ..data import yamlio

        where = where or str(source)
        try:
            data = yamlio.load_file(source, "config file")
        except yamlio.YAMLInputError as e:
            raise ConfigError(str(e)) from None
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping of config fields, got {type(data).__name__}")
    fixed = dict(fixed or {})
    dconfig.validate(data, config_schema(cls, frozenset(fixed)), where, prefix, error=ConfigError)
    cfg = dconfig.build(cls, {**data, **fixed})
    for f in dataclasses.fields(cls):
        if f.name in data:
            _check_path(dconfig.field_path([*prefix, f.name]), getattr(cfg, f.name), f.metadata, where)
    check = getattr(cfg, "check", None)
    if check:
        try:
            check()
        except ValueError as e:
            head = f"{dconfig.field_path(prefix)}: " if prefix else ""
            raise ConfigError(f"{where}: {head}{e}") from None
    return cfg


def _check_path(name: str, v: Any, meta: Any, where: str) -> None:
    """A local model folder named by a ``path=True`` field exists."""
    if meta.get("path") and isinstance(v, str) and v and looks_like_path(v):
        p = Path(v).expanduser()
        if not p.exists():
            raise ConfigError(f"{where}: {name}: local folder {v!r} does not exist ({p.absolute()})")
        if not p.is_dir():
            raise ConfigError(f"{where}: {name}: {v!r} is not a folder (expected a checkpoint folder)")


def _bounds(meta: Any) -> str:
    parts = [f"{op} {meta[k]}" for k, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
             if meta.get(k) is not None]
    return f" ({', '.join(parts)})" if parts else ""


def config_help(cls) -> str:
    """One line per field: name, type, default, help (for --help)."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        value = " (required)" if f.metadata.get("required") else f" = {default!r}"
        lines.append(f"  {f.name}: {_describe(hints[f.name])}{_bounds(f.metadata)}{value}\n"
                     f"      {f.metadata.get('help', '')}")
    return "\n".join(lines)
