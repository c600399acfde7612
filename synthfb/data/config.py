"""One configuration system: config dataclasses (fields with
``metadata={"help": ...}``) -> a JSON schema -> one validator and one
one-line error format (``SOURCE: field.path: what was expected``).

Pipelines, pipeline stages, loops and trainer configs are all checked here:

- :func:`option` declares a config field: its help text, numeric bounds
  (``ge``/``gt``/``le``/``lt``), extra JSON-schema keywords (``schema``) and
  an ``expected`` phrase that replaces the validator's wording for any error
  inside the field;
- :func:`dataclass_schema` turns a config dataclass into the JSON schema the
  YAML is checked against (no second, hand-written copy to drift);
- :func:`validate` checks an object against such a schema and raises one line
  naming the source file and the field path; :func:`describe` words one
  ``jsonschema`` error (with a close-match suggestion for unknown fields).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from typing import Any

import jsonschema


class ConfigError(ValueError):
    """A config file (pipeline, loop or trainer config) with an unknown,
    missing or mistyped field; the message is one line naming the file and
    the field path."""


def option(default: Any = dataclasses.MISSING, help: str = "", *, ge: float | None = None,
           gt: float | None = None, le: float | None = None, lt: float | None = None,
           schema: dict[str, Any] | None = None, expected: str | None = None, required: bool = False,
           **metadata: Any):
    """A config dataclass field.

    ``help``: the field's description (CLI help, schema ``description``);
    ``ge`` / ``gt`` / ``le`` / ``lt``: bounds of a number (None is not
    checked); ``schema``: extra JSON-schema keywords for the field (merged
    over the one derived from its type); ``expected``: how an error anywhere
    inside the field is worded (``adam_betas: expected two numbers in [0, 1),
    got [0.9, 1.5]``); ``required``: the key must be written even though the
    dataclass has a default. A list or dict default is copied per instance.
    Further keyword arguments go into the field's metadata.
    """
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt, "schema": schema, "expected": expected,
            "required": required, **metadata}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=functools.partial(_copy, default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _copy(value: Any) -> Any:
    return type(value)(value)


_BOUNDS = {"ge": "minimum", "gt": "exclusiveMinimum", "le": "maximum", "lt": "exclusiveMaximum"}


def field_schema(f: dataclasses.Field, tp: Any) -> dict[str, Any]:
    """JSON schema of one config field: its type, bounds, extra keywords and help."""
    s = _type_schema(tp)
    meta = f.metadata
    for key, keyword in _BOUNDS.items():
        if meta.get(key) is not None:
            s[keyword] = meta[key]  # numeric keywords ignore non-numbers, so `int | None` keeps null
    if meta.get("schema"):
        s.update(meta["schema"])
    if meta.get("expected"):
        s["x-expected"] = meta["expected"]
    if meta.get("help"):
        s["description"] = meta["help"]
    return s


def is_required(f: dataclasses.Field) -> bool:
    no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
    return no_default or bool(f.metadata.get("required"))


def dataclass_schema(cls: type, exclude: typing.Iterable[str] = ()) -> dict[str, Any]:
    """JSON schema of a config dataclass (so YAML is checked against the
    same definition the code uses, with no second copy to drift). Fields
    named in ``exclude`` (set by the caller, not the user) and fields whose
    name starts with ``_`` are left out; nested config dataclasses become
    nested objects."""
    hints = typing.get_type_hints(cls)
    exclude = set(exclude)
    props: dict[str, Any] = {}
    required = []
    for f in dataclasses.fields(cls):
        if f.name.startswith("_") or f.name in exclude:
            continue
        props[f.name] = field_schema(f, hints[f.name])
        if is_required(f):
            required.append(f.name)
    schema: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
    if required:
        schema["required"] = required
    return schema


def build(cls: type, data: dict[str, Any]) -> Any:
    """An instance of config dataclass ``cls`` from a mapping that passed
    :func:`validate` against ``dataclass_schema(cls)`` (nested config
    dataclasses are built too; unset fields take their defaults)."""
    hints = typing.get_type_hints(cls)
    kw = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        v, tp = data[f.name], hints[f.name]
        if dataclasses.is_dataclass(tp) and isinstance(v, dict):
            v = build(tp, v)
        elif isinstance(v, int) and not isinstance(v, bool) and _admits_float(tp):
            v = float(v)  # `learning_rate: 1` is the float 1.0 the code expects
        kw[f.name] = v
    return cls(**kw)


def _admits_float(tp: Any) -> bool:
    if tp is float:
        return True
    return _is_union(tp) and float in typing.get_args(tp) and int not in typing.get_args(tp)


def _is_strict_int(checker: Any, instance: Any) -> bool:
    # JSON Schema's "integer" accepts 2.0; a config field typed `int` must not
    # (`n: 2.0` is a typo or a computed value, not a count). bool is not an int.
    return isinstance(instance, int) and not isinstance(instance, bool)


def _is_finite_number(checker: Any, instance: Any) -> bool:
    # a config number is finite: `.nan` passes every bound check and `.inf` is never meant
    if isinstance(instance, bool) or not isinstance(instance, (int, float)):
        return False
    return not isinstance(instance, float) or math.isfinite(instance)


StrictValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine_many(
        {"integer": _is_strict_int, "number": _is_finite_number}),
)
"""The validator for config files: Draft 2020-12 with "integer" meaning a
Python int (not 2.0, not true) and "number" a finite one (not .nan, .inf)."""


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _type_schema(tp: Any) -> dict[str, Any]:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if _is_union(tp):
        return {"anyOf": [_type_schema(a) for a in args]}
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
    if dataclasses.is_dataclass(tp):
        return dataclass_schema(tp)
    if origin in (list, tuple) or tp in (list, tuple):
        item = _type_schema(args[0]) if args else {}
        return {"type": "array", "items": item} if item else {"type": "array"}
    if origin is dict or tp is dict:
        value = _type_schema(args[1]) if len(args) == 2 else {}
        return {"type": "object", "additionalProperties": value} if value else {"type": "object"}
    return {}


def field_path(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def _types_of(schema: dict[str, Any]) -> list[str]:
    """What a (sub)schema admits, in words: ['integer', 'null'], ["one of ['a', 'b']"]."""
    if "type" in schema:
        t = schema["type"]
        return list(t) if isinstance(t, list) else [t]
    if "enum" in schema:
        return [f"one of {schema['enum']}"]
    out: list[str] = []
    for sub in schema.get("anyOf", []) + schema.get("oneOf", []):
        out += [t for t in _types_of(sub) if t not in out]
    return out


def _got(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _unknown_fields(err: jsonschema.ValidationError, where: str) -> str:
    allowed = sorted(err.schema.get("properties", {}))
    extra = sorted((k for k in err.instance if k not in allowed), key=str) if isinstance(err.instance, dict) else []
    hints = []
    for k in extra:
        close = difflib.get_close_matches(str(k), allowed, n=1)
        if close:
            hints.append((k, close[0]))
    hint = ""
    if len(hints) == 1 and len(extra) == 1:
        hint = f" (did you mean `{hints[0][1]}`?)"
    elif hints:
        hint = " (did you mean " + ", ".join(f"`{m}` for `{k}`" for k, m in hints) + "?)"
    return f"{where}: unknown field(s) {extra}{hint}; expected some of {allowed}"


def describe(err: jsonschema.ValidationError) -> str:
    """``field.path: what was expected, got what`` for one ``jsonschema`` error."""
    where = field_path(err.absolute_path)
    v, inst, schema = err.validator, err.instance, err.schema
    if v == "additionalProperties":
        return _unknown_fields(err, where)
    if v == "required":
        missing = [k for k in err.validator_value if isinstance(inst, dict) and k not in inst]
        name = missing[0] if missing else err.message
        help_ = schema.get("properties", {}).get(name, {}).get("description")
        return f"{field_path([*err.absolute_path, name])}: required field is missing" + (f" ({help_})" if help_ else "")
    if v in ("type", "anyOf", "oneOf"):
        want = _types_of(schema)
        if isinstance(inst, float) and not math.isfinite(inst) and ("number" in want or "integer" in want):
            return f"{where}: expected a finite number, got {inst!r}"
        return f"{where}: expected {' or '.join(want) if want else 'another value'}, got {_got(inst)}"
    if v == "enum":
        return f"{where}: {inst!r} is not one of {schema['enum']}"
    if v == "const":
        return f"{where}: expected {schema['const']!r}, got {inst!r}"
    if v == "pattern" and schema.get("description"):
        return f"{where}: {inst!r} is not allowed; expected {schema['description']}"
    bound = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}.get(v)
    if bound:
        return f"{where}: must be {bound} {err.validator_value}, got {inst!r}"
    if v == "minLength" and err.validator_value == 1:
        return f"{where}: expected a non-empty string, got {inst!r}"
    if v in ("minItems", "maxItems"):
        n = err.validator_value
        what = "at least" if v == "minItems" else "at most"
        if schema.get("minItems") == schema.get("maxItems"):
            what = "exactly"
        return f"{where}: expected {what} {n} item{'s' if n != 1 else ''}, got {len(inst)}: {inst!r}"
    return f"{where}: {err.message}"


# schema keywords that step into a sub-schema: (tokens they take in a schema path, instance levels they descend)
_SUBSCHEMA = {"properties": (2, 1), "patternProperties": (2, 1), "prefixItems": (2, 1), "items": (1, 1),
              "additionalProperties": (1, 1), "contains": (1, 1), "anyOf": (2, 0), "oneOf": (2, 0), "allOf": (2, 0),
              "not": (1, 0), "if": (1, 0), "then": (1, 0), "else": (1, 0)}


def _expected_override(schema: dict, err: jsonschema.ValidationError) -> tuple[str, int] | None:
    """(``x-expected`` phrase, instance depth) of the outermost schema along
    the error's schema path that words its own errors (:func:`option`'s
    ``expected``), or None."""
    node: Any = schema
    depth = 0
    tokens = list(err.absolute_schema_path)
    i = 0
    while isinstance(node, dict):
        if "x-expected" in node:
            return node["x-expected"], depth
        if i >= len(tokens) or tokens[i] not in _SUBSCHEMA:
            return None
        n_tokens, levels = _SUBSCHEMA[tokens[i]]
        try:
            node = node[tokens[i]] if n_tokens == 1 else node[tokens[i]][tokens[i + 1]]
        except (KeyError, IndexError, TypeError):
            return None
        depth += levels
        i += n_tokens
    return None


def validate(obj: Any, schema: dict, source: str, prefix: list | tuple = (), error: type[Exception] = ConfigError) -> None:
    """Check ``obj`` against ``schema``; raise ``error`` with one line
    ``SOURCE: field.path: what was expected`` for the most relevant error
    (``prefix``: the path of ``obj`` inside the file)."""
    validator = StrictValidator(schema)
    errors = sorted(validator.iter_errors(obj), key=lambda e: [str(p) for p in e.absolute_path])
    if not errors:
        return
    e = jsonschema.exceptions.best_match(errors)
    over = _expected_override(schema, e)
    if over is not None:
        phrase, depth = over
        path = list(e.absolute_path)[:depth]
        value = obj
        for p in path:
            value = value[p]
        raise error(f"{source}: {field_path([*prefix, *path])}: expected {phrase}, got {value!r}")
    e.path.extendleft(reversed(prefix))  # type: ignore[attr-defined]
    raise error(f"{source}: {describe(e)}")
