"""ReAlign (Fan et al., 2024): reformat responses to a per-category format.

* ``realign_classify``: an LLM classifier picks one task category per query.
  ``scoring: logprobs`` (default on local engines) scores every category
  name as the continuation after the prompt's ``Category:`` line and takes
  the most probable one (:class:`synthfb.rank.label_scores.LabelScorer`; the
  name's full log-probability, renormalised over the categories, is kept in
  ``category_prob``); ``scoring: text`` samples an answer and parses it (API
  models; an answer that names no known category -> the default category,
  counted as ``unknown_category``).
* ``realign_rewrite``: for categories marked ``rewrite`` in the formats file,
  asks for an adaptive rewrite (keep the response if the format does not
  fit), optionally with evidence from a column and/or the top-k BM25
  snippets for the query from a local corpus (``retrieval_corpus``; the
  paper's Google top-5 for its knowledge-intensive categories), picks the longest of ``n``
  candidates and applies the post-filters; a rejected rewrite falls back to
  the original. Other categories pass through untouched (tag ``original``).
  Its rows are SFT rows: ``prompt`` the query (user turn), ``completion`` the
  final response (rewritten or original); see :func:`synthfb.data.trl.sft_row`.

Formats live in a YAML data file (``pipelines/data/realign_formats.yaml``).
See specs/methods.md section 3.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ..data import PROVENANCE, ROW_ID
from ..data.trl import SFT_COLUMNS, sft_row
from ..data.shipped import shipped_dir
from ..engine.stage import Ask, ModelConfig, ModelStage, StageContext, config_field
from ..llm.types import ScoreResult
from ..rank.label_scores import SCORING_MODES, LabelScorer, resolve_scoring
from .retrieval import SnippetCorpus
from .realign_formats import (CODE_GROUP, Category, clean_evidence, edit_rate, has_code,  # noqa: F401
                              load_formats, parse_category, parse_revised, rewrite_reject_reason, word_count)

DEFAULT_FORMATS = "data/realign_formats.yaml"


# -- stages --------------------------------------------------------------------------

class _FormatsStage(ModelStage):
    """Both ReAlign stages: the formats file (a data file, hashed into the
    fingerprint)."""

    def _load_formats(self) -> None:
        # the default names the shipped file (pipelines/data/); any other path is the user's
        shipped = (shipped_dir("pipelines"),) if self.config.formats == DEFAULT_FORMATS else ()
        self.path = self.data_file("formats", "formats file", shipped=shipped)
        with config_field("formats"):
            self.cats, self.default = load_formats(self.path)


@dataclass
class ClassifyConfig(ModelConfig):
    query_column: str = field(default="instruction", metadata={"help": "column holding the user query"})
    output_column: str = field(default="category", metadata={"help": "column written"})
    formats: str = field(default=DEFAULT_FORMATS, metadata={"help": "categories/formats data file"})
    prompt: str = field(default="realign_classify.jinja", metadata={"help": "classifier prompt (variables: query, categories)"})
    chat: bool = field(default=True, metadata={"help": "send as a chat message (false: raw completion)"})
    keep_existing: bool = field(default=True, metadata={"help": "rows that already hold a known category are not re-classified"})
    scoring: Literal["auto", "logprobs", "text"] = field(default="auto", metadata={
        "help": "logprobs: score each category name as the continuation after 'Category:' and take the most probable "
                "(nothing parsed; sampling unused); text: sample an answer and parse the name (API models); auto: "
                "logprobs on vllm/transformers, text otherwise"})


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
        if config.scoring not in SCORING_MODES:
            raise ValueError(f"scoring: expected one of {list(SCORING_MODES)}, got {config.scoring!r}")
        names = list(self.cats)
        self.scorer = LabelScorer(names, "Category:", chat=config.chat, values=range(len(names)))

    def scoring(self, ctx: StageContext) -> str:
        """``logprobs`` or ``text``: the ``scoring`` option on this stage's backend."""
        return resolve_scoring(self.config.scoring, ctx.generator(self.model_name()).info.backend)

    def required_columns(self) -> set[str]:
        return {self.config.query_column}

    def output_columns(self, input_columns: list[str]) -> list[str]:
        new = [self.config.output_column] + (["category_prob"] if self.config.scoring != "text" else [])
        cols = [c for c in input_columns if c not in (PROVENANCE, *new)]
        return cols + new + [PROVENANCE]

    def requests(self, row: dict[str, Any], ctx: StageContext) -> Any:
        c = self.config
        if c.keep_existing and row.get(c.output_column) in self.cats:
            ctx.stats.add("already_classified")
            return None  # passes through untouched
        q = row.get(c.query_column)
        if not isinstance(q, str):
            raise ValueError(f"row {row.get(ROW_ID)!r}: column {c.query_column!r} must be text")
        text = self.template.render({"query": q, "categories": self.cat_list}, row.get(ROW_ID))
        if self.scoring(ctx) == "logprobs":  # every category name, batched with the chunk's other rows
            return Ask(self.scorer.requests(text))
        return Ask(self.chat(text, self.params, chat=c.chat), partial=True)  # a failed request: the default

    def parse(self, row: dict[str, Any], res: Any, ctx: StageContext) -> dict[str, Any]:
        prob: dict[str, Any] = {}
        if isinstance(res, list) and res and isinstance(res[0], ScoreResult):
            read = self.scorer.read(res)
            name = self.scorer.labels[int(read.top)] if read.ok else None
            prob = {"category_prob": read.probs[name] if name else None}
            ctx.stats.add("scored_from_logprobs")
        else:
            name = None if res.error else parse_category(res.completions[0].text, list(self.cats))
        if not (getattr(res, "error", None)):  # a failed request is no output (counted as failed_requests)
            ctx.stats.add("outputs")
            ctx.stats.add("parsed", int(name is not None))
        if name is None:
            ctx.stats.add("unknown_category")
            name = self.default
        ctx.stats.add(f"category_{name}")
        return {self.config.output_column: name, **prob}


@dataclass
class RewriteConfig(ModelConfig):
    query_column: str = field(default="instruction", metadata={"help": "column holding the user query"})
    response_column: str = field(default="output", metadata={"help": "column holding the response to reformat (replaced)"})
    category_column: str = field(default="category", metadata={"help": "column with the task category"})
    evidence_column: str | None = field(default=None, metadata={"help": "optional column of evidence text(s), used for rag categories"})
    formats: str = field(default=DEFAULT_FORMATS, metadata={"help": "categories/formats data file"})
    retrieval_corpus: str | None = field(default=None, metadata={
        "help": "data file of evidence snippets (.jsonl/.json/.csv/.parquet with a `text` column and an optional "
                "`id` column): the retrieval_k best BM25 matches for the query are added to the evidence of "
                "retrieval categories (needs the bm25s package: synthfb[retrieval])"})
    retrieval_categories: list[str] | None = field(default=None, metadata={
        "help": "categories that get retrieved evidence (default: those marked `rag` in the formats file, the "
                "paper's knowledge-intensive ones)"})
    retrieval_k: int = field(default=5, metadata={"help": "snippets retrieved per query (the paper's top-5)"})
    system_prompt: str = field(default="realign_system.jinja", metadata={"help": "system prompt (variables: adaptive, with_evidence)"})
    prompt: str = field(default="realign_rewrite.jinja", metadata={"help": "user prompt (variables: query, response, format, evidence)"})
    adaptive: bool = field(default=True, metadata={"help": "let the model keep the response when the format does not fit"})
    chat: bool = field(default=True, metadata={"help": "send as chat messages (false: raw completion)"})
    prefill: str = field(default="", metadata={"help": "completion mode only: appended to the prompt and put back before parsing (e.g. 'Revised response:' for small models)"})
    n: int = field(default=2, metadata={"help": "candidates per row; the longest parsable one is used"})
    min_length_ratio: float = field(default=0.5, metadata={"help": "a rewrite with <= this x the original's words keeps the original"})
    max_input_chars: int = field(default=6000, metadata={"help": "rows with a longer query+response pass through untouched (counted)"})
    format: Literal["conversational", "standard"] = field(default="conversational", metadata={
        "help": "TRL format of the SFT columns prompt/completion (query -> final response): conversational "
                "(message lists) or standard (strings)"})


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
        self.corpus: SnippetCorpus | None = None
        if config.retrieval_corpus is not None:
            path = self.data_file("retrieval_corpus", "retrieval corpus")
            with config_field("retrieval_corpus"):
                self.corpus = SnippetCorpus(path)
        cats = config.retrieval_categories
        if cats is not None:
            if config.retrieval_corpus is None:
                raise ValueError("retrieval_categories: needs retrieval_corpus")
            unknown = [x for x in cats if x not in self.cats]
            if unknown:
                raise ValueError(f"retrieval_categories: {unknown} not in the formats file {self.path}")
        self.retrieval_cats = set(cats) if cats is not None else {k for k, v in self.cats.items() if v.rag}
        if config.retrieval_k < 1:
            raise ValueError(f"retrieval_k: must be >= 1, got {config.retrieval_k}")

    def required_columns(self) -> set[str]:
        c = self.config
        cols = {c.query_column, c.response_column, c.category_column}
        return cols | ({c.evidence_column} if c.evidence_column else set())

    def output_columns(self, input_columns: list[str]) -> list[str]:
        new = ["original_response", "realign_tag", "realign_reason", "edit_rate",
               *(["retrieved_ids"] if self.corpus is not None else []), *SFT_COLUMNS]
        return [c for c in input_columns if c not in (*new, PROVENANCE)] + new + [PROVENANCE]

    def run(self, row: dict[str, Any], ctx: StageContext):
        """The rewrite (or the original), plus the SFT columns: query -> final response."""
        c = self.config
        new = yield from self._rewrite(row, ctx)
        final = new.get(c.response_column, row[c.response_column])
        return {**new, **sft_row(row[c.query_column], final, None, c.format)}

    def _rewrite(self, row: dict[str, Any], ctx: StageContext):
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
        if self.corpus is not None:
            original["retrieved_ids"] = []
        # `rewrite` is checked before the format is looked up (reference KeyError)
        skip = "category_not_rewritten" if not cat.rewrite else \
            "input_too_long" if len(q) + len(orig) > c.max_input_chars else None
        if skip:
            ctx.stats.add(skip)
            return {**original, "realign_reason": skip}
        evidence = clean_evidence(row.get(c.evidence_column)) if (c.evidence_column and cat.rag) else []
        if self.corpus is not None and name in self.retrieval_cats:
            hits = self.corpus.search(q, c.retrieval_k)
            original["retrieved_ids"] = [self.corpus.ids[i] for i, _ in hits]
            evidence += [self.corpus.texts[i] for i, _ in hits]
            ctx.stats.add("retrieved" if hits else "retrieved_nothing")
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
