"""ReAlign (Fan et al., 2024): reformat responses to a per-category format.

* ``realign_classify``: an LLM classifier picks one task category per query
  (an answer that names no known category -> the default category, counted).
* ``realign_rewrite``: for categories marked ``rewrite`` in the formats file,
  asks for an adaptive rewrite (keep the response if the format does not
  fit), optionally with evidence from a column, picks the longest of ``n``
  candidates and applies the post-filters; a rejected rewrite falls back to
  the original. Other categories pass through untouched (tag ``original``).

Formats live in a YAML data file (``pipelines/data/realign_formats.yaml``).
See specs/methods.md section 3.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..data import PROVENANCE, ROW_ID, yamlio
from ..data.shipped import shipped_dir
from ..engine.stage import Ask, ModelConfig, ModelStage, StageContext, config_field

DEFAULT_FORMATS = "data/realign_formats.yaml"

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


# -- stages --------------------------------------------------------------------------

class _FormatsStage(ModelStage):
    """Both ReAlign stages: the formats file (a data file, hashed into the
    fingerprint) and output rows in input order."""

    def _load_formats(self) -> None:
        # the default names the shipped file (pipelines/data/); any other path is the user's
        shipped = (shipped_dir("pipelines"),) if self.config.formats == DEFAULT_FORMATS else ()
        self.path = self.data_file("formats", "formats file", shipped=shipped)
        with config_field("formats"):
            self.cats, self.default = load_formats(self.path)

    def process(self, rows: list[dict[str, Any]], ctx: StageContext) -> list[dict[str, Any]]:
        # the driver emits rows that ask the model nothing first; keep the input order
        pos = {r.get(ROW_ID): i for i, r in enumerate(rows)}
        return sorted(super().process(rows, ctx), key=lambda r: pos.get(r.get(ROW_ID), len(pos)))


@dataclass
class ClassifyConfig(ModelConfig):
    query_column: str = field(default="instruction", metadata={"help": "column holding the user query"})
    output_column: str = field(default="category", metadata={"help": "column written"})
    formats: str = field(default=DEFAULT_FORMATS, metadata={"help": "categories/formats data file"})
    prompt: str = field(default="realign_classify.jinja", metadata={"help": "classifier prompt (variables: query, categories)"})
    chat: bool = field(default=True, metadata={"help": "send as a chat message (false: raw completion)"})
    keep_existing: bool = field(default=True, metadata={"help": "rows that already hold a known category are not re-classified"})


class RealignClassifyStage(_FormatsStage):
    """Assigns each query one category from the formats file; answers that
    name no category (or failed requests) become the default category
    (``unknown_category``)."""

    kind = "realign_classify"
    Config = ClassifyConfig
    sampling_defaults = {"temperature": 0.0, "max_tokens": 50}

    def __init__(self, config: ClassifyConfig, base_dir):
        super().__init__(config, base_dir)
        self._load_formats()
        self.template = self.load_template("prompt")
        self.params = self.sampling()
        self.cat_list = [{"name": k, "description": v.description} for k, v in self.cats.items()]

    def required_columns(self) -> set[str]:
        return {self.config.query_column}

    def output_columns(self, input_columns: list[str]) -> list[str]:
        cols = [c for c in input_columns if c not in (PROVENANCE, self.config.output_column)]
        return cols + [self.config.output_column, PROVENANCE]

    def requests(self, row: dict[str, Any], ctx: StageContext) -> Any:
        c = self.config
        if c.keep_existing and row.get(c.output_column) in self.cats:
            ctx.stats.add("already_classified")
            return None  # passes through untouched
        q = row.get(c.query_column)
        if not isinstance(q, str):
            raise ValueError(f"row {row.get(ROW_ID)!r}: column {c.query_column!r} must be text")
        text = self.template.render({"query": q, "categories": self.cat_list}, row.get(ROW_ID))
        return Ask(self.chat(text, self.params, chat=c.chat), partial=True)  # a failed request: the default

    def parse(self, row: dict[str, Any], res: Any, ctx: StageContext) -> dict[str, Any]:
        name = None if res.error else parse_category(res.completions[0].text, list(self.cats))
        if name is None:
            ctx.stats.add("unknown_category")
            name = self.default
        ctx.stats.add(f"category_{name}")
        return {self.config.output_column: name}


@dataclass
class RewriteConfig(ModelConfig):
    query_column: str = field(default="instruction", metadata={"help": "column holding the user query"})
    response_column: str = field(default="output", metadata={"help": "column holding the response to reformat (replaced)"})
    category_column: str = field(default="category", metadata={"help": "column with the task category"})
    evidence_column: str | None = field(default=None, metadata={"help": "optional column of evidence text(s), used for rag categories"})
    formats: str = field(default=DEFAULT_FORMATS, metadata={"help": "categories/formats data file"})
    system_prompt: str = field(default="realign_system.jinja", metadata={"help": "system prompt (variables: adaptive, with_evidence)"})
    prompt: str = field(default="realign_rewrite.jinja", metadata={"help": "user prompt (variables: query, response, format, evidence)"})
    adaptive: bool = field(default=True, metadata={"help": "let the model keep the response when the format does not fit"})
    chat: bool = field(default=True, metadata={"help": "send as chat messages (false: raw completion)"})
    prefill: str = field(default="", metadata={"help": "completion mode only: appended to the prompt and put back before parsing (e.g. 'Revised response:' for small models)"})
    n: int = field(default=2, metadata={"help": "candidates per row; the longest parsable one is used"})
    min_length_ratio: float = field(default=0.5, metadata={"help": "a rewrite with <= this x the original's words keeps the original"})
    max_input_chars: int = field(default=6000, metadata={"help": "rows with a longer query+response pass through untouched (counted)"})


class RealignRewriteStage(_FormatsStage):
    """Reformats responses of rewritable categories; everything else, and
    every rejected rewrite or failed request, keeps the original response
    (no row is ever dropped). Adds ``original_response``, ``realign_tag``
    (rewrite/original), ``realign_reason`` and ``edit_rate``."""

    kind = "realign_rewrite"
    Config = RewriteConfig
    sampling_defaults = {"temperature": 0.3, "top_p": 0.1, "max_tokens": 1024}  # T and top_p as in the paper

    def __init__(self, config: RewriteConfig, base_dir):
        super().__init__(config, base_dir)
        self._load_formats()
        self.system = self.load_template("system_prompt")
        self.template = self.load_template("prompt")
        if config.prefill and config.chat:
            raise ValueError("prefill needs chat: false (a chat request cannot start the assistant's reply)")
        self.params = self.sampling(n="n")

    def required_columns(self) -> set[str]:
        c = self.config
        cols = {c.query_column, c.response_column, c.category_column}
        return cols | ({c.evidence_column} if c.evidence_column else set())

    def output_columns(self, input_columns: list[str]) -> list[str]:
        new = ["original_response", "realign_tag", "realign_reason", "edit_rate"]
        return [c for c in input_columns if c not in (*new, PROVENANCE)] + new + [PROVENANCE]

    def run(self, row: dict[str, Any], ctx: StageContext):
        c = self.config
        q, orig = row.get(c.query_column), row.get(c.response_column)
        if not isinstance(q, str) or not isinstance(orig, str):
            raise ValueError(f"row {row.get(ROW_ID)!r}: columns {c.query_column!r} and {c.response_column!r} must be text")
        name = row.get(c.category_column)
        if name not in self.cats:
            ctx.stats.add("unknown_category_as_default")
            name = self.default
        cat = self.cats[name]
        original = {"original_response": orig, "realign_tag": "original", "edit_rate": 0.0}
        # `rewrite` is checked before the format is looked up (reference KeyError)
        skip = "category_not_rewritten" if not cat.rewrite else \
            "input_too_long" if len(q) + len(orig) > c.max_input_chars else None
        if skip:
            ctx.stats.add(skip)
            return {**original, "realign_reason": skip}
        evidence = clean_evidence(row.get(c.evidence_column)) if (c.evidence_column and cat.rag) else []
        if evidence:
            ctx.stats.add("with_evidence")
        system = self.system.render({"adaptive": c.adaptive, "with_evidence": bool(evidence)}, row.get(ROW_ID))
        text = self.template.render({"query": q, "response": orig, "format": cat.format, "evidence": evidence},
                                    row.get(ROW_ID))
        res = yield Ask(self.chat(f"{text}\n{c.prefill}" if c.prefill else text, self.params, system, c.chat),
                        partial=True)
        if res.error:  # counted and recorded by the context; --resume retries the row
            return {**original, "realign_reason": "failed_request"}
        candidates = [parse_revised(f"{c.prefill} {comp.text.lstrip()}" if c.prefill else comp.text)
                      for comp in res.completions]
        ctx.stats.add("unparseable_candidates", sum(x is None for x in candidates))
        parsed = [x for x in candidates if x is not None]
        revised = max(parsed, key=word_count) if parsed else None  # longest, first on ties
        reason = rewrite_reject_reason(cat, q, orig, revised, c.min_length_ratio)
        if reason is not None:
            ctx.stats.add(f"kept_original_{reason}")
            return {**original, "realign_reason": reason}
        rate = float(edit_rate(orig, revised))
        ctx.stats.add("rewritten")
        if rate > 0.2:
            ctx.stats.add("rewritten_edit_rate_over_0.2")
        return {**original, c.response_column: revised, "realign_tag": "rewrite", "edit_rate": rate,
                "realign_reason": ""}
