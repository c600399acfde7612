"""The model-free parts of instruction backtranslation (Humpback, Li et al.,
2023; specs/methods.md section 2): documents -> self-contained segments
with the paper's filters (``backtranslation_segments``), and the seed /
augmented tags S_a / S_w (``source_tag``), and the SFT columns of a
Humpback pair (:func:`sft_pair`)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from ..data import ROW_ID
from ..data.trl import SFT_COLUMNS, sft_row
from ..engine.stage import MapStage, StageContext

# The paper's tag sentences (section 2.1, step 6): seed data is tagged S_a,
# augmented (web) data S_w; both are appended at inference.
SEED_TAG = "Answer in the style of an AI Assistant."
AUGMENTED_TAG = "Answer with knowledge from web search."
TAGS = {"seed": SEED_TAG, "augmented": AUGMENTED_TAG}


def sft_pair(instruction: str, output: str, system_tag: str | None,
             fmt: Literal["conversational", "standard"] = "conversational") -> dict[str, Any]:
    """The SFT columns of an (instruction, output) pair: the instruction as
    the user turn -> the output; the row's tag (S_a / S_w), if any, as the
    system message (standard: a paragraph before the instruction)."""
    return sft_row(instruction, output, system_tag or None, fmt)

_HEADER = re.compile(r"^(?:#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*|<h[1-6][^>]*>(.*?)</h[1-6]>)[ \t]*$", re.M | re.I)


# -- segments ------------------------------------------------------------------

def split_segments(text: str) -> list[tuple[str, str]]:
    """(header, segment) pairs: the text that follows each markdown (``#``)
    or HTML (``<h1>``..``<h6>``) header, up to the next header. A document
    without headers is one segment with an empty header."""
    if not isinstance(text, str):
        return []
    marks = list(_HEADER.finditer(text))
    if not marks:
        return [("", text.strip())] if text.strip() else []
    out = []
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        header = (m.group(1) or m.group(2) or "").strip()
        out.append((header, text[m.end():end].strip()))
    return out


def caps_ratio(text: str) -> float:
    """Share of upper-case letters among the letters of ``text`` (0 if none)."""
    letters = [c for c in text if c.isalpha()]
    return sum(c.isupper() for c in letters) / len(letters) if letters else 0.0


def segment_drop_reason(header: str, segment: str, min_chars: int, max_chars: int, min_line_chars: int,
                        max_header_caps: float) -> str | None:
    """The segment filters, in order; the first reason that fires or None."""
    if len(segment) < min_chars:
        return "segment_too_short"
    if len(segment) > max_chars:
        return "segment_too_long"
    if min_line_chars and any(len(line.strip()) < min_line_chars for line in segment.splitlines() if line.strip()):
        return "short_line"
    if header and caps_ratio(header) > max_header_caps:
        return "header_mostly_capitals"
    return None


@dataclass
class SegmentsConfig:
    text_column: str = field(default="text", metadata={"help": "column holding the document"})
    split_on_headers: bool = field(default=True, metadata={"help": "one segment per header (false: the whole document)"})
    min_chars: int = field(default=300, metadata={"help": "drop shorter segments (Spico's repro: 1000)"})
    max_chars: int = field(default=2200, metadata={"help": "drop longer segments (Spico's repro: 2200)"})
    min_line_chars: int = field(default=5, metadata={"help": "drop a segment with a non-empty line shorter than this (0: off)"})
    max_header_caps: float = field(default=0.5, metadata={"help": "drop a segment whose header has more upper-case letters than this share"})
    dedupe: bool = field(default=True, metadata={"help": "drop exact duplicates (whitespace-normalised)"})


class SegmentsStage(MapStage):
    """Splits documents into candidate answers (no model): one row per kept
    segment with ``header``, ``output`` (the segment) and ``document_id``."""

    kind = "backtranslation_segments"
    Config = SegmentsConfig

    def required_columns(self) -> set[str]:
        return {self.config.text_column}

    def output_columns(self, input_columns: list[str]) -> list[str]:
        return [ROW_ID, "document_id", "header", "output"]

    @staticmethod
    def _key(segment: str) -> str:
        return hashlib.sha256(" ".join(segment.split()).encode()).hexdigest()

    def prepare(self, done):
        self._seen = {self._key(r["output"]) for r in done}  # dedupe across the chunks of one run

    def process(self, rows, ctx: StageContext):
        c = self.config
        seen: set[str] = self.__dict__.setdefault("_seen", set())
        out = []
        for r in rows:
            text = r.get(c.text_column)
            if not isinstance(text, str):
                raise ValueError(f"row {r.get(ROW_ID)!r}: column {c.text_column!r} must be text, got {type(text).__name__}")
            segs = split_segments(text) if c.split_on_headers else ([("", text.strip())] if text.strip() else [])
            ctx.stats.add("segments", len(segs))
            for k, (header, seg) in enumerate(segs):
                reason = segment_drop_reason(header, seg, c.min_chars, c.max_chars, c.min_line_chars, c.max_header_caps)
                if reason is None and c.dedupe:
                    key = self._key(seg)
                    if key in seen:
                        reason = "duplicate_segment"
                    seen.add(key)
                if reason:
                    ctx.stats.add(f"dropped_{reason}")
                    continue
                out.append({ROW_ID: f"{r[ROW_ID]}/{k}", "document_id": str(r[ROW_ID]), "header": header, "output": seg})
        return out


# -- backward direction -----------------------------------------------------------


@dataclass
class SourceTagConfig:
    source: Literal["seed", "augmented"] = field(metadata={"help": "seed (tag S_a) or augmented (tag S_w)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing source column"})
    instruction_column: str = field(default="instruction", metadata={"help": "SFT rows: column with the instruction"})
    output_column: str = field(default="output", metadata={"help": "SFT rows: column with the answer"})
    format: Literal["conversational", "standard"] = field(default="conversational", metadata={
        "help": "TRL format of the SFT columns prompt/completion, written when the rows have instruction_column and "
                "output_column (the tag as the system message): conversational or standard (strings)"})


class SourceTagStage(MapStage):
    """Adds ``source`` and ``system_tag`` (the paper's S_a / S_w sentence);
    rows with an instruction and an output become SFT rows with the tag as
    their system message (``prompt``/``completion``, rewritten if present)."""

    kind = "source_tag"
    Config = SourceTagConfig

    def _sft(self, columns) -> bool:
        return self.config.instruction_column in columns and self.config.output_column in columns

    def output_columns(self, input_columns: list[str]) -> list[str]:
        new = ["source", "system_tag"] + (list(SFT_COLUMNS) if self._sft(input_columns) else [])
        return [c for c in input_columns if c not in new] + new

    def process(self, rows, ctx):
        c = self.config
        src = c.source
        out = []
        for r in rows:
            if r.get("source") and not c.overwrite:
                if r["source"] not in TAGS:
                    raise ValueError(f"row {r.get(ROW_ID)!r}: unknown source {r['source']!r}; expected seed or augmented")
                new = {**r, "system_tag": TAGS[r["source"]]}
            else:
                new = {**r, "source": src, "system_tag": TAGS[src]}
            if self._sft(r):
                inst, outp = r[c.instruction_column], r[c.output_column]
                if not isinstance(inst, str) or not isinstance(outp, str):
                    raise ValueError(f"row {r.get(ROW_ID)!r}: columns {c.instruction_column!r} and "
                                     f"{c.output_column!r} must be text")
                new.update(sft_pair(inst, outp, new["system_tag"], c.format))
            out.append(new)
        return out


# -- the backward model's training rows ---------------------------------------------

def backward_sft_row(instruction: str, output: str,
                     fmt: Literal["conversational", "standard"] = "conversational") -> dict[str, Any]:
    """One training row of the backward model M_yx = p(x|y) (Humpback step 3,
    "fine-tune the base model on reversed seed pairs"): ``prompt`` is the
    output (the user turn, no system message), ``completion`` the
    instruction."""
    return sft_row(output, instruction, None, fmt)


@dataclass
class BackwardPairsConfig:
    instruction_column: str = field(default="instruction", metadata={"help": "column with the seed instruction (x)"})
    output_column: str = field(default="output", metadata={"help": "column with the seed answer (y)"})
    format: Literal["conversational", "standard"] = field(default="conversational", metadata={
        "help": "TRL format of prompt/completion (output -> instruction): conversational (message lists; the "
                "backward model is then asked with `backtranslate` `chat: true`) or standard (strings; "
                "`chat: false`)"})


class BackwardPairsStage(MapStage):
    """Seed (instruction, output) rows -> the backward model's SFT rows
    (no model): ``prompt`` = the output, ``completion`` = the instruction
    (:func:`backward_sft_row`); ``synthfb train sft`` on them gives M_yx,
    which ``backtranslate`` then asks with the bare segment
    (``prompt: backtranslation_backward_trained.jinja``)."""

    kind = "backward_pairs"
    Config = BackwardPairsConfig

    def required_columns(self) -> set[str]:
        return {self.config.instruction_column, self.config.output_column}

    def output_columns(self, input_columns: list[str]) -> list[str]:
        return [c for c in input_columns if c not in SFT_COLUMNS] + list(SFT_COLUMNS)

    def process(self, rows, ctx):
        c = self.config
        out = []
        for r in rows:
            inst, outp = r.get(c.instruction_column), r.get(c.output_column)
            if not isinstance(inst, str) or not isinstance(outp, str) or not inst.strip() or not outp.strip():
                raise ValueError(f"row {r.get(ROW_ID)!r}: columns {c.instruction_column!r} and {c.output_column!r} "
                                 f"must be non-empty text")
            out.append({**r, **backward_sft_row(inst, outp, c.format)})
        return out
