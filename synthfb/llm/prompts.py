"""Prompt templates and request building: Jinja files under ``prompts/``,
rendered in a sandbox, turned into :class:`GenerationRequest`.

Templates are rendered with ``jinja2.sandbox.SandboxedEnvironment`` and
``StrictUndefined``: a template cannot reach Python internals, and a missing
column is an error that names the row, not an empty string in the prompt.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import jinja2
from jinja2 import meta, nodes
from jinja2.exceptions import SecurityError
from jinja2.sandbox import SandboxedEnvironment

from ..data.shipped import shipped_dir

from .types import GenerationRequest, SamplingParams

PROMPTS_DIR = shipped_dir("prompts")

_ENV = SandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False, autoescape=False)

# A template is one file: the environment has no loader, so these tags could
# only fail at render time, after the model has loaded.
_NO_LOADER_TAGS = {nodes.Include: "include", nodes.Import: "import", nodes.FromImport: "from ... import",
                   nodes.Extends: "extends"}
SAMPLE_VALUE = "sample"


class _ProbeUndefined(jinja2.ChainableUndefined):
    """Lenient undefined for the load-time probe render (a sample row does
    not have the real rows' shapes), except that an attribute the sandbox
    refuses raises at once."""

    __slots__ = ()

    def __init__(self, hint=None, obj=jinja2.utils.missing, name=None, exc=jinja2.UndefinedError):
        super().__init__(hint, obj, name, exc)
        if exc is SecurityError:
            self._fail_with_undefined_error()


_PROBE_ENV = SandboxedEnvironment(undefined=_ProbeUndefined, keep_trailing_newline=False, autoescape=False)


def find_file(name: str, base_dir: Path, kind: str = "file", *, shipped: Iterable[Path] = (),
              want: Literal["file", "dir"] | None = None) -> Path:
    """Resolve a path named in a pipeline file: absolute, or relative to the
    pipeline's folder, then to each ``shipped`` folder (files that come with
    synthfb, e.g. PROMPTS_DIR for prompt templates). The working directory is
    not searched: a pipeline names the same files wherever it is run from.

    ``want``: the path must be a regular file / a directory (ValueError
    otherwise, naming the path)."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{kind}: expected a path, got {name!r}")
    p = Path(name).expanduser()
    candidates = [p] if p.is_absolute() else [Path(base_dir) / p, *(Path(d) / p for d in shipped)]
    for c in candidates:
        if c.exists():
            c = c.resolve()
            if want == "file" and not c.is_file():
                what = "a directory" if c.is_dir() else "not a regular file"
                raise ValueError(f"{kind} {name!r} is {what}, expected a file: {c}")
            if want == "dir" and not c.is_dir():
                raise ValueError(f"{kind} {name!r} is not a directory: {c}")
            return c
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"{kind} {name!r} not found (looked in: {tried})")


class PromptTemplate:
    """A Jinja template whose variables are row columns.

    Checked when built, so a bad template fails ``synthfb validate`` and not
    the run: syntax; no ``include``/``import``/``extends`` (one file, no
    loader); no attribute the sandbox refuses (dunder names such as
    ``__class__``, found statically anywhere in the template, and any other,
    found by rendering the template once with every variable set to a
    sample string)."""

    def __init__(self, text: str, source: str = "<inline>"):
        self.text = text
        self.source = source
        try:
            self._ast = _ENV.parse(text)
            self._tpl = _ENV.from_string(text)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"{source}: line {e.lineno}: template syntax error: {e.message}") from e
        self._check_static()
        self._probe()

    def _check_static(self) -> None:
        for node_type, tag in _NO_LOADER_TAGS.items():
            for node in self._ast.find_all(node_type):
                raise ValueError(f"{self.source}: line {node.lineno}: {{% {tag} %}} is not supported: a prompt "
                                 f"template is a single file (put the text in this template)")
        for node in self._ast.find_all((nodes.Getattr, nodes.Getitem)):
            attr = node.attr if isinstance(node, nodes.Getattr) else getattr(node.arg, "value", None)
            if isinstance(attr, str) and attr.startswith("__"):
                raise ValueError(f"{self.source}: line {node.lineno}: blocked by the template sandbox: "
                                 f"attribute {attr!r} is unsafe (Python internals are not available)")

    def _probe(self) -> None:
        row = {v: SAMPLE_VALUE for v in meta.find_undeclared_variables(self._ast)}
        try:
            _PROBE_ENV.from_string(self.text).render(**row)
        except SecurityError as e:
            raise ValueError(f"{self.source}: blocked by the template sandbox: {e}") from None
        except Exception:  # noqa: BLE001, S110 - a sample string is not a real row; only the sandbox matters here
            pass

    @classmethod
    def load(cls, name: str, base_dir: Path) -> "PromptTemplate":
        """A template file: absolute, relative to ``base_dir`` (the pipeline's
        folder), or one of synthfb's own in PROMPTS_DIR."""
        path = find_file(name, base_dir, "prompt template", shipped=(PROMPTS_DIR,), want="file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: prompt template is not valid UTF-8") from e
        except OSError as e:
            raise ValueError(f"{path}: cannot read the prompt template ({e.strerror or e})") from e
        return cls(text, str(path))

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    @cached_property
    def variables(self) -> set[str]:
        return set(meta.find_undeclared_variables(self._ast))

    def render(self, row: dict[str, Any], row_id: Any = None) -> str:
        try:
            return self._tpl.render(**row).strip()
        except jinja2.UndefinedError as e:
            raise ValueError(f"{self.source}: row {row_id}: {e.message}") from e
        except SecurityError as e:
            raise ValueError(f"{self.source}: blocked by the template sandbox: {e}") from e


def text_request(text: str, params: SamplingParams, chat: bool, system: str | None = None) -> GenerationRequest:
    """A rendered prompt as a request: a user turn (after an optional system
    turn) in chat mode; in completion mode the raw text, with ``system``
    (if any) as a paragraph before it, so it is never dropped silently."""
    if not chat:
        return GenerationRequest(prompt=f"{system}\n\n{text}" if system else text, params=params)
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": text})
    return GenerationRequest(messages=messages, params=params)
