"""Prompt templates: Jinja files under ``prompts/``, rendered in a sandbox.

Templates are rendered with ``jinja2.sandbox.SandboxedEnvironment`` and
``StrictUndefined``: a template cannot reach Python internals, and a missing
column is an error that names the row, not an empty string in the prompt.
"""

from __future__ import annotations

import hashlib
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
from jinja2 import meta
from jinja2.sandbox import SandboxedEnvironment

if TYPE_CHECKING:
    from ..llm.types import GenerationRequest, SamplingParams

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
PROMPTS_DIR = REPO_ROOT / "prompts"

_ENV = SandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False, autoescape=False)


def find_file(name: str, base_dir: Path, kind: str = "file") -> Path:
    """Resolve a path from a pipeline file: absolute, relative to the
    pipeline's folder, to the working directory, or to the repo root."""
    p = Path(name).expanduser()
    candidates = [p] if p.is_absolute() else [base_dir / p, Path.cwd() / p, REPO_ROOT / p, PROMPTS_DIR / p]
    for c in candidates:
        if c.exists():
            return c.resolve()
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"{kind} {name!r} not found (looked in: {tried})")


class PromptTemplate:
    """A Jinja template whose variables are row columns."""

    def __init__(self, text: str, source: str = "<inline>"):
        self.text = text
        self.source = source
        try:
            self._ast = _ENV.parse(text)
            self._tpl = _ENV.from_string(text)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"{source}: line {e.lineno}: template syntax error: {e.message}") from e

    @classmethod
    def load(cls, name: str, base_dir: Path) -> "PromptTemplate":
        path = find_file(name, base_dir, "prompt template")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: prompt template is not valid UTF-8") from e
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
        except jinja2.exceptions.SecurityError as e:
            raise ValueError(f"{self.source}: blocked by the template sandbox: {e}") from e


def text_request(text: str, params: "SamplingParams", chat: bool, system: str | None = None) -> "GenerationRequest":
    """A rendered prompt as a request: a user turn (after an optional system
    turn) in chat mode; in completion mode the raw text, with ``system``
    (if any) as a paragraph before it, so it is never dropped silently."""
    from ..llm.types import GenerationRequest

    if not chat:
        return GenerationRequest(prompt=f"{system}\n\n{text}" if system else text, params=params)
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": text})
    return GenerationRequest(messages=messages, params=params)
