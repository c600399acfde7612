"""LLM-as-a-judge from Self-Rewarding LMs (Yuan et al., 2024; spec section 6).

The judge reads one (prompt, response) with the additive 5-point rubric
(``prompts/judge_additive.jinja``) and ends with ``Score: N``. Each candidate
is judged ``samples`` times (default 3) in one engine call per chunk; the
score is the mean of the samples that parse. ``judge_pairs`` then takes the
highest and lowest scored candidates of each prompt as chosen/rejected and
drops ties.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from ..data import PROVENANCE, ROW_ID
from ..engine.stage import Stage, StageContext
from ..llm.types import GenerationRequest
from ..rank.aggregate import pick_pair, trl_pair
from .templates import load_template

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
class JudgePairsConfig:
    prompt_column: str = field(default="prompt", metadata={"help": "column with the user prompt"})
    responses_column: str = field(default="responses", metadata={"help": "list column with the candidate responses (e.g. generate with n: 4, explode: false)"})
    judge_prompt: str = field(default="judge_additive.jinja", metadata={"help": "judge template (variables: prompt, response)"})
    samples: int = field(default=3, metadata={"help": "judgements sampled per candidate and averaged"})
    sampling: dict = field(default_factory=dict, metadata={"help": "judge sampling (default temperature 0.7, top_p 0.9, max_tokens 256)"})
    min_scored: int = field(default=2, metadata={"help": "keep a prompt only if at least this many candidates got a score"})
    min_margin: float = field(default=0.0, metadata={"help": "drop pairs whose score gap is <= this (0: drop exact ties)"})
    chat: bool = field(default=True, metadata={"help": "send the judge prompt as a chat user turn (false: raw prompt)"})
    format: Literal["conversational", "standard"] = field(default="conversational", metadata={"help": "TRL preference format of prompt/chosen/rejected"})
    model: str | None = field(default=None, metadata={"help": "judge model (default: the pipeline's, i.e. self-rewarding)"})


class JudgePairsStage(Stage):
    """Scores every candidate with the additive 5-point judge and builds
    (best, worst) preference pairs; counts unparseable judgements."""

    kind = "judge_pairs"
    template_fields = ("judge_prompt",)
    Config = JudgePairsConfig
    uses_model = True

    def __init__(self, config: JudgePairsConfig, base_dir):
        super().__init__(config, base_dir)
        if config.samples < 1 or config.min_scored < 2:
            raise ValueError("samples must be >= 1 and min_scored >= 2")
        self.template = load_template(self, "judge_prompt")
        if {"prompt", "response"} - self.template.variables:
            raise ValueError(f"{self.template.source}: judge template must use `prompt` and `response`")
        self.params = self.sampling_params("sampling", {"temperature": 0.7, "top_p": 0.9, "max_tokens": 256},
                                           n="samples")

    def required_columns(self) -> set[str]:
        return {self.config.prompt_column, self.config.responses_column}

    def output_columns(self, input_columns: list[str]) -> list[str]:
        drop = {self.config.prompt_column, PROVENANCE, "prompt", "chosen", "rejected"}
        return [c for c in input_columns if c not in drop] + [
            "prompt", "chosen", "rejected", "score_chosen", "score_rejected", "margin", "all_scores",
            "judgements_parsed", PROVENANCE]

    def fingerprint(self) -> dict[str, Any]:
        fp = super().fingerprint()
        fp["template_sha256"] = self.template.sha256
        return fp

    def _request(self, text: str) -> GenerationRequest:
        if self.config.chat:
            return GenerationRequest(messages=[{"role": "user", "content": text}], params=self.params)
        return GenerationRequest(prompt=text, params=self.params)

    def process(self, rows: list[dict[str, Any]], ctx: StageContext) -> list[dict[str, Any]]:
        cfg = self.config
        gen = ctx.generator(cfg.model)
        reqs, owner, items = [], [], []
        for r in rows:
            prompt = r.get(cfg.prompt_column)
            cands = r.get(cfg.responses_column)
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"row {r.get(ROW_ID)}: column {cfg.prompt_column!r} must be a non-empty string")
            if not isinstance(cands, list) or not all(isinstance(c, str) for c in cands):
                raise ValueError(f"row {r.get(ROW_ID)}: column {cfg.responses_column!r} must be a list of strings")
            if len(cands) < cfg.min_scored:
                ctx.stats.add("too_few_candidates")
                continue
            k = len(items)
            items.append((r, prompt, cands))
            for i, c in enumerate(cands):
                reqs.append(self._request(self.template.render({"prompt": prompt, "response": c}, r[ROW_ID])))
                owner.append((k, i))
        results = gen.generate(reqs, desc=ctx.stage_name)
        texts: list[list[list[str] | None]] = [[None] * len(c) for _, _, c in items]
        for (k, i), res in zip(owner, results):
            if res.error:
                ctx.stats.add("failed_requests")
                ctx.record_failure(items[k][0][ROW_ID], f"candidate {i}: {res.error}")
                continue
            texts[k][i] = [c.text for c in res.completions]
        scores, parsed = [], []
        for per_cand in texts:
            s_k, n_k, counts = mean_scores(per_cand)
            for key, v in counts.items():
                ctx.stats.add(key, v)
            scores.append(s_k)
            parsed.append(n_k)
        out = []
        for k, (r, prompt, cands) in enumerate(items):
            scored = sum(not math.isnan(s) for s in scores[k])
            if scored < cfg.min_scored:
                ctx.stats.add("too_few_scored")
                continue
            pick = pick_pair(scores[k], cands, cfg.min_margin)
            if pick.reason:
                ctx.stats.add(pick.reason)
                continue
            base = {c: v for c, v in r.items() if c not in (cfg.prompt_column, PROVENANCE)}
            prov = ctx.provenance(gen, self.params, self.template.sha256, "judged")
            out.append({
                **base, **trl_pair(prompt, cands[pick.best], cands[pick.worst], cfg.format),
                "score_chosen": scores[k][pick.best], "score_rejected": scores[k][pick.worst],
                "margin": pick.margin,
                "all_scores": [None if math.isnan(s) else s for s in scores[k]],
                "judgements_parsed": parsed[k],
                PROVENANCE: list(r.get(PROVENANCE) or []) + [prov],
            })
        return out
