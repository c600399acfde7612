"""Trainer configs: dataclasses whose fields are the YAML keys and the CLI help.

``load_config(cls, path_or_dict)`` checks every key and value type and names
the offending field (with a close-match suggestion for typos), then each
field's bounds (``_f(..., ge=1)``: counts, ``gt=0``: rates) and that a
local model folder (``_f(..., path=True)``) exists.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    """A config file with an unknown, missing or mistyped field."""


def _f(default, help: str, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
       path: bool = False, **kw):
    """A config field. ``ge`` / ``gt`` / ``le``: bounds of a number (None
    values are not checked); ``path``: a model location that must exist when
    it is written as a local path (see :func:`looks_like_path`)."""
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "path": path}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def looks_like_path(value: str) -> bool:
    """True for a value that can only be a local path, not a hub id
    (``user/name``): absolute, ``./``, ``../``, ``~``, a Windows separator, or
    more than one ``/``."""
    seps = {os.sep, os.altsep} - {None, "/"}
    return (value.startswith(("/", "./", "../", "~")) or value in (".", "..") or value.count("/") > 1
            or any(s in value for s in seps))


@dataclass
class TrainConfig:
    """Fields shared by every trainer."""

    model: str = _f("", "path of the HF checkpoint to start from", path=True)
    dataset: str = _f("", "training data: a save_to_disk folder (what `synthfb run` emits), .jsonl, .json or .parquet")
    output_dir: str = _f("", "where checkpoints, the final model and metrics.jsonl go")
    max_length: int = _f(1024, "max tokens per sequence (prompt + completion); longer prompts are cut from the left",
                         ge=1)
    max_prompt_length: int | None = _f(None, "max prompt tokens (cut from the left); none = only max_length applies",
                                       ge=1)
    batch_size: int = _f(8, "examples per micro-batch", ge=1)
    grad_accum: int = _f(1, "micro-batches per optimizer step (the same update as one batch of batch_size * grad_accum)",
                         ge=1)
    learning_rate: float = _f(1e-5, "peak learning rate (AdamW)", gt=0)
    weight_decay: float = _f(0.0, "AdamW weight decay", ge=0)
    adam_betas: list = _f([0.9, 0.999], "AdamW betas")
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


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is Literal:
        return value in typing.get_args(tp)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, dict):
        return isinstance(value, origin)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def load_config(cls, source: str | Path | dict, where: str | None = None):
    """Build ``cls`` from a YAML file or a dict; errors name the field."""
    if isinstance(source, dict):
        data, where = dict(source), where or cls.__name__
    else:
        from ..data import yamlio

        where = str(source)
        try:
            data = yamlio.load_file(source, "config file")
        except yamlio.YAMLInputError as e:
            raise ConfigError(str(e)) from None
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping of config fields")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k, v in data.items():
        if k not in fields:
            close = difflib.get_close_matches(str(k), list(fields), n=1)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            raise ConfigError(f"{where}: unknown field `{k}` for {cls.__name__}{hint}")
        if isinstance(v, int) and not isinstance(v, bool) and hints[k] is float:
            data[k] = v = float(v)
        if not _type_ok(v, hints[k]):
            raise ConfigError(f"{where}: field `{k}` must be {_describe(hints[k])}, got {v!r}")
        _check_value(k, v, fields[k].metadata, where)
    betas = data.get("adam_betas")
    if betas is not None and not (len(betas) == 2 and all(isinstance(b, (int, float)) and not isinstance(b, bool)
                                                          and 0 <= b < 1 for b in betas)):
        raise ConfigError(f"{where}: adam_betas: expected two numbers in [0, 1), got {betas!r}")
    cfg = cls(**data)
    for req in ("model", "dataset", "output_dir"):
        if req in fields and not getattr(cfg, req):
            raise ConfigError(f"{where}: field `{req}` is required ({fields[req].metadata.get('help', '')})")
    check = getattr(cfg, "check", None)
    if check:
        try:
            check()
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
    return cfg


def _check_value(name: str, v: Any, meta: Any, where: str) -> None:
    """Bounds and local-path existence of one (type-checked) value."""
    if isinstance(v, float) and not math.isfinite(v):
        raise ConfigError(f"{where}: {name}: must be a finite number, got {v!r}")
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        ge, gt, le = meta.get("ge"), meta.get("gt"), meta.get("le")
        if ge is not None and v < ge:
            raise ConfigError(f"{where}: {name}: must be >= {ge}, got {v!r}")
        if gt is not None and v <= gt:
            raise ConfigError(f"{where}: {name}: must be > {gt}, got {v!r}")
        if le is not None and v > le:
            raise ConfigError(f"{where}: {name}: must be <= {le}, got {v!r}")
    if meta.get("path") and isinstance(v, str) and v and looks_like_path(v):
        p = Path(v).expanduser()
        if not p.exists():
            raise ConfigError(f"{where}: {name}: local folder {v!r} does not exist ({p.absolute()})")
        if not p.is_dir():
            raise ConfigError(f"{where}: {name}: {v!r} is not a folder (expected a checkpoint folder)")


def config_help(cls) -> str:
    """One line per field: name, type, default, help (for --help)."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"  {f.name}: {_describe(hints[f.name])} = {default!r}\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)
