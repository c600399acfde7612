"""KPDDS, Key-Point-Driven Data Synthesis (Huang et al. 2024, arXiv 2403.02333,
AAAI 2025; specs/methods-2.md section 1), as four stages:

1. ``kpdds_extract``: a teacher reads each seed (question, solution) and
   lists its topics ("Subject - Subcategory") with their key points (KPs);
2. ``kpdds_questions`` (corpus level, an :class:`IterativeStage`: it sees
   every extracted seed): builds the Topic Co-occurrence Probability Matrix
   (Algorithm 1, :func:`~synthfb.stages.kpdds_core.build_tcpm`), samples 2-3
   topics per new question from it (row sums, then the first topic's row,
   then the Hadamard product of the chosen rows; ``ctx.rng(step)``), takes
   for each topic one random seed containing it with that topic's KPs (the
   "KPs-practice" set) and asks for one new problem needing all the KPs,
   wrapped in ``<Q> ... </Q>``;
3. ``kpdds_score``: the teacher scores each question in [0, 1] (KPs present,
   no logical or factual error); kept at >= 0.85;
4. ``kpdds_solve``: 10 solutions per question (T 0.75, top_p 0.95), few-shot
   with the question's practice problems (a finished solution without a
   boxed answer gets a second prompt asking for the number alone, Kojima et
   al. 2022's answer extraction, ``extract_answer``); solutions with an arithmetic error
   (re-evaluated in Python) leave; questions with more than 3 sub-questions
   leave; the Consensus Score Vector vote keeps every solution tied at the
   highest CS > 1/m, as SFT rows (:func:`synthfb.data.trl.sft_row`) with the
   answer and its agreement rate.

Deviations (README, KPDDS paragraph): topics are merged by normalised name,
not by clustering mean KP embeddings (the threshold is not published and no
embedding model is part of a run); answer equivalence is numeric/exact
string (no sympy); the paper's MinHash dedup and contamination checks are
left to the filter stages.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from ..data import PROVENANCE, ROW_ID
from ..data.trl import sft_row
from ..engine.stage import Drop, IterativeStage, ModelConfig, ModelStage, StageContext
from ..llm import CONSTRAIN_HELP, CONSTRAINED_BACKENDS, constrained  # noqa: F401 - re-exported
from ..llm.prompts import text_request
from . import answer_extraction as extraction
from . import kpdds_core as core

SFT_INSTRUCTION = "Please reason step by step and put the final answer in \\boxed{}."
"""Appended to the question in the SFT prompt (the paper's chat template asks for a boxed answer)."""


def parse_topics(text: str) -> tuple[list[dict[str, Any]] | None, str | None]:
    """``{"topics": [{"topic", "key_points"}]}`` from a teacher's answer
    (the first JSON object in it): topics with their KPs de-duplicated,
    or (None, reason) with reason ``no_json`` / ``bad_topics``."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        return None, "no_json"
    try:
        obj = json.loads(text[start:end + 1], strict=False)  # control characters inside strings are read
    except json.JSONDecodeError:
        return None, "no_json"
    items = obj.get("topics") if isinstance(obj, dict) else None
    if not isinstance(items, list):
        return None, "bad_topics"
    out: dict[str, dict[str, Any]] = {}
    for it in items:
        if not isinstance(it, dict) or not isinstance(it.get("topic"), str) or not it["topic"].strip():
            continue
        kps = [k.strip() for k in it.get("key_points") or [] if isinstance(k, str) and k.strip()]
        if not kps:
            continue
        key = core.topic_key(it["topic"])
        t = out.setdefault(key, {"topic": key, "key_points": []})
        t["key_points"] += [k for k in kps if k not in t["key_points"]]
    return (list(out.values()), None) if out else (None, "bad_topics")


# -- 1. extraction --------------------------------------------------------------------------------------------------

TOPICS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"topics": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
        "type": "object",
        "properties": {"topic": {"type": "string", "minLength": 3, "maxLength": 60},
                       "key_points": {"type": "array", "minItems": 1, "maxItems": 4,
                                      "items": {"type": "string", "minLength": 3, "maxLength": 120}}},
        "required": ["topic", "key_points"], "additionalProperties": False}}},
    "required": ["topics"], "additionalProperties": False,
}
"""The extraction answer's shape, for ``constrain: json``: at most 3 topics of at most 4 key points each, and
bounded strings, so a constrained answer always closes within the default 512 tokens (about 460 at most)."""

QUESTION_SCHEMA: dict[str, Any] = {
    "type": "object", "properties": {"question": {"type": "string", "minLength": 20, "maxLength": 1200}},
    "required": ["question"], "additionalProperties": False,
}
"""A new problem's shape for ``kpdds_questions`` under ``constrain: json`` (instead of ``<Q> ... </Q>``)."""

def json_object(text: str) -> dict[str, Any] | None:
    """``text`` read as one JSON object (raw control characters inside strings allowed), else None."""
    try:
        obj = json.loads(text or "", strict=False)
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


@dataclass
class KpddsExtractConfig(ModelConfig):
    question_column: str = field(default="question", metadata={"help": "seed problem column"})
    solution_column: str = field(default="solution", metadata={"help": "seed solution column"})
    prompt: str = field(default="kpdds_extract.jinja", metadata={"help": "extraction template (question, solution)"})
    chat: bool = field(default=True, metadata={"help": "send the prompt as a chat turn (false: raw prompt)"})
    constrain: Literal["auto", "json", "none"] = field(default="auto", metadata={
        "help": "the topics schema: at most 3 topics x 4 key points. " + CONSTRAIN_HELP})


class KpddsExtractStage(ModelStage):
    """Topics and key points of each seed problem (section 3.1)."""

    kind = "kpdds_extract"
    Config = KpddsExtractConfig
    sampling_defaults = {"temperature": 0.0, "max_tokens": 512}
    adds = ("topics",)

    def __init__(self, config: KpddsExtractConfig, base_dir):
        super().__init__(config, base_dir)
        self.tpl = self.load_template("prompt")
        self.params = self.sampling()

    def required_columns(self) -> set[str]:
        return {self.config.question_column, self.config.solution_column}

    def requests(self, row: dict[str, Any], ctx: StageContext) -> Any:
        c = self.config
        text = self.tpl.render({"question": row[c.question_column], "solution": row[c.solution_column]}, row[ROW_ID])
        req = self.chat(text, self.params, chat=c.chat)
        as_json = constrained(c.constrain, ctx.generator(self.model_name()).info.backend)
        return dataclasses.replace(req, json_schema=TOPICS_SCHEMA) if as_json else req

    def parse(self, row: dict[str, Any], res: Any, ctx: StageContext) -> Any:
        comp = res.completions[0]
        if comp.finish_reason == "length":
            ctx.stats.add("truncated_answers")  # an answer cut at max_tokens rarely holds whole JSON
        topics, why = parse_topics(comp.text)
        ctx.stats.add("outputs")
        ctx.stats.add("parsed", int(topics is not None))
        return Drop(f"unparseable_{why}") if topics is None else {"topics": topics}


# -- 2. TCPM and question generation -------------------------------------------------------------------------------

@dataclass
class KpddsQuestionsConfig(ModelConfig):
    num_questions: int = field(default=100, metadata={"help": "stop once this many questions are generated"})
    questions_per_step: int = field(default=32, metadata={"help": "questions asked per step (one engine call)"})
    topics_per_question: list[int] = field(default_factory=lambda: [2, 3], metadata={
        "help": "numbers of topics to combine, one drawn uniformly per question (paper: 2 or 3)"})
    diagonal_min_kps: int = field(default=5, metadata={
        "help": "Algorithm 1: a topic with more than this many KPs in one problem adds 1 to its diagonal cell"})
    sampling_mode: Literal["tcpm", "random"] = field(default="tcpm", metadata={
        "help": "tcpm: topics drawn from the co-occurrence matrix (the paper); random: uniform topics (the paper's "
                "ablation baseline, Table 2)"})
    question_column: str = field(default="question", metadata={"help": "seed problem column"})
    solution_column: str = field(default="solution", metadata={"help": "seed solution column"})
    prompt: str = field(default="kpdds_question.jinja", metadata={"help": "question template (blocks, num_key_points)"})
    chat: bool = field(default=True, metadata={"help": "send the prompt as a chat turn"})
    max_steps: int = field(default=50, metadata={"help": "give up (counted) after this many steps short of the target"})
    constrain: Literal["auto", "json", "none"] = field(default="auto", metadata={
        "help": 'the problem as {"question": ...} (the template is told json_answer) instead of <Q> ... </Q>. '
                + CONSTRAIN_HELP})


_Q = re.compile(r"<Q>(.*?)</Q>", re.DOTALL)


def parse_question(text: str, as_json: bool) -> str | None:
    """The new problem from a teacher's answer: the ``question`` of a JSON answer (``constrain: json``), else
    the last ``<Q> ... </Q>`` block; None when there is none (or it is blank)."""
    if as_json:
        q = (json_object(text) or {}).get("question")
        return q.strip() or None if isinstance(q, str) else None
    m = _Q.findall(text)
    return m[-1].strip() or None if m else None


class KpddsQuestionsStage(IterativeStage):
    """Samples KP combinations from the TCPM of all seeds and asks for new problems."""

    kind = "kpdds_questions"
    Config = KpddsQuestionsConfig
    sampling_defaults = {"temperature": 0.7, "top_p": 0.95, "max_tokens": 512}

    def __init__(self, config: KpddsQuestionsConfig, base_dir):
        super().__init__(config, base_dir)
        c = config
        if c.num_questions < 1 or c.questions_per_step < 1 or not c.topics_per_question \
                or any(k < 1 for k in c.topics_per_question):
            raise ValueError("num_questions, questions_per_step and every topics_per_question entry must be >= 1")
        self.tpl = self.load_template("prompt")
        self.params = self.sampling()

    def required_columns(self) -> set[str]:
        return {"topics", self.config.question_column, self.config.solution_column}

    def output_columns(self, input_columns: list[str]) -> list[str]:
        return [ROW_ID, "kp_prompt", "question", "topics", "key_points", "practice_ids", "practice", "step",
                PROVENANCE]

    @staticmethod
    def practice_index(rows: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, list[str]]]]:
        """(topics in first-seen order, per seed: topic -> its KPs)."""
        topics: list[str] = []
        probs = []
        for r in rows:
            prob = {t["topic"]: list(t["key_points"]) for t in r["topics"]}
            topics += [t for t in prob if t not in topics]
            probs.append(prob)
        return topics, probs

    def combination(self, tcpm, topics, probs, rows, rng) -> list[dict[str, Any]]:
        """One KPs-practice set: per sampled topic, a random seed holding it and that topic's KPs."""
        k = rng.choice(self.config.topics_per_question)
        if self.config.sampling_mode == "tcpm":
            ids = core.sample_topics(tcpm, k, rng)
        else:
            ids = rng.sample(range(len(topics)), min(k, len(topics)))
        blocks = []
        for i in ids:
            holders = [j for j, p in enumerate(probs) if topics[i] in p]
            j = rng.choice(holders)
            blocks.append({"topic": topics[i], "key_points": probs[j][topics[i]], "seed": rows[j][ROW_ID],
                           "question": rows[j][self.config.question_column],
                           "solution": rows[j][self.config.solution_column]})
        return blocks

    def step(self, rows, produced, step, ctx: StageContext):
        c = self.config
        if len(produced) >= c.num_questions or step > c.max_steps:
            return None
        if step == c.max_steps:
            ctx.stats.add("stopped_at_max_steps_short_of_target", c.num_questions - len(produced))
            return []
        topics, probs = self.practice_index(rows)
        if not topics:
            return None
        tcpm = core.build_tcpm(probs, topics, c.diagonal_min_kps)
        if step == 0:
            ctx.stats.add("topics", len(topics))
            ctx.stats.add("tcpm_nonzero_cells", sum(x > 0 for row in tcpm for x in row))
        rng = ctx.rng(step)
        need = min(c.questions_per_step, c.num_questions - len(produced))
        combos = [self.combination(tcpm, topics, probs, rows, rng) for _ in range(need)]
        combos = [b for b in combos if b]
        as_json = constrained(c.constrain, ctx.generator().info.backend)
        prompts = [self.tpl.render({"blocks": b, "num_key_points": sum(len(x["key_points"]) for x in b),
                                    "json_answer": as_json}, f"step {step}") for b in combos]
        reqs = [dataclasses.replace(text_request(p, self.params, c.chat),
                                    json_schema=QUESTION_SCHEMA if as_json else None) for p in prompts]
        results = ctx.call(reqs, owners=[f"step{step}/q{k}" for k in range(len(reqs))])
        gen, new = ctx.generator(), []
        for blocks, prompt, res in zip(combos, prompts, results):
            if res.error:
                continue
            comp = res.completions[0]
            question = parse_question(comp.text, as_json)
            if question is None and comp.finish_reason == "length":
                # cut at max_tokens (also counted as truncated_outputs): a truncation, as in every stage's parse
                # figure, not an answer that failed to parse
                ctx.stats.add("dropped_truncated_question")
                continue
            ctx.stats.add("outputs")
            if question is None:
                ctx.stats.add("dropped_no_question_json" if as_json else "dropped_no_question_tags")
                continue
            ctx.stats.add("parsed")
            ctx.stats.add(f"combinations_{len(blocks)}_topics")
            new.append({ROW_ID: f"kp-{step:05d}-{len(new):05d}", "kp_prompt": prompt, "question": question,
                        "topics": [b["topic"] for b in blocks], "key_points": [b["key_points"] for b in blocks],
                        "practice_ids": [b["seed"] for b in blocks],
                        "practice": [{"question": b["question"], "solution": b["solution"]} for b in blocks],
                        "step": step, PROVENANCE: [ctx.provenance(gen, self.params, None, comp.finish_reason)]})
        return new


# -- 3. question scoring -----------------------------------------------------------------------------------------------

_SCORE = re.compile(r"score\s*[:=]\s*\**\s*([01](?:\.\d+)?|\.\d+)", re.IGNORECASE)


SCORE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"justification": {"type": "string", "maxLength": 600},
                   "score": {"type": "number", "minimum": 0, "maximum": 1}},
    "required": ["justification", "score"], "additionalProperties": False,
}
"""``kpdds_score``'s answer under ``constrain: json``: the brief justification first, then the score."""


def parse_unit_score(text: str, as_json: bool = False) -> float | None:
    """The last ``Score: x`` with x in [0, 1] (or, ``as_json``, the answer's ``score``), else None."""
    if as_json:
        v = (json_object(text) or {}).get("score")
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0
        return float(v) if ok else None
    m = _SCORE.findall(text or "")
    if not m:
        return None
    v = float(m[-1])
    return v if 0.0 <= v <= 1.0 else None


@dataclass
class KpddsScoreConfig(ModelConfig):
    threshold: float = field(default=0.85, metadata={"help": "keep questions scored >= this (paper: 0.85)"})
    prompt: str = field(default="kpdds_score.jinja", metadata={"help": "scoring template (question, key_points)"})
    chat: bool = field(default=True, metadata={"help": "send the prompt as a chat turn"})
    constrain: Literal["auto", "json", "none"] = field(default="auto", metadata={
        "help": 'the answer as {"justification": ..., "score": x in [0, 1]} (the template is told json_answer) '
                'instead of a closing "Score: x" line. ' + CONSTRAIN_HELP})


class KpddsScoreStage(ModelStage):
    """The teacher's [0, 1] quality score of each question; below the threshold or unparseable: dropped."""

    kind = "kpdds_score"
    Config = KpddsScoreConfig
    sampling_defaults = {"temperature": 0.0, "max_tokens": 256}
    adds = ("question_score",)

    def __init__(self, config: KpddsScoreConfig, base_dir):
        super().__init__(config, base_dir)
        if not 0.0 <= config.threshold <= 1.0:
            raise ValueError(f"threshold: expected a number in [0, 1], got {config.threshold}")
        self.tpl = self.load_template("prompt")
        self.params = self.sampling()

    def required_columns(self) -> set[str]:
        return {"question", "key_points"}

    def as_json(self, ctx: StageContext) -> bool:
        return constrained(self.config.constrain, ctx.generator(self.model_name()).info.backend)

    def requests(self, row: dict[str, Any], ctx: StageContext) -> Any:
        kps = [k for group in row["key_points"] for k in group]
        as_json = self.as_json(ctx)
        text = self.tpl.render({"question": row["question"], "key_points": kps, "json_answer": as_json}, row[ROW_ID])
        req = self.chat(text, self.params, chat=self.config.chat)
        return dataclasses.replace(req, json_schema=SCORE_SCHEMA) if as_json else req

    def parse(self, row: dict[str, Any], res: Any, ctx: StageContext) -> Any:
        v = parse_unit_score(res.completions[0].text, self.as_json(ctx))
        ctx.stats.add("outputs")
        ctx.stats.add("parsed", int(v is not None))
        if v is None:
            return Drop("unparseable_score")
        return {"question_score": v}

    def keep(self, row: dict[str, Any]) -> bool | Drop:
        return True if row["question_score"] >= self.config.threshold else Drop("score_below_threshold")


# -- 4. solutions and the vote -------------------------------------------------------------------------------------------

@dataclass
class KpddsSolveConfig(ModelConfig):
    n: int = field(default=10, metadata={"help": "solutions sampled per question (paper: 10)"})
    max_subquestions: int = field(default=3, metadata={"help": "drop questions with more sub-questions (paper: 3)"})
    cs_reduce: Literal["max", "min"] = field(default="max", metadata={
        "help": "CS(s_i) over sub-questions: max (the paper) or min (stricter)"})
    arithmetic_check: bool = field(default=True, metadata={
        "help": "drop solutions whose 'a op b = c' equations do not hold when re-evaluated in Python"})
    prompt: str = field(default="kpdds_solve.jinja", metadata={"help": "solving template (question, examples)"})
    chat: bool = field(default=True, metadata={"help": "send the prompt as a chat turn"})
    extract_answer: bool = field(default=True, metadata={
        "help": "a finished solution without a \\boxed{} or 'The answer is' answer gets a second, greedy prompt "
                "asking only for the number (Kojima et al. 2022 answer extraction); the number is appended to "
                "the solution as a boxed final line and the row marks it (`answer_extracted`)"})
    constrain: Literal["auto", "json", "none"] = field(default="auto", metadata={
        "help": "answer extraction's reply: " + CONSTRAIN_HELP})
    sft_instruction: str = field(default=SFT_INSTRUCTION, metadata={
        "help": "appended (after a blank line) to the question in the SFT prompt; '' for the bare question"})
    format: Literal["conversational", "standard"] = field(default="conversational", metadata={
        "help": "TRL format of the SFT columns"})


class KpddsSolveStage(ModelStage):
    """n solutions per question, arithmetic re-check, Consensus Score Vector vote -> SFT rows."""

    kind = "kpdds_solve"
    Config = KpddsSolveConfig
    sampling_defaults = {"temperature": 0.75, "top_p": 0.95, "max_tokens": 1024}
    adds = ("prompt", "completion", "solution", "answer", "answer_extracted", "agreement", "consensus_scores",
            "num_solutions", "num_sampled")

    def __init__(self, config: KpddsSolveConfig, base_dir):
        super().__init__(config, base_dir)
        if config.n < 2 or config.max_subquestions < 1:
            raise ValueError("n must be >= 2 and max_subquestions >= 1")
        self.tpl = self.load_template("prompt")
        self.params = self.sampling(n="n")

    def required_columns(self) -> set[str]:
        return {"question", "practice"}

    def requests(self, row: dict[str, Any], ctx: StageContext) -> Any:
        text = self.tpl.render({"question": row["question"], "examples": row["practice"]}, row[ROW_ID])
        return self.chat(text, self.params, chat=self.config.chat)

    def run(self, row: dict[str, Any], ctx: StageContext):
        c = self.config
        asked = self.requests(row, ctx)
        res = yield asked
        texts = [comp.text for comp in res.completions]
        answers = [core.extract_answers(t) for t in texts]
        found: list[str | None] = [None] * len(texts)
        if c.extract_answer:
            texts, found = yield from extraction.extract_missing(
                [asked] * len(texts), res.completions, texts, [not a for a in answers],
                lambda a: f"\n\nThe final answer is $\\boxed{{{a}}}$.", c.constrain, self.model_name(), ctx)
        answers = [a if f is None else [f] for a, f in zip(answers, found)]
        return self._vote(row, res, texts, answers, [f is not None for f in found], ctx)

    def _vote(self, row: dict[str, Any], res: Any, texts: list[str], answers: list[list[str]],
              extracted: list[bool], ctx: StageContext) -> Any:
        c = self.config
        sols = []
        for comp, text, ans, ext in zip(res.completions, texts, answers, extracted):
            if not ans and comp.finish_reason == "length":
                # cut at max_tokens before any answer: a truncation (counted by the context as
                # truncated_outputs), as in every stage's parse figure, not a reply that failed to parse
                ctx.stats.add("solutions_cut_without_answer")
                continue
            ctx.stats.add("outputs")
            if not ans:
                ctx.stats.add("solutions_without_answer")
                continue
            ctx.stats.add("parsed")  # an answer was read (the arithmetic check is a filter, not a parse failure)
            if c.arithmetic_check and core.arithmetic_errors(text):
                ctx.stats.add("solutions_with_arithmetic_error")
                continue
            sols.append((text, ans, ext))
        # the number of sub-questions as the solutions that boxed their own answers count them (an extracted
        # answer is one number); for a several-part question the extracted single answers leave the vote
        counts = [len(a) for _, a, ext in sols if not ext] or [1]
        n_sub = max(set(counts), key=lambda k: (counts.count(k), -k))
        if n_sub > 1 and any(ext for _, _, ext in sols):
            ctx.stats.add("extracted_answers_of_multipart_questions", sum(ext for _, _, ext in sols))
            sols = [x for x in sols if not x[2]]
        if len(sols) < 2:
            return Drop("too_few_valid_solutions")
        if n_sub > c.max_subquestions:
            return Drop("too_many_subquestions")
        keep, cs = core.vote([a for _, a, _ in sols], c.cs_reduce)
        if not keep:
            return Drop("no_consensus")
        user = row["question"] + (f"\n\n{c.sft_instruction}" if c.sft_instruction else "")
        out = []
        for i in keep:
            text, ans, ext = sols[i]
            out.append({**sft_row(user, text, None, c.format), "solution": text, "answer": ans,
                        "answer_extracted": ext, "agreement": cs[i], "consensus_scores": cs,
                        "num_solutions": len(sols), "num_sampled": len(res.completions)})
        ctx.stats.add("questions_voted")
        ctx.stats.add("solutions_kept", len(out))
        return out if len(out) > 1 else out[0]
