"""Consistency-checked answers: TableLLM-style cross-way validation.

TableLLM (Zhang et al. 2024, arXiv:2403.19318) keeps a generated question
only when two independent ways of answering it agree: a text answer with
its reasoning, and the answer computed by executing a generated program
(specs/methods-2.md section 5.1). Errors of two different procedures are
less correlated than those of N samples of one procedure, so agreement is
a stronger filter than self-consistency at the same cost.

Per row (a question in ``question_column``), in one engine call per chunk:

- ``mode: program`` (default, the paper's two ways): route 1 = a step-by-step
  text solution ending in ``Answer: <number>`` (``text_prompt``); route 2 =
  a Python program (``program_prompt``), run in the sandbox of
  :mod:`synthfb.stages.sandbox` (fresh ``python -I`` in a temporary
  directory, time and memory limits via ``resource.setrlimit``, no network);
  its answer is the last line it prints;
- ``mode: two_solvers``: route 2 is a second, differently prompted text
  solver (``second_prompt``).

The two final answers are compared after normalisation
(:func:`answers_agree`: numbers with a relative tolerance, percentages as
fractions, else normalised strings). Rows whose routes disagree, or where a
route gives no answer (no ``Answer:`` line, no program, an execution error
or a timeout) are dropped with a reason; ``agreement_checked`` counts the
rows where both routes answered and ``agreed`` those that agreed; the card
shows their ratio as the stage's agreement rate. A finished text solution
without an ``Answer:`` line gets a second, greedy prompt asking for the number
alone (``extract_answer``, Kojima et al. 2022 answer extraction,
:mod:`synthfb.stages.answer_extraction`); the solution then ends with
``Answer: <number>``, and ``answer_extracted`` says whether the row's completion (the ``target`` route)
ends with such an extracted answer.
``outputs`` / ``parsed`` (the parse figure) count the replies per row (a reply
cut at ``max_tokens`` before anything could be read is a truncation,
``truncated_solutions``, not an output) and those whose answer or program
could be read. Kept rows are SFT rows
(``prompt`` = the question, or with ``sft_prompt: rendered`` the route's
prompt as asked; ``completion`` = the ``target`` route's trace),
with both traces and answers as metadata.

Deviations: TableLLM works on tables (pandas programs over a CSV); the shipped
pipeline applies the same cross-check to math word problems. Its generator
model, sampling and equivalence judge are not stated in what we could read
[UNVERIFIED]; we use greedy decoding and a rule-based equivalence check.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from ..data import PROVENANCE, ROW_ID
from ..data.trl import sft_row
from ..engine.stage import Ask, Drop, ModelConfig, ModelStage, StageContext
from .answer_extraction import extract_missing
from .sandbox import run_python

# -- answers -----------------------------------------------------------------------------------------------

_ANSWER = re.compile(r"answer\s*(?:is\s*[:=]?|[:=])\s*\**\s*(.+)", re.IGNORECASE)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_CODE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_NUMBER = re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$")


def final_answer(text: str) -> str | None:
    """The final answer of a text solution: what follows the LAST
    ``Answer:`` line (``The answer is ...`` too), else the last
    ``\\boxed{...}``; None when there is neither."""
    if not isinstance(text, str):
        return None
    for line in reversed(text.strip().splitlines()):
        m = _ANSWER.search(line)
        if m and m.group(1).strip(" *.$"):
            return m.group(1).strip()
    boxed = _BOXED.findall(text)
    return boxed[-1].strip() if boxed else None


def extract_program(text: str) -> str | None:
    """The LAST fenced Python code block of a reply (None without one)."""
    if not isinstance(text, str):
        return None
    blocks = [b for b in _CODE.findall(text) if b.strip()]
    return blocks[-1] if blocks else None


def printed_answer(stdout: str) -> str | None:
    """A program's answer: the last non-empty line it printed."""
    lines = [x.strip() for x in (stdout or "").splitlines() if x.strip()]
    return lines[-1] if lines else None


def normalise_answer(text: str | None) -> tuple[float | None, str | None]:
    """``(number, string)`` of an answer: the number when it reads as one
    (currency signs, thousands separators, units after the number, a
    trailing ``%`` (-> value / 100), simple fractions ``a/b`` and ``\\boxed``
    removed or read), and the lower-cased string without surrounding
    punctuation and markup; ``(None, None)`` for an empty answer."""
    num, string, _ = _read_answer(text)
    return num, string


def _read_answer(text: str | None) -> tuple[float | None, str | None, bool]:
    """:func:`normalise_answer` and whether the answer was a percentage."""
    if text is None:
        return None, None, False
    s = str(text).strip()
    boxed = _BOXED.findall(s)
    if boxed:
        s = boxed[-1]
    s = s.replace("$", "").replace("\\%", "%").replace("**", "").strip().rstrip(".").strip()
    string = re.sub(r"\s+", " ", s.lower()).strip(" .,:;\"'`")
    if not string:
        return None, None, False
    num, percent = None, False
    head = re.match(r"^([-+]?[\d,]*\.?\d+(?:[eE][-+]?\d+)?)\s*(%|/\s*([-+]?\d+(?:\.\d+)?))?", string.replace("−", "-"))
    if head:
        raw = head.group(1).replace(",", "")
        if _NUMBER.match(raw):
            num = float(raw)
            if head.group(2) == "%":
                num, percent = num / 100.0, True
            elif head.group(3) is not None:
                den = float(head.group(3))
                num = num / den if den else None
    if num is not None and not math.isfinite(num):
        num = None
    return num, string, percent and num is not None


def answers_agree(a: str | None, b: str | None, rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> bool | None:
    """Whether two final answers are the same: numerically (``rel_tol`` /
    ``abs_tol``) when both read as numbers, else as normalised strings.
    A percentage agrees with its fraction and, when the other answer is no
    percentage, with its bare number (``12%`` = ``0.12`` = ``12``: a program
    prints 12 for "what percent"); ``1,200`` and ``1200.0`` agree. None when
    either answer is missing."""
    (na, sa, pa), (nb, sb, pb) = _read_answer(a), _read_answer(b)
    if sa is None or sb is None:
        return None
    if na is not None and nb is not None:
        def close(x: float, y: float) -> bool:
            return math.isclose(x, y, rel_tol=rel_tol, abs_tol=abs_tol)

        return close(na, nb) or (pa != pb and (close(100 * na, nb) if pa else close(na, 100 * nb)))
    return sa == sb


# -- the stage ---------------------------------------------------------------------------------------------

@dataclass
class ConsistencyConfig(ModelConfig):
    question_column: str = field(default="question", metadata={"help": "column with the question (a math word problem)"})
    mode: Literal["program", "two_solvers"] = field(default="program", metadata={
        "help": "program: a text solution vs a Python program run in a sandbox (TableLLM's cross-way validation); "
                "two_solvers: two differently prompted text solvers"})
    text_prompt: str = field(default="consistency_text.jinja", metadata={
        "help": "route 1 template (variable: question); the solution must end with 'Answer: <value>'"})
    program_prompt: str = field(default="consistency_program.jinja", metadata={
        "help": "mode program: route 2 template (variable: question); the reply holds a ```python block that prints "
                "the answer"})
    second_prompt: str = field(default="consistency_text_alt.jinja", metadata={
        "help": "mode two_solvers: route 2 template (variable: question), a differently prompted solver ending with "
                "'Answer: <value>'"})
    system: str | None = field(default=None, metadata={"help": "system message for both routes"})
    extract_answer: bool = field(default=True, metadata={
        "help": "a finished text solution without an 'Answer:' line gets a second, greedy prompt asking only for "
                "the number (Kojima et al. 2022 answer extraction); the solution then ends with 'Answer: <number>' "
                "and the row marks it (`answer_extracted`)"})
    constrain: Literal["auto", "json", "none"] = field(default="auto", metadata={
        "help": "answer extraction's reply: json = decoded under a number schema (vLLM structured outputs, or "
                "response_format on a served model); none = free text, its first number; auto: json on vllm/vllm-cpu"})
    chat: bool = field(default=True, metadata={"help": "send the prompts as chat user turns (false: raw prompts)"})
    timeout: float = field(default=5.0, metadata={"help": "mode program: wall-clock seconds a program may run (> 0); "
                                                          "a program that runs longer is killed and its row dropped"})
    memory_mb: int = field(default=512, metadata={"help": "mode program: address-space limit of a program in MiB "
                                                          "(resource.setrlimit RLIMIT_AS)"})
    rel_tol: float = field(default=1e-6, metadata={"help": "relative tolerance for two numeric answers to agree"})
    target: Literal["first", "second"] = field(default="first", metadata={
        "help": "the SFT completion: first = the text solution; second = route 2's reply (the program, as the model "
                "wrote it, in mode program; the second solver's solution in mode two_solvers)"})
    sft_prompt: Literal["question", "rendered"] = field(default="question", metadata={
        "help": "the SFT prompt: question = the question alone (the trained model answers plain questions); "
                "rendered = the target route's prompt as the model was asked it (with its instructions)"})
    gold_column: str | None = field(default=None, metadata={
        "help": "optional column with a known answer: kept rows whose agreed answer matches it are counted as "
                "`kept_matching_gold` (the filter's precision; the answer is never shown to the model)"})
    format: Literal["conversational", "standard"] = field(default="conversational", metadata={
        "help": "TRL format of the SFT columns prompt/completion"})


class ConsistencyStage(ModelStage):
    """Two independent routes to an answer per question; keeps the row when they agree."""

    kind = "consistency"
    Config = ConsistencyConfig
    sampling_defaults = {"temperature": 0.0, "max_tokens": 512}
    adds = ("prompt", "completion", "answer", "first_solution", "first_answer", "second_solution", "second_answer",
            "answer_extracted", "program_status", "answers_agree")

    def __init__(self, config: ConsistencyConfig, base_dir):
        super().__init__(config, base_dir)
        if config.mode not in ("program", "two_solvers"):
            raise ValueError(f"mode: expected program or two_solvers, got {config.mode!r}")
        if config.target not in ("first", "second"):
            raise ValueError(f"target: expected first or second, got {config.target!r}")
        if not config.timeout > 0 or config.memory_mb < 16:
            raise ValueError(f"timeout must be > 0 s and memory_mb >= 16, got {config.timeout}, {config.memory_mb}")
        if config.sft_prompt not in ("question", "rendered"):
            raise ValueError(f"sft_prompt: expected question or rendered, got {config.sft_prompt!r}")
        if not config.rel_tol >= 0:
            raise ValueError(f"rel_tol must be >= 0, got {config.rel_tol}")
        self.first = self.load_template("text_prompt")
        self.second = self.load_template("program_prompt" if config.mode == "program" else "second_prompt")
        for tpl in (self.first, self.second):
            if "question" not in tpl.variables:
                raise ValueError(f"{tpl.source}: the template must use `question`")
        self.params = self.sampling()

    def required_columns(self) -> set[str]:
        return {self.config.question_column, self.config.gold_column} - {None}

    def run(self, row: dict[str, Any], ctx: StageContext):
        cfg = self.config
        q = row.get(cfg.question_column)
        if not isinstance(q, str) or not q.strip():
            raise ValueError(f"row {row.get(ROW_ID)}: column {cfg.question_column!r} must be a non-empty string")
        vars_ = {"question": q.strip()}
        texts = [self.first.render(vars_, row.get(ROW_ID)), self.second.render(vars_, row.get(ROW_ID))]
        asked = [self.chat(t, self.params, cfg.system, cfg.chat) for t in texts]
        res = yield Ask(asked, call="solutions")
        replies = [r.completions[0].text if r.completions else "" for r in res]
        answers = [final_answer(replies[0]), final_answer(replies[1]) if cfg.mode != "program" else None]
        found: list[str | None] = [None, None]
        if cfg.extract_answer:  # text routes whose finished solution gives no answer: ask for the number alone
            replies, found = yield from extract_missing(
                asked, [r.completions[0] if r.completions else None for r in res], replies,
                [answers[0] is None, cfg.mode != "program" and answers[1] is None], lambda a: f"\nAnswer: {a}",
                cfg.constrain, self.model_name(), ctx)
        first, second = replies
        a1, a2 = (a if f is None else f for a, f in zip(answers, found))
        code = extract_program(second) if cfg.mode == "program" else None
        # parse figure: a reply parsed when its answer (route 1, two_solvers' route 2) or its program could be
        # read; a program that fails or prints nothing, and disagreeing answers, are drops, not parse failures;
        # a reply cut at max_tokens with nothing read is a truncation (truncated_solutions), as in every stage
        read = [a1 is not None, (code if cfg.mode == "program" else a2) is not None]
        cut = [not ok and bool(r.completions) and r.completions[0].finish_reason == "length" for ok, r in zip(read, res)]
        ctx.stats.add("outputs", 2 - sum(cut))
        ctx.stats.add("parsed", sum(read))
        status = None
        if cfg.mode == "program":
            if code is None:
                return Drop("no_program")
            ran = run_python(code, timeout=cfg.timeout, memory_mb=cfg.memory_mb)
            status = ran.status
            ctx.stats.add(f"programs_{ran.status}")
            if ran.status == "timeout":
                return Drop("program_timeout")
            if not ran.ok:
                return Drop("program_error")
            a2 = printed_answer(ran.stdout)
            if a2 is None:
                return Drop("no_program_output")
        elif a2 is None:
            return Drop("no_second_answer")
        if a1 is None:
            return Drop("no_text_answer")
        agree = answers_agree(a1, a2, cfg.rel_tol)
        ctx.stats.add("agreement_checked")
        if not agree:
            return Drop("answers_disagree")
        ctx.stats.add("agreed")
        num, string = normalise_answer(a1)
        answer = _format_number(num) if num is not None else string
        if cfg.gold_column is not None and answers_agree(answer, str(row.get(cfg.gold_column)), cfg.rel_tol):
            ctx.stats.add("kept_matching_gold")
        completion = first if cfg.target == "first" else second
        user = q.strip() if cfg.sft_prompt == "question" else texts[0 if cfg.target == "first" else 1]
        return {**sft_row(user, completion, cfg.system, cfg.format),
                "answer": answer, "first_solution": first, "first_answer": a1, "second_solution": second,
                "second_answer": a2, "answer_extracted": found[0 if cfg.target == "first" else 1] is not None,
                "program_status": status, "answers_agree": True,
                PROVENANCE: {"finish_reason": ",".join(r.completions[0].finish_reason or "" for r in res)}}


def _format_number(x: float) -> str:
    return str(int(x)) if x == int(x) and abs(x) < 1e15 else repr(x)


__all__ = ["ConsistencyConfig", "ConsistencyStage", "answers_agree", "extract_program", "final_answer",
           "normalise_answer", "printed_answer"]
