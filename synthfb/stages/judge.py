"""LLM-as-a-judge from Self-Rewarding LMs (Yuan et al., 2024; spec section 6).

The judge reads one (prompt, response) with the additive 5-point rubric
(``prompts/judge_additive.jinja``) and ends with ``Score: N``. Each candidate
is judged ``samples`` times (default 3) in one engine call per chunk; the
score is the mean of the samples that parse. ``judge_pairs`` then takes the
highest and lowest scored candidates of each prompt as chosen/rejected and
drops ties.

``scoring`` says how a judgement becomes a number:

* ``text`` (the paper): sample ``samples`` judgements (justification, then
  ``Score: N``) and parse them; unparseable ones are counted and left out.
  The path for API models without prompt log-probabilities.
* ``logprobs`` (G-Eval, Liu et al. 2023; specs/methods-2.md section 9): the
  template is rendered with ``score_only`` (it asks for the score line
  only), each label "0".."5" of the additive scale is scored as the
  continuation ``"Score: N"`` (chat) or ``" N"`` after ``"...\nScore:"``
  (raw prompt) through the seam (one batched score call per chunk), the
  probabilities are renormalised over the six labels and the candidate's
  score is their weighted mean; nothing is parsed, ``samples`` and
  ``sampling`` do not apply. Rows also get ``score_probs`` (per candidate,
  label -> probability). See :mod:`synthfb.rank.label_scores`.
* ``auto`` (default): ``logprobs`` on local engines (vllm, transformers),
  ``text`` on others (openai: prompt log-probs need a vLLM server; set
  ``logprobs`` there).

Every judgement read is counted under ``outputs`` and each one that gave a
score under ``parsed`` (the run record's parse rate).

``emit`` says what a kept prompt becomes (:data:`synthfb.data.trl.EMITS`):
``pairs`` (default) one ``prompt``/``chosen``/``rejected`` row; ``unpaired``
two KTO rows ``prompt``/``completion``/``label`` (best: true, worst: false),
each with its ``score``; ``ranked`` one row with every scored candidate,
``prompt``/``completions``/``scores``/``ranks`` (unscored candidates left
out). A prompt without a pair (too few scored, a tie) is dropped in every
mode, so the three modes keep the same prompts.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from ..data import PROVENANCE, ROW_ID
from ..data.trl import RANKED_COLUMNS, UNPAIRED_COLUMNS, check_emit, trl_pair, trl_ranked, trl_unpaired
from ..engine.stage import Ask, Drop, ModelConfig, ModelStage, StageContext
from ..llm.types import ScoreResult
from ..rank.aggregate import pick_pair
from ..rank.label_scores import SCORING_MODES, LabelScorer, resolve_scoring

JUDGE_LABELS = ("0", "1", "2", "3", "4", "5")
"""The additive rubric's totals (it starts at 0), scored after ``Score:``."""

# "Score: 4", "**Score:** 4.5", "score = 3/5", "Score: **2**" (case-insensitive)
_SCORE = re.compile(r"score\s*(?:\*\*)?\s*[:=]\s*(?:\*\*)?\s*(\d+(?:\.\d+)?)", re.IGNORECASE)


def parse_score(text: str, lo: float = 0.0, hi: float = 5.0) -> tuple[float | None, str | None]:
    """The LAST ``Score: N`` in ``text``: ``(value, None)``, or ``(None,
    reason)`` with reason ``no_score`` or ``out_of_range``. Never raises."""
    if not isinstance(text, str):
        return None, "no_score"
    matches = _SCORE.findall(text)
    if not matches:
        return None, "no_score"
    try:
        v = float(matches[-1])
    except ValueError:  # pragma: no cover - the regex only matches numbers
        return None, "no_score"
    if not (lo <= v <= hi) or math.isnan(v):
        return None, "out_of_range"
    return v, None


def mean_scores(judgements: list[list[str] | None]) -> tuple[list[float], list[int], dict[str, int]]:
    """Per candidate: the mean of its parseable judgement scores (NaN when
    none parse or the request failed, ``None``), how many parsed, and
    counts of judgements, unparseable ones by reason, and unscored candidates."""
    scores, parsed, counts = [], [], {}

    def add(key: str, n: int = 1) -> None:
        counts[key] = counts.get(key, 0) + n

    for texts in judgements:
        vals = []
        for t in texts or []:
            v, why = parse_score(t)
            if v is None:
                add(f"unparseable_judgements_{why}")
            else:
                vals.append(v)
        add("judgements", len(texts or []))
        parsed.append(len(vals))
        if vals:
            scores.append(sum(vals) / len(vals))
        else:
            scores.append(math.nan)
            add("unscored_candidates")
    return scores, parsed, counts


@dataclass
class JudgePairsConfig(ModelConfig):
    prompt_column: str = field(default="prompt", metadata={"help": "column with the user prompt"})
    responses_column: str = field(default="responses", metadata={"help": "list column with the candidate responses (e.g. generate with n: 4, explode: false)"})
    judge_prompt: str = field(default="judge_additive.jinja", metadata={"help": "judge template (variables: prompt, response; score_only is true under logprobs scoring)"})
    samples: int = field(default=3, metadata={"help": "judgements sampled per candidate and averaged"})
    min_scored: int = field(default=2, metadata={"help": "keep a prompt only if at least this many candidates got a score"})
    min_margin: float = field(default=0.0, metadata={"help": "drop pairs whose score gap is <= this (0: drop exact ties)"})
    chat: bool = field(default=True, metadata={"help": "send the judge prompt as a chat user turn (false: raw prompt)"})
    format: Literal["conversational", "standard"] = field(default="conversational", metadata={"help": "TRL preference format of prompt/chosen/rejected"})
    scoring: Literal["auto", "logprobs", "text"] = field(default="auto", metadata={"help": "logprobs: probability-weighted mean over the scores 0-5 read from log-probs (G-Eval; samples/sampling unused); text: sample `samples` judgements and parse 'Score: N' (the paper; API models); auto: logprobs on vllm/transformers, text otherwise"})
    emit: Literal["pairs", "unpaired", "ranked"] = field(default="pairs", metadata={"help": "pairs: prompt/chosen/rejected (DPO, reward model); unpaired: two rows prompt/completion/label, best true and worst false (TRL KTO); ranked: prompt/completions/scores/ranks over every scored candidate (K-way reward model; ranks 1 = best, ties share)"})


class JudgePairsStage(ModelStage):
    """Scores every candidate with the additive 5-point judge and builds
    (best, worst) preference pairs; counts unparseable judgements."""

    kind = "judge_pairs"
    Config = JudgePairsConfig
    sampling_defaults = {"temperature": 0.7, "top_p": 0.9, "max_tokens": 256}

    def __init__(self, config: JudgePairsConfig, base_dir):
        super().__init__(config, base_dir)
        if config.samples < 1 or config.min_scored < 2:
            raise ValueError("samples must be >= 1 and min_scored >= 2")
        self.judge = self.load_template("judge_prompt")
        if {"prompt", "response"} - self.judge.variables:
            raise ValueError(f"{self.judge.source}: judge template must use `prompt` and `response`")
        self.params = self.sampling(n="samples")
        if config.scoring not in SCORING_MODES:
            raise ValueError(f"scoring: expected one of {list(SCORING_MODES)}, got {config.scoring!r}")
        self.scorer = LabelScorer(JUDGE_LABELS, "Score:", chat=config.chat)
        check_emit(config.emit)

    def scoring(self, ctx: StageContext) -> str:
        """``logprobs`` or ``text``: the ``scoring`` option on this stage's backend."""
        return resolve_scoring(self.config.scoring, ctx.generator(self.model_name()).info.backend)

    def required_columns(self) -> set[str]:
        return {self.config.prompt_column, self.config.responses_column}

    def consumes(self) -> set[str]:
        return {self.config.prompt_column}

    def output_columns(self, input_columns: list[str]) -> list[str]:
        emit = self.config.emit
        head = {"pairs": ["prompt", "chosen", "rejected", "score_chosen", "score_rejected", "score_margin"],
                "unpaired": [*UNPAIRED_COLUMNS, "score"], "ranked": list(RANKED_COLUMNS)}[emit]
        drop = {self.config.prompt_column, PROVENANCE, "prompt", "chosen", "rejected", *head}
        return [c for c in input_columns if c not in drop] + head + ["all_scores", "judgements_parsed"] + (
            ["score_probs"] if self.config.scoring != "text" else []) + [PROVENANCE]

    def requests(self, row: dict[str, Any], ctx: StageContext) -> Any:
        cfg = self.config
        prompt, cands = row.get(cfg.prompt_column), row.get(cfg.responses_column)
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"row {row.get(ROW_ID)}: column {cfg.prompt_column!r} must be a non-empty string")
        if not isinstance(cands, list) or not all(isinstance(c, str) for c in cands):
            raise ValueError(f"row {row.get(ROW_ID)}: column {cfg.responses_column!r} must be a list of strings")
        if len(cands) < cfg.min_scored:
            return Drop("too_few_candidates")
        if self.scoring(ctx) == "logprobs":  # every label of every candidate, batched with the chunk's other rows
            return Ask([r for c in cands for r in self.scorer.requests(
                self.judge.render({"prompt": prompt, "response": c, "score_only": True}, row[ROW_ID]))])
        return Ask([self.chat(self.judge.render({"prompt": prompt, "response": c}, row[ROW_ID]), self.params,
                              chat=cfg.chat) for c in cands], partial=True)

    def parse(self, row: dict[str, Any], results: list, ctx: StageContext) -> Any:
        cfg = self.config
        cands = row[cfg.responses_column]
        probs = None
        if results and isinstance(results[0], ScoreResult):
            read = self.scorer.read_all(results)
            scores = [x.score for x in read]
            parsed = [int(x.ok) for x in read]
            probs = [x.rounded() if x.ok else None for x in read]
            counts = {"judgements": len(read), "unparseable_judgements_no_label_mass": len(read) - sum(parsed),
                      "unscored_candidates": len(read) - sum(parsed), "scored_from_logprobs": len(read)}
        else:
            scores, parsed, counts = mean_scores([None if r.error else [c.text for c in r.completions]
                                                  for r in results])
        for key, v in counts.items():
            ctx.stats.add(key, v)
        ctx.stats.add("outputs", counts.get("judgements", 0))
        ctx.stats.add("parsed", counts.get("judgements", 0) - sum(v for k, v in counts.items()
                                                                  if k.startswith("unparseable_judgements_")))
        if sum(not math.isnan(s) for s in scores) < cfg.min_scored:
            return Drop("too_few_scored")
        pick = pick_pair(scores, cands, cfg.min_margin)
        if pick.reason:
            return Drop(pick.reason)
        meta = {"all_scores": [None if math.isnan(s) else s for s in scores], "judgements_parsed": parsed,
                **({"score_probs": probs} if probs is not None else {}), PROVENANCE: {"finish_reason": "judged"}}
        prompt = row[cfg.prompt_column]
        if cfg.emit == "unpaired":
            return [{**r, "score": scores[i], **meta} for r, i in
                    zip(trl_unpaired(prompt, cands[pick.best], cands[pick.worst], cfg.format), (pick.best, pick.worst))]
        if cfg.emit == "ranked":
            keep = [i for i, s in enumerate(scores) if not math.isnan(s)]
            return {**trl_ranked(prompt, [cands[i] for i in keep], [scores[i] for i in keep], cfg.format), **meta}
        return {**trl_pair(prompt, cands[pick.best], cands[pick.worst], cfg.format),
                "score_chosen": scores[pick.best], "score_rejected": scores[pick.worst], "score_margin": pick.margin,
                **meta}
