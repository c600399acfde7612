"""Answer extraction: a second prompt for a finished solution whose final answer cannot be read.

Kojima et al. 2022 ("Large Language Models are Zero-Shot Reasoners", arXiv:2205.11916, section 3) answer
in two stages: *reasoning extraction* (the model writes its solution) and *answer extraction*: the question,
the model's own solution and a prompt that asks only for the answer in the required form ("Therefore, the
answer (arabic numerals) is"), decoded greedily. The maths stages (``kpdds_solve``, ``consistency``) ask for
the answer inside the solution (``\\boxed{}``, ``Answer: <number>``) and read it with a rule; a small model
often finishes a solution without that line. For such a solution (finished, not cut at ``max_tokens``: a cut
solution is left as it is) they ask this second question, and read the number from its reply.

The follow-up is a chat turn after the solution (a raw prompt gets Kojima's sentence appended instead). Where
the stage decodes under a schema (``constrain``: vLLM's structured outputs, or ``response_format`` on a served
model), the reply is a JSON object whose ``answer`` is a decimal number of bounded length (a string under a
pattern, so it always closes), and the model cannot answer in prose or with a placeholder; otherwise the
first number standing alone in the reply is read (also when the model talked on past ``max_tokens``, as
Kojima et al. read the first number; a JSON reply must be whole). The extracted answer is a reading of the
model's own solution, never a correction: the stage's vote or cross-check still decides, and the rows say
which answers were extracted.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Generator
from typing import Any

from ..engine.stage import Ask, StageContext
from ..llm import constrained
from ..llm.types import Completion, GenerationRequest, SamplingParams

NUMBER_PATTERN = r"^-?[0-9]{1,12}(\.[0-9]{1,10})?$"
"""A decimal number of bounded length: a constrained reply always closes within its tokens (an unbounded JSON
number lets a model write digits until ``max_tokens``)."""

ANSWER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"answer": {"type": "string", "pattern": NUMBER_PATTERN}},
    "required": ["answer"],
    "additionalProperties": False,
}
"""The follow-up's reply under ``constrain``: one number, written as a bounded decimal string."""

FOLLOW_UP = "Therefore, what is the final answer? Reply with the number only."
"""The chat follow-up turn (Kojima et al.'s answer trigger, as a question)."""

RAW_TRIGGER = "\nTherefore, the answer (arabic numerals) is"
"""Appended to a raw (completion-mode) prompt and its solution: Kojima et al.'s trigger for numbers."""

EXTRACTION_PARAMS = SamplingParams(temperature=0.0, max_tokens=48)
"""Greedy, as in the paper; the longest constrained reply (``{"answer": "`` and 23 digits, a point, ``"}``)
fits within 48 tokens even at one token per character."""

# a number standing alone in free text: not part of a word, an exponent (2^{10}), a LaTeX group or a ratio's
# second half (n/2); thousands commas, decimals, an exponent, a fraction a/b and a percent sign belong to it
_FREE_NUMBER = re.compile(r"(?<![\w.^/\\{}])([-\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?"
                          r"(?:/\d+)?%?)(?![\w^{}/])")
_FRAC = re.compile(r"\\[dt]?frac\{\s*(-?\d+)\s*\}\{\s*(\d+)\s*\}")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def needs_extraction(completion: Completion) -> bool:
    """Only a solution the model finished (one cut at ``max_tokens`` is left unread) and that computes
    something (at least one digit: an empty or number-free reply has no answer to read) gets a follow-up."""
    return completion.finish_reason == "stop" and any(ch.isdigit() for ch in completion.text)


def follow_up(asked: GenerationRequest, solution: str, constrained: bool) -> GenerationRequest:
    """The answer-extraction request for ``solution``, the reply to ``asked``."""
    if asked.messages is not None:
        turn = FOLLOW_UP + (' Answer in JSON: {"answer": "<number>"}.' if constrained else "")
        messages = [*asked.messages, {"role": "assistant", "content": solution}, {"role": "user", "content": turn}]
        return GenerationRequest(messages=messages, params=EXTRACTION_PARAMS,
                                 json_schema=ANSWER_SCHEMA if constrained else None)
    prompt = f"{asked.prompt}{solution}{RAW_TRIGGER}"
    if constrained:
        prompt += ' (in JSON, {"answer": "<number>"}):'
    return GenerationRequest(prompt=prompt, params=EXTRACTION_PARAMS,
                             json_schema=ANSWER_SCHEMA if constrained else None)


def format_number(x: float | int) -> str:
    """``12`` for 12.0, ``0.25`` for 0.25 (no exponent for ordinary sizes)."""
    if isinstance(x, bool) or not math.isfinite(float(x)):
        raise ValueError(f"not a finite number: {x!r}")
    if float(x) == int(x) and abs(x) < 1e15:
        return str(int(x))
    return repr(float(x))


def read_extracted(completion: Completion) -> str | None:
    """The number the follow-up's reply gives, as text; None when it gives none. A JSON reply is read by its
    ``answer`` (a number, or a string that is one), and gives none when cut at ``max_tokens`` or broken (not
    its first digits); free text by its first number standing alone (Kojima et al. read the first number; a
    ``\\frac{a}{b}`` reads as a/b, a ``\\boxed{}`` first; a number inside LaTeX, an exponent or a ratio is
    not read, so ``2^{10}`` gives none rather than 2)."""
    obj = completion.parsed
    if obj is None and completion.text.lstrip().startswith("{"):
        if completion.finish_reason == "length":
            return None
        try:
            obj = json.loads(completion.text, strict=False)
        except json.JSONDecodeError:
            return None
    if isinstance(obj, dict):
        v = obj.get("answer")
        if isinstance(v, str) and re.fullmatch(NUMBER_PATTERN, v.strip()):
            sign, (whole, _, frac) = ("-" if v.strip().startswith("-") else ""), v.strip().lstrip("-").partition(".")
            whole, frac = whole.lstrip("0") or "0", frac.rstrip("0")  # the digits as written: no float rounding
            return ("" if whole == "0" and not frac else sign) + whole + (f".{frac}" if frac else "")
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
            return format_number(v)
        return None
    text = _FRAC.sub(r"\1/\2", completion.text)
    boxed = _BOXED.search(text)
    m = _FREE_NUMBER.search(boxed.group(1) if boxed else text)
    if m is None and boxed:
        m = _FREE_NUMBER.search(text)
    return m.group(1).replace(",", "").replace("\u2212", "-") if m else None


def extract_missing(asked: list[GenerationRequest], comps: list[Completion | None], texts: list[str],
                    missing: list[bool], answer_line: Callable[[str], str], constrain: str, model: str | None,
                    ctx: StageContext) -> Generator[Ask, Any, tuple[list[str], list[str | None]]]:
    """A stage's answer-extraction step, for its ``run`` (``yield from``): solution ``i`` (``texts[i]``, the
    reply ``comps[i]`` to ``asked[i]``) whose answer is ``missing[i]`` and that :func:`needs_extraction` gets
    a follow-up, all in one :class:`Ask`; its number ``a``, where one is read, ends the text as
    ``answer_line(a)``. Returns ``(texts, found)``: the texts with those lines, and per solution the number
    read (None where none was asked or read). Counts ``extraction_asked`` and ``answers_extracted``."""
    todo = [i for i, (comp, miss) in enumerate(zip(comps, missing)) if miss and comp is not None
            and needs_extraction(comp)]
    found: list[str | None] = [None] * len(texts)
    if not todo:
        return texts, found
    as_json = constrained(constrain, ctx.generator(model).info.backend)
    got = yield Ask([follow_up(asked[i], texts[i], as_json) for i in todo], call="answer_extraction", partial=True)
    ctx.stats.add("extraction_asked", len(todo))
    texts = list(texts)
    for i, res in zip(todo, got):
        a = read_extracted(res.completions[0]) if res.completions and not res.error else None
        if a is not None:
            texts[i], found[i] = f"{texts[i].rstrip()}{answer_line(a)}", a
            ctx.stats.add("answers_extracted")
    return texts, found


__all__ = ["ANSWER_SCHEMA", "EXTRACTION_PARAMS", "FOLLOW_UP", "NUMBER_PATTERN", "RAW_TRIGGER", "extract_missing",
           "follow_up", "format_number", "needs_extraction", "read_extracted"]
