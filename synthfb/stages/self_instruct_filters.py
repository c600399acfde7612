"""Parsers and filters of Self-Instruct and Alpaca (no model, no engine).

Every parser returns plain values (possibly empty lists) and never raises on
model output; every filter returns the *reason* a candidate is dropped (a
short string that the stages count) or ``None`` when it is kept. Decisions
follow the reference code described in specs/methods.md section 1.
"""

from __future__ import annotations

import random
import re
import string

from .filters import RougeLIndex

# Whole-word, case-insensitive (section 1.2); Alpaca adds five more (1.7).
SELF_INSTRUCT_BLACKLIST = (
    "image", "images", "graph", "graphs", "picture", "pictures", "file", "files",
    "map", "maps", "draw", "plot", "go to",
)
ALPACA_EXTRA_BLACKLIST = ("video", "audio", "music", "flowchart", "diagram")

_WS = re.compile(r"\s+")
# A numbered list item at the start of a line: "9. ", "10 . ", "3) ".
_ITEM = re.compile(r"\n[ \t]*\d+\s?[.)][ \t]*")


def collapse_ws(text: str) -> str:
    return _WS.sub(" ", text).strip()


def demo_instruction(text: str) -> str:
    """An instruction as shown in the bootstrap prompt: whitespace collapsed,
    a trailing ':' removed (the reference code does both)."""
    t = collapse_ws(text)
    return t[:-1].rstrip() if t.endswith(":") else t


def clean_instruction(text: str, faithful_capitalize: bool = True) -> str:
    """Collapse whitespace and capitalize. ``faithful_capitalize`` copies
    Python's ``str.capitalize`` as the reference does (it lower-cases every
    later character: "Write a Python program" -> "Write a python program");
    False only upper-cases the first character."""
    t = collapse_ws(text)
    if faithful_capitalize:
        return t.capitalize()
    return t[:1].upper() + t[1:]


def parse_instruction_list(text: str, first_unnumbered: bool) -> list[str]:
    """Split a numbered-list continuation into raw instructions.

    ``first_unnumbered``: the prompt ended with "9." so the text before the
    first numbered line is itself an item (completion mode). Otherwise (chat
    mode) text before the first numbered line is a preamble ("Here are some
    tasks:") and is skipped. Empty items are dropped. Never raises.
    """
    if not isinstance(text, str) or not text.strip():
        return []
    parts = _ITEM.split("\n" + text)
    head, items = parts[0], parts[1:]
    out = [head] if first_unnumbered else []
    out += items
    return [p.strip() for p in out if p.strip()]


def instruction_drop_reason(inst: str, blacklist: tuple[str, ...] | list[str] = SELF_INSTRUCT_BLACKLIST,
                            min_words: int = 3, max_words: int = 150) -> str | None:
    """Self-Instruct's per-instruction filters in the reference order; the
    reason of the first one that fires, else None."""
    words = inst.split()
    if len(words) <= min_words:
        return "too_short"
    if len(words) > max_words:
        return "too_long"
    lowered = inst.lower()
    for word in blacklist:
        if re.search(r"\b" + re.escape(word.lower()) + r"\b", lowered):
            return "blacklisted_keyword"
    if inst.startswith("Write a program"):
        return "write_a_program"
    if inst[0] in string.punctuation:
        return "starts_with_punctuation"
    if not inst[0].isascii():
        return "non_ascii_start"
    return None


class NoveltyPool:
    """The ROUGE-L novelty filter: the seed instructions plus every one
    accepted so far. ``drop_reason`` is ``"rouge_l_similar"`` when a
    candidate's ROUGE-L F1 with some pool text is > ``threshold`` (exactly
    rouge_score's decision), else None; ``add`` puts an accepted one in."""

    def __init__(self, texts: list[str]):
        self.texts = list(texts)
        self.index = RougeLIndex(self.texts)

    def drop_reason(self, inst: str, threshold: float = 0.7) -> str | None:
        return "rouge_l_similar" if self.index.exceeds(inst, threshold) else None

    def add(self, inst: str) -> tuple[float, str]:
        """Add ``inst``; returns its best ROUGE-L F1 with the pool before it
        and that most similar text ("" for an empty pool)."""
        score, best = self.index.max_score(inst)
        similar = self.texts[best] if best >= 0 else ""
        self.index.add(inst)
        self.texts.append(inst)
        return float(score), similar


# -- classification identification -------------------------------------------

def parse_yes_no(text: str) -> bool | None:
    """The first word of an answer as a yes/no label; None if it is neither.

    The reference accepts exactly "Yes"/"yes"/"YES" (everything else is No);
    we also read "No" explicitly so that gibberish is counted as unparseable
    rather than silently taken as "No"."""
    if not isinstance(text, str):
        return None
    m = re.match(r"\s*[\"'*(\[]*([A-Za-z]+)", text)
    if not m:
        return None
    word = m.group(1).lower()
    if word == "yes":
        return True
    if word == "no":
        return False
    return None


# -- instance generation ------------------------------------------------------

_NO_INPUT = {"", "none", "<noinput>", "n/a", "no input", "null", "-"}


def _clean_input(text: str) -> str:
    t = text.strip()
    if t.lower().startswith("input:"):
        t = t[len("input:"):].strip()
    return "" if t.lower() in _NO_INPUT else t


def parse_input_first(text: str, truncated: bool) -> list[tuple[str, str]]:
    """Input-first instances: blocks split on ``Example\\s?\\d*\\.?``, each
    split once on ``Output\\s*\\d*\\s*:`` into (input, output). Blocks
    without an output marker are skipped. A truncated response loses its
    last instance (reference behaviour)."""
    if not isinstance(text, str):
        return []
    out = []
    for block in re.split(r"Example\s?\d*\.?", text):
        if not block.strip():
            continue
        parts = re.split(r"Output\s*\d*\s*:", block, maxsplit=1)
        if len(parts) != 2:
            continue
        out.append((_clean_input(parts[0]), parts[1].strip()))
    if truncated and out:
        out.pop()
    return out


def parse_output_first(text: str, truncated: bool) -> list[tuple[str, str]]:
    """Output-first (classification) instances: blocks split on
    ``Class label:``; the first line is the label (the output), the rest the
    input. Text before the first label is ignored."""
    if not isinstance(text, str):
        return []
    out = []
    for block in re.split(r"Class label:", text)[1:]:
        lines = block.strip().split("\n", 1)
        label = lines[0].strip()
        inp = lines[1] if len(lines) > 1 else ""
        out.append((_clean_input(inp), label))
    if truncated and out:
        out.pop()
    return out


def instance_drop_reason(inp: str, output: str) -> str | None:
    """Per-instance filters of the reference post-processing."""
    if not output.strip():
        return "empty_output"
    if inp.strip() == output.strip():
        return "input_equals_output"
    if inp.rstrip().endswith(":") or output.rstrip().endswith(":"):
        return "ends_with_colon"
    return None


def filter_instances(instances: list[tuple[str, str]], max_instances: int, rng: random.Random,
                     counts: dict[str, int]) -> list[tuple[str, str]]:
    """All instance post-filters of one task, adding drop reasons to ``counts``.

    Order: per-instance filters; if one non-empty input appears with two
    different outputs the whole task is dropped (``conflicting_outputs``);
    exact duplicates removed; at most ``max_instances`` kept (random sample).
    """
    def add(k: str, n: int = 1) -> None:
        if n:
            counts[k] = counts.get(k, 0) + n

    kept = []
    for inp, outp in instances:
        reason = instance_drop_reason(inp, outp)
        if reason:
            add(reason)
        else:
            kept.append((inp, outp))
    outputs_of: dict[str, set[str]] = {}
    for inp, outp in kept:
        if inp.strip():
            outputs_of.setdefault(inp.strip(), set()).add(outp.strip())
    if any(len(v) > 1 for v in outputs_of.values()):
        add("conflicting_outputs", len(kept))
        return []
    unique, seen = [], set()
    for inst in kept:
        if inst in seen:
            add("duplicate_instance")
            continue
        seen.add(inst)
        unique.append(inst)
    if len(unique) > max_instances:
        add("over_max_instances", len(unique) - max_instances)
        picked = sorted(rng.sample(range(len(unique)), max_instances))
        unique = [unique[i] for i in picked]
    return unique


# -- Alpaca -----------------------------------------------------------------------

_ALPACA_FIELD = re.compile(r"\d+\s?\.\s?(Instruction|Input|Output)s?:")  # "7. Instructions:" too


def parse_alpaca_blocks(text: str, first_number: int, truncated: bool) -> tuple[list[dict[str, str]], int]:
    """Parse an Alpaca-style response into instruction/input/output dicts.

    The prompt ends with ``"{first_number}. Instruction:"``, so that prefix is
    put back when the text does not start with a numbered field. Blocks are
    separated by ``###``; a block must split into exactly the three fields
    (7 parts, as in the reference) with a non-empty instruction and output,
    or it is counted as malformed. The last
    block is dropped when the response was truncated. Returns the parsed
    items and the number of malformed blocks.
    """
    if not isinstance(text, str) or not text.strip():
        return [], 0
    body = text if _ALPACA_FIELD.match(text.lstrip()) else f"{first_number}. Instruction:" + text
    blocks = [b for b in body.split("###") if b.strip()]
    if truncated and blocks:
        blocks.pop()
    items, bad = [], 0
    for block in blocks:
        parts = _ALPACA_FIELD.split(block)
        if len(parts) != 7 or [parts[1], parts[3], parts[5]] != ["Instruction", "Input", "Output"] \
                or not parts[2].strip() or not parts[6].strip():  # an empty instruction or output: unusable
            bad += 1
            continue
        inp = parts[4].strip()
        items.append({
            "instruction": parts[2].strip(),
            "input": "" if inp.lower() == "<noinput>" else inp,
            "output": parts[6].strip(),
        })
    return items, bad
