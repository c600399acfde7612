"""Instruction backtranslation (Humpback, Li et al., 2023) as pipeline stages.

* ``backtranslation_segments`` (no model): documents -> self-contained
  segments (text after a header), with the length / line / header-caps
  filters and exact dedupe; every drop is counted.
* ``backtranslate``: the backward direction, segment -> instruction.
* ``self_curate``: the 5-point quality rating; keep rows rated >=
  ``min_score``. ``scoring: logprobs`` (default on local engines) reads the
  rating as the probability-weighted mean over "1".."5" after "Score:"
  (G-Eval; :mod:`synthfb.rank.label_scores`), ``scoring: text`` samples
  ``num_ratings`` ratings and parses them robustly (average of the
  parsable ones; API models).
* ``source_tag``: adds the seed/augmented tag columns (S_a / S_w) to any
  rows, e.g. the seed set that trainers mix with the curated data.

``backtranslate``, ``self_curate`` and ``source_tag`` (on instruction/output
rows) write SFT rows (:func:`sft_pair`): ``prompt`` is the instruction as the
user turn after the row's ``system_tag`` (the paper's S_a / S_w sentence) as
the system message, ``completion`` the segment (output).

A second Humpback iteration is the same pipeline with ``self_curate.model``
pointing at the improved model. See specs/methods.md section 2.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from ..data import PROVENANCE, ROW_ID
from ..data.trl import SFT_COLUMNS
from ..engine.stage import Ask, Drop, ModelConfig, ModelStage, StageContext
from ..llm.types import ScoreResult
from ..rank.label_scores import SCORING_MODES, LabelScorer, resolve_scoring
from .backtranslation_data import (AUGMENTED_TAG, SEED_TAG, TAGS, SegmentsConfig, SegmentsStage,  # noqa: F401
                                   SourceTagConfig, SourceTagStage, caps_ratio, segment_drop_reason, sft_pair,
                                   split_segments)


def clean_generated_instruction(text: str) -> str | None:
    """The instruction a backward model wrote, or None if there is none.

    Drops a leading label ("Instruction:", "User:"), surrounding quotes and
    anything after a blank line (models tend to start answering)."""
    if not isinstance(text, str):
        return None
    t = text.strip()
    t = re.sub(r"^(?:\*\*)?(?:instruction|user instruction|user|question|request)(?:\*\*)?\s*:\s*(?:\*\*)?\s*", "", t,
               flags=re.I)
    t = re.split(r"\n\s*\n", t, maxsplit=1)[0].strip()
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "\"'":
        t = t[1:-1].strip()
    return t or None


@dataclass
class BacktranslateConfig(ModelConfig):
    output_column: str = field(default="output", metadata={"help": "column holding the segment (the answer)"})
    prompt: str = field(default="backtranslation_backward.jinja", metadata={"help": "prompt template (variables: output, chat)"})
    chat: bool = field(default=True, metadata={"help": "send as a chat message (false: raw completion)"})
    min_instruction_chars: int = field(default=10, metadata={"help": "drop shorter instructions (Spico's repro: 10)"})
    max_instruction_chars: int = field(default=800, metadata={"help": "drop longer instructions (Spico's repro: 800)"})
    drop_truncated: bool = field(default=True, metadata={"help": "drop instructions that hit max_tokens (counted either way)"})
    format: Literal["conversational", "standard"] = field(default="conversational", metadata={
        "help": "TRL format of the SFT columns prompt/completion (system tag S_w, instruction -> segment): "
                "conversational (message lists) or standard (strings, the tag a paragraph before the instruction)"})


class BacktranslateStage(ModelStage):
    """Backward direction ``p(x|y)``: writes the instruction a segment would
    answer; rows get ``instruction`` and the augmented source tag. The
    ``model`` is the backward model (a prompted base model or one trained on
    reversed seed pairs)."""

    kind = "backtranslate"
    Config = BacktranslateConfig
    sampling_defaults = {"temperature": 0.7, "top_p": 0.9, "max_tokens": 128}

    def __init__(self, config: BacktranslateConfig, base_dir):
        super().__init__(config, base_dir)
        self.params = self.sampling()
        self.template = self.load_template("prompt")

    def required_columns(self) -> set[str]:
        return {self.config.output_column}

    def output_columns(self, input_columns: list[str]) -> list[str]:
        new = ["instruction", "source", "system_tag", *SFT_COLUMNS]
        return [c for c in input_columns if c not in (PROVENANCE, *new)] + new + [PROVENANCE]

    def requests(self, row: dict[str, Any], ctx: StageContext) -> Any:
        c = self.config
        return self.chat(self.template.render({"output": row[c.output_column], "chat": c.chat}, row.get(ROW_ID)),
                         self.params, chat=c.chat)

    def parse(self, row: dict[str, Any], res: Any, ctx: StageContext) -> Any:
        c = self.config
        comp = res.completions[0]  # hitting max_tokens is counted by the context (truncated_outputs)
        inst = clean_generated_instruction(comp.text)
        if comp.finish_reason == "length" and c.drop_truncated:
            return Drop("instruction_truncated")
        if inst is None:
            return Drop("instruction_empty")
        if len(inst) < c.min_instruction_chars:
            return Drop("instruction_too_short")
        if len(inst) > c.max_instruction_chars:
            return Drop("instruction_too_long")
        return {"instruction": inst, "source": "augmented", "system_tag": AUGMENTED_TAG,
                **sft_pair(inst, row[c.output_column], AUGMENTED_TAG, c.format)}


# -- self-curation ------------------------------------------------------------------

def with_prefill(prompt: str, prefill: str) -> str:
    """A completion prompt that already starts the answer with ``prefill``."""
    return f"{prompt}\n{prefill}" if prefill else prompt


def put_back_prefill(prefill: str, completion: str) -> str:
    """The answer as the model 'wrote' it: ``prefill`` + the completion."""
    return f"{prefill} {completion.lstrip()}" if prefill else completion


_SCORE = re.compile(r"\b(?:score|rating)(?:\s+is)?\s*[:=]\s*\**\s*(\d+(?:\.\d+)?)\s*(?:/\s*5|out of 5)?\s*\**\s*\.?\s*$",
                    re.I)


def parse_rating(text: str) -> int | None:
    """The 1-5 rating from a curation answer, or None.

    Looks for a ``Score: N`` line (also "Rating: N", "The score is: N") from
    the last line upwards (the prompt asks for it last). Only a whole number 1..5 counts: "Score: 10502",
    "Score: 4.5", "Score: 0" and missing scores give None."""
    if not isinstance(text, str):
        return None
    for line in reversed(text.strip().splitlines()):
        m = _SCORE.search(line.strip())
        if m:
            val = m.group(1)
            if "." in val:
                return None
            n = int(val)
            return n if 1 <= n <= 5 else None
    return None


@dataclass
class CurateConfig(ModelConfig):
    instruction_column: str = field(default="instruction", metadata={"help": "column with the (generated) instruction"})
    output_column: str = field(default="output", metadata={"help": "column with the candidate answer"})
    prompt: str = field(default="backtranslation_curate.jinja", metadata={"help": "rating prompt (variables: instruction, output, chat; score_only is true under logprobs scoring)"})
    chat: bool = field(default=True, metadata={"help": "send as a chat message (false: raw completion)"})
    prefill: str = field(default="", metadata={"help": "completion mode only: appended to the prompt and put back before parsing (e.g. 'Score:' for small models)"})
    num_ratings: int = field(default=1, metadata={"help": "ratings sampled per row; the score is the mean of the parsable ones"})
    min_score: float = field(default=4.5, metadata={"help": "keep rows whose score is >= this (paper section 3.3: A_5 is score >= 4.5, i.e. a rating of 5; A_4 uses 4)"})
    drop: bool = field(default=True, metadata={"help": "drop rows below min_score (false: keep all with the score, for histograms)"})
    system_column: str | None = field(default="system_tag", metadata={
        "help": "column whose text (Humpback's S_a / S_w tag) becomes the system message of the SFT prompt; rows "
                "without it (or null) get none"})
    format: Literal["conversational", "standard"] = field(default="conversational", metadata={
        "help": "TRL format of the SFT columns prompt/completion (instruction -> output): conversational (message "
                "lists) or standard (strings, the tag a paragraph before the instruction)"})
    scoring: Literal["auto", "logprobs", "text"] = field(default="auto", metadata={
        "help": "logprobs: the score is the probability-weighted mean over the ratings 1-5 read from log-probs after "
                "'Score:' (G-Eval; num_ratings/sampling unused); text: sample num_ratings ratings and parse them (API "
                "models); auto: logprobs on vllm/transformers, text otherwise"})
    rating: Literal["mean", "mode"] = field(default="mean", metadata={
        "help": "logprobs scoring only: mean: the score is the expected rating sum_r p(r) * r (G-Eval); mode: the most "
                "probable rating, the one integer the model would write greedily if it could only write 1-5 (the "
                "paper's single rating); min_score applies to either"})


CURATION_LABELS = ("1", "2", "3", "4", "5")


class SelfCurateStage(ModelStage):
    """Rates each (instruction, output) on the 5-point rubric with the
    curation model M_t (a later iteration names the improved model).
    Unparsable ratings are counted (``unparseable_ratings``); rows with none
    parsable are counted as ``unrated`` (and dropped: ``dropped_unrated``).
    Adds ``curation_score`` and ``curation_ratings`` (None where a rating
    could not be read).

    With ``scoring: logprobs`` one score call per row reads the five labels
    (continuations "Score: 1".."Score: 5" in chat, " 1".." 5" after
    "...\nScore:" in completion mode); ``curation_score`` is the expected
    rating ``sum_r p(r) * r`` with p renormalised over 1..5,
    ``curation_ratings`` the most probable rating (counted as
    ``rating_<r>``) and ``curation_probs`` the five probabilities. The
    threshold is unchanged: keep ``curation_score >= min_score`` (default
    4.5, the paper's A_5 "score >= 4.5", which for one integer rating is
    "== 5"; the shipped pipeline keeps A_4, >= 4). ``rating: mode`` makes
    the score the most probable rating instead (greedy decoding restricted to
    the five labels: the one integer rating the paper's curator writes).
    Every rating read counts under ``outputs``, each usable one under
    ``parsed``."""

    kind = "self_curate"
    Config = CurateConfig
    sampling_defaults = {"temperature": 0.7, "top_p": 0.9, "max_tokens": 256}

    def __init__(self, config: CurateConfig, base_dir):
        super().__init__(config, base_dir)
        if config.num_ratings < 1:
            raise ValueError("num_ratings must be >= 1")
        if config.rating not in ("mean", "mode"):
            raise ValueError(f"rating: expected 'mean' or 'mode', got {config.rating!r}")
        if config.prefill and config.chat:
            raise ValueError("prefill needs chat: false (a chat request cannot start the assistant's reply)")
        self.params = self.sampling(n="num_ratings")
        self.template = self.load_template("prompt")
        if config.scoring not in SCORING_MODES:
            raise ValueError(f"scoring: expected one of {list(SCORING_MODES)}, got {config.scoring!r}")
        # logprobs: raw prompts end with "\n<prefill or Score:>" and score " 1".." 5"; chat scores "Score: 1"..
        self.scorer = LabelScorer(CURATION_LABELS, config.prefill or "Score:", chat=config.chat)

    def scoring(self, ctx: StageContext) -> str:
        """``logprobs`` or ``text``: the ``scoring`` option on this stage's backend."""
        return resolve_scoring(self.config.scoring, ctx.generator(self.model_name()).info.backend)

    def required_columns(self) -> set[str]:
        return {self.config.instruction_column, self.config.output_column}

    def output_columns(self, input_columns: list[str]) -> list[str]:
        new = ["curation_score", "curation_ratings", *(["curation_probs"] if self.config.scoring != "text" else []),
               *SFT_COLUMNS]
        return [c for c in input_columns if c not in (PROVENANCE, *new)] + new + [PROVENANCE]

    def _sft(self, row: dict[str, Any]) -> dict[str, Any]:
        """The SFT columns of a kept row: instruction -> output, the row's tag as the system message."""
        c = self.config
        tag = row.get(c.system_column) if c.system_column else None
        return sft_pair(row[c.instruction_column], row[c.output_column], tag if isinstance(tag, str) else None,
                        c.format)

    def requests(self, row: dict[str, Any], ctx: StageContext) -> Any:
        c = self.config
        logprobs = self.scoring(ctx) == "logprobs"
        text = self.template.render({"instruction": row[c.instruction_column], "output": row[c.output_column],
                                     "chat": c.chat, "score_only": logprobs}, row.get(ROW_ID))
        if logprobs:  # the five labels, batched with the chunk's other rows in one score call
            return Ask(self.scorer.requests(text))
        return self.chat(with_prefill(text, c.prefill), self.params, chat=c.chat)

    def parse(self, row: dict[str, Any], res: Any, ctx: StageContext) -> Any:
        c = self.config
        probs, scored = None, isinstance(res, list) and bool(res) and isinstance(res[0], ScoreResult)
        if scored:
            # logprobs: the score is the expected rating; curation_ratings holds the most probable one
            read = self.scorer.read(res)
            ratings = [int(read.top) if read.ok else None]
            good = [x for x in ratings if x is not None]
            score = (read.score if c.rating == "mean" else read.top) if read.ok else None
            probs = read.rounded() if read.ok else None
            ctx.stats.add("scored_from_logprobs")
        else:
            ratings = [parse_rating(put_back_prefill(c.prefill, comp.text)) for comp in res.completions]
            good = [x for x in ratings if x is not None]
            score = sum(good) / len(good) if good else None
        ctx.stats.add("ratings", len(ratings))
        ctx.stats.add("unparseable_ratings", len(ratings) - len(good))
        ctx.stats.add("outputs", len(ratings))
        ctx.stats.add("parsed", len(good))
        for x in good:
            ctx.stats.add(f"rating_{x}")
        if score is None:
            ctx.stats.add("unrated")
            if c.drop:
                return Drop("unrated")
        elif score < c.min_score:
            ctx.stats.add("below_min_score")
            if c.drop:
                return Drop("below_min_score")
        ctx.stats.add("kept")
        return {"curation_score": None if score is None else float(score), "curation_ratings": ratings,
                **({"curation_probs": probs} if scored else {}), **self._sft(row)}
