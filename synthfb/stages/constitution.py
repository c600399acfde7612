"""The constitution file of Constitutional AI (Bai et al., 2022; spec
section 4) and the small text rules its stages share."""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..data import ROW_ID, yamlio
from ..data.shipped import shipped_dir
from ..llm.prompts import PromptTemplate, find_file

DEFAULT_CONSTITUTION = "pipelines/data/constitution.yaml"  # the shipped one, relative to the synthfb checkout
DEFAULT_FEW_SHOT = "pipelines/data/cai_few_shot.yaml"  # the shipped SL-CAI examples (transcript style's default)


def _shipped(name: Any) -> tuple[Path, ...]:
    # a default names the shipped file; any other path is the user's (absolute or relative to the pipeline's)
    return (shipped_dir("pipelines").parent,) if str(name) in (DEFAULT_CONSTITUTION, DEFAULT_FEW_SHOT) else ()


def _read_yaml(path: Path) -> Any:
    try:
        return yamlio.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 (byte offset {e.start})") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: {yamlio.describe(e)}") from None


# -- the constitution file -------------------------------------------------
@dataclass(frozen=True)
class Principle:
    id: str
    critique: str
    revision: str
    comparison: str


class Constitution:
    """Principles read from a YAML file: ``principles: [{id, critique,
    revision, comparison}, ...]`` (a bare list is accepted too)."""

    def __init__(self, principles: list[Principle], source: str, sha256: str):
        self.principles = principles
        self.by_id = {p.id: p for p in principles}
        self.source = source
        self.sha256 = sha256

    @classmethod
    def load(cls, name: str | Path, base_dir: Path = Path("."),
             need: tuple[str, ...] = ("critique", "revision", "comparison")) -> "Constitution":
        """From a path found by ``Stage.data_file``, or a name resolved like one (against ``base_dir``)."""
        path = find_file(str(name), Path(base_dir), "constitution file", want="file", shipped=_shipped(name))
        raw = path.read_bytes()
        data = _read_yaml(path)
        items = data.get("principles") if isinstance(data, dict) else data
        if not isinstance(items, list) or not items:
            raise ValueError(f"{path}: expected a non-empty list under `principles:`")
        out, seen = [], set()
        for i, it in enumerate(items):
            if not isinstance(it, dict):
                raise ValueError(f"{path}: principles[{i}]: expected a mapping, got {type(it).__name__}")
            pid = str(it.get("id") or f"p{i}")
            if pid in seen:
                raise ValueError(f"{path}: principles[{i}]: duplicate id {pid!r}")
            seen.add(pid)
            for f in need:
                v = it.get(f)
                if not isinstance(v, str) or not v.strip():
                    raise ValueError(f"{path}: principles[{i}] ({pid}): field {f!r} is missing or empty")
            out.append(Principle(pid, *(str(it.get(f) or "").strip() for f in ("critique", "revision", "comparison"))))
        return cls(out, str(path), hashlib.sha256(raw).hexdigest())

    def sample(self, rng: random.Random, k: int = 1) -> list[Principle]:
        """``k`` distinct principles drawn with ``rng`` (stages pass ``ctx.rng(row_id, step)``:
        reproducible, independent of chunking and row order)."""
        return rng.sample(self.principles, min(k, len(self.principles)))


# -- the few-shot file of SL-CAI -------------------------------------------------
ROUND_FIELDS = ("critique_request", "critique", "revision_request", "revision")


def load_examples(path: Path) -> list[dict[str, Any]]:
    """Example critique/revision exchanges from a YAML list: each
    ``{prompt, response, rounds: [{critique_request, critique,
    revision_request, revision}, ...]}``, or one round's four fields at the top
    level (the older flat form). Returned with ``rounds`` always a list."""
    data = _read_yaml(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of example exchanges (an empty list shows none)")
    out = []
    for i, ex in enumerate(data):
        if not isinstance(ex, dict):
            raise ValueError(f"{path}: example {i}: expected a mapping, got {type(ex).__name__}")
        rounds = ex.get("rounds", [{k: ex.get(k) for k in ROUND_FIELDS}])
        if not isinstance(rounds, list) or not rounds:
            raise ValueError(f"{path}: example {i}: `rounds` must be a non-empty list of "
                             f"{{{', '.join(ROUND_FIELDS)}}}")
        miss = [k for k in ("prompt", "response") if not str(ex.get(k) or "").strip()]
        miss += [f"rounds[{j}].{k}" if "rounds" in ex else k for j, r in enumerate(rounds) for k in ROUND_FIELDS
                 if not isinstance(r, dict) or not str(r.get(k) or "").strip()]
        if miss:
            raise ValueError(f"{path}: example {i}: missing field(s) {miss}")
        out.append({"prompt": str(ex["prompt"]).strip(), "response": str(ex["response"]).strip(),
                    "rounds": [{k: str(r[k]).strip() for k in ROUND_FIELDS} for r in rounds]})
    return out


def _text(row: dict[str, Any], col: str, what: str) -> str:
    v = row.get(col)
    if isinstance(v, list) and v and isinstance(v[-1], dict) and "content" in v[-1]:
        v = v[-1]["content"]  # conversational prompt: the last (user) turn
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"row {row.get(ROW_ID)}: column {col!r} ({what}) must be a non-empty string, got {v!r}")
    return v


_LABEL = re.compile(r"^\s*(?:here is (?:the|my|a) )?(?:revised response|revised answer|revision|revised)\s*:\s*",
                    re.IGNORECASE)


def clean_revision(text: str) -> str | None:
    """Strip a leading "Revision:"-style label; None when nothing is left."""
    t = _LABEL.sub("", text.strip(), count=1).strip()
    return t or None


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _check_variables(t: PromptTemplate, need: set[str]) -> None:
    if need - t.variables:
        raise ValueError(f"{t.source}: template must use {sorted(need - t.variables)}")
