"""ReAlign's formats file and the text rules of its rewrite (Fan et al., 2024;
specs/methods.md section 3): category parsing, evidence cleaning, the
revised-answer parser and the post-filters that reject a rewrite."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..data import yamlio

CODE_GROUP = "Code"
_BAD_EVIDENCE = ("Missing:", "Duration:", "Posted:")
_NO_RESULT = "No good Google Search Result was found"


# -- formats file -------------------------------------------------------------------

@dataclass(frozen=True)
class Category:
    name: str
    group: str
    description: str
    rewrite: bool
    rag: bool
    format: str | None


def load_formats(path) -> tuple[dict[str, Category], str]:
    """Read and check a formats file; returns (categories, default name).
    Errors name the file and the category."""
    try:
        data = yamlio.safe_load(Path(path).read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 (byte offset {e.start})") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: {yamlio.describe(e)}") from None
    if not isinstance(data, dict) or not isinstance(data.get("categories"), dict) or not data["categories"]:
        raise ValueError(f"{path}: expected a mapping with a non-empty 'categories' mapping")
    cats = {}
    for name, d in data["categories"].items():
        if not re.fullmatch(r"[a-z0-9_]+", str(name)):
            raise ValueError(f"{path}: category {name!r}: names must be lower_snake_case")
        if not isinstance(d, dict):
            raise ValueError(f"{path}: category {name!r}: expected a mapping")
        unknown = set(d) - {"group", "description", "rewrite", "rag", "format"}
        if unknown:
            raise ValueError(f"{path}: category {name!r}: unknown field(s) {sorted(unknown)}")
        rewrite = bool(d.get("rewrite", False))
        fmt = d.get("format")
        if rewrite and not (isinstance(fmt, str) and fmt.strip()):
            raise ValueError(f"{path}: category {name!r}: rewrite is true but no format is given")
        cats[name] = Category(name, str(d.get("group", "")), str(d.get("description", "")), rewrite,
                              bool(d.get("rag", False)), fmt.strip() if isinstance(fmt, str) else None)
    default = data.get("default_category", "default")
    if default not in cats:
        raise ValueError(f"{path}: default_category {default!r} is not one of the categories")
    return cats, default


# -- parsers and filters (pure) ------------------------------------------------------

def parse_category(text: str, names: list[str]) -> str | None:
    """The category a classifier answer names, or None.

    Exact match after normalising (case, spaces/hyphens -> '_', quotes and
    trailing punctuation removed); otherwise the category name that occurs
    earliest in the answer as a whole word (longest first on ties)."""
    if not isinstance(text, str) or not text.strip():
        return None
    first = text.strip().splitlines()[0]
    norm = re.sub(r"[\s\-]+", "_", first.strip().strip("\"'`*.:;,!").strip().lower())
    if norm in names:
        return norm
    low = text.lower()
    best = None
    for name in names:
        pat = r"[_\s\-]+".join(re.escape(part) for part in name.split("_"))
        m = re.search(r"(?<![a-z0-9_])" + pat + r"(?![a-z0-9_])", low)
        if m and (best is None or (m.start(), -len(name)) < (best[0], -len(best[1]))):
            best = (m.start(), name)
    return best[1] if best else None


def clean_evidence(evidence: Any) -> list[str]:
    """Evidence items as a list, minus the reference code's junk snippets."""
    if evidence is None:
        return []
    items = [evidence] if isinstance(evidence, str) else list(evidence)
    out = []
    for e in items:
        if not isinstance(e, str):
            continue
        e = e.strip()
        if not e or e == _NO_RESULT or e.startswith(_BAD_EVIDENCE):
            continue
        out.append(e)
    return out


def parse_revised(text: str) -> str | None:
    """The text after 'Revised response:' (without a trailing reasoning
    part or our delimiters), or None when the marker is missing or empty."""
    if not isinstance(text, str) or "Revised response:" not in text:
        return None
    rest = text.split("Revised response:", 1)[1]
    rest = rest.split("Reasoning:", 1)[0]
    rest = re.sub(r"^\s*\[Response start\]", "", rest)
    rest = re.sub(r"\[Response end\]\s*$", "", rest.rstrip())
    rest = rest.strip()
    return rest or None


def has_code(text: str) -> bool:
    """Code as the reference detects it: a fence, or both 'def ' and 'return '."""
    return "```" in text or ("def " in text and "return " in text)


def word_count(text: str) -> int:
    return len(text.split())


def edit_rate(original: str, revised: str) -> float:
    """Word-level Levenshtein distance divided by the original's word count
    (the paper counts a response as rewritten when this is > 0.2)."""
    a, b = original.split(), revised.split()
    if not a:
        return float(len(b) > 0)
    prev = list(range(len(b) + 1))
    for i, wa in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, wb in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (wa != wb))
        prev = cur
    return prev[-1] / len(a)


def rewrite_reject_reason(category: Category, query: str, original: str, revised: str | None,
                          min_length_ratio: float = 0.5) -> str | None:
    """Why a rewrite must fall back to the original, or None to accept it.

    Order: unparseable; leftover marker; length (<= ratio x original words);
    code/no-code mismatch (Code group); planning without 'plan' in the query;
    a short original answer (<= 5 chars, e.g. a choice letter or a number)
    that does not appear as a standalone token in the rewrite."""
    if revised is None:
        return "unparseable_rewrite"
    if "Revised response" in revised:
        return "leftover_marker"
    if word_count(revised) <= min_length_ratio * word_count(original):
        return "rewrite_too_short"
    if category.group == CODE_GROUP and has_code(original) != has_code(revised):
        return "code_mismatch"
    if category.name == "planning" and "plan" not in query and "Plan" not in query:
        return "planning_query_without_plan"
    short = original.strip()
    if 0 < len(short) <= 5 and short not in ("True", "False"):
        if not re.search(r"(?<!\w)" + re.escape(short.rstrip(".")) + r"(?!\w)", revised):
            return "short_answer_missing"
    return None
