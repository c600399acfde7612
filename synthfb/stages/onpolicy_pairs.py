"""On-policy preference pairs, PairRM/SimPO style (spec section 5).

For every prompt: sample ``n`` responses (default 5, temperature 0.8,
top_p 0.95) from the policy in ONE engine call per chunk, drop prompts whose
responses are all identical, rank the candidates with a ranker from
``synthfb.rank`` over the full comparison matrix (both orders), aggregate by
mean logit margin (default) or wins, and emit chosen = best, rejected =
worst; exact ties are dropped. Everything is joined on the prompt's
``row_id``, never on list order (the SimPO order bug, spec 5.6).

With ``candidates_column`` set, the stage ranks candidates already in the
data (e.g. SimPO's ``all_generated_responses``) instead of sampling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from ..data import PROVENANCE, ROW_ID
from ..engine.stage import MapStage, StageContext, config_field
from ..llm.types import GenerationRequest, SamplingParams
from ..rank import load_ranker
from ..rank.aggregate import pick_pair, position_bias, ranks_from_scores, scores_from_matrix, trl_pair
from ..llm.prompts import find_file

_SCORING = SamplingParams(n=1, temperature=0.0, max_tokens=1)  # what provenance records for log-prob scoring


@dataclass
class OnPolicyPairsConfig:
    prompt_column: str = field(default="prompt", metadata={"help": "column with the user prompt"})
    n: int = field(default=5, metadata={"help": "responses sampled per prompt (one engine call per chunk)"})
    sampling: dict = field(default_factory=dict, metadata={"help": "policy sampling (default temperature 0.8, top_p 0.95, max_tokens 512)"})
    system: str | None = field(default=None, metadata={"help": "system message for the policy"})
    candidates_column: str | None = field(default=None, metadata={"help": "rank this list column instead of sampling"})
    ranker: Literal["llm_judge", "reward_model", "pairrm"] = field(default="llm_judge", metadata={"help": "pairwise ranker (synthfb.rank)"})
    ranker_model: str | None = field(default=None, metadata={"help": "llm_judge: judge model name (default: the pipeline's)"})
    ranker_path: str | None = field(default=None, metadata={"help": "reward_model / pairrm: local checkpoint folder"})
    ranker_prompt: str = field(default="pairwise_judge.jinja", metadata={"help": "llm_judge: A/B template (prompt, response_a, response_b)"})
    ranker_chat: bool = field(default=False, metadata={"help": "llm_judge: send the A/B prompt as a chat turn (false: raw prompt)"})
    ranker_options: list[str] = field(default_factory=lambda: [" (A)", " (B)"], metadata={"help": "llm_judge: the two option strings"})
    ranker_batch_size: int = field(default=8, metadata={"help": "reward_model / pairrm: forward batch size"})
    aggregate: Literal["max_logits", "max_wins"] = field(default="max_logits", metadata={"help": "max_logits: mean logit margin; max_wins: number of wins"})
    min_margin: float = field(default=0.0, metadata={"help": "drop pairs whose aggregated score gap is <= this (0: exact ties)"})
    format: Literal["conversational", "standard"] = field(default="conversational", metadata={"help": "TRL preference format of prompt/chosen/rejected"})
    model: str | None = field(default=None, metadata={"help": "policy model (default: the pipeline's)"})


class OnPolicyPairsStage(MapStage):
    """Sample N, rank with a pairwise ranker, keep (best, worst)."""

    kind = "onpolicy_pairs"
    Config = OnPolicyPairsConfig
    uses_model = True

    def __init__(self, config: OnPolicyPairsConfig, base_dir):
        super().__init__(config, base_dir)
        if config.n < 2:
            raise ValueError(f"n must be >= 2, got {config.n}")
        self.params = self.sampling_params("sampling", {"temperature": 0.8, "top_p": 0.95, "max_tokens": 512}, n="n")
        self.template = None
        if config.ranker == "llm_judge":
            self.template = self.load_template("ranker_prompt")
            opts = config.ranker_options
            if len(opts) != 2 or opts[0] == opts[1]:
                raise ValueError(f"ranker_options: need exactly two distinct option strings, got {opts!r}")
        elif not config.ranker_path:
            raise ValueError(f"ranker {config.ranker} needs `ranker_path` (a local checkpoint folder)")
        self._ranker = None

    def check(self) -> None:
        if self.config.ranker_path:
            with config_field("ranker_path"):
                find_file(self.config.ranker_path, self.base_dir, "ranker checkpoint", want="dir")

    def required_columns(self) -> set[str]:
        cols = {self.config.prompt_column}
        if self.config.candidates_column:
            cols.add(self.config.candidates_column)
        return cols

    def output_columns(self, input_columns: list[str]) -> list[str]:
        drop = {self.config.prompt_column, PROVENANCE, "prompt", "chosen", "rejected"}
        return [c for c in input_columns if c not in drop] + [
            "prompt", "chosen", "rejected", "score_chosen", "score_rejected", "margin", "all_responses",
            "all_scores", "all_ranks", "comparison_matrix", "position_bias", "ranker", PROVENANCE]

    def fingerprint(self) -> dict[str, Any]:
        fp = super().fingerprint()
        if self.template is not None:
            fp["template_sha256"] = self.template.sha256
        if self.config.ranker_path:
            from ..llm.models import model_revision

            fp["ranker_revision"] = model_revision(str(find_file(self.config.ranker_path, self.base_dir)))
            fp["config"]["ranker_path"] = str(self.config.ranker_path).rstrip("/").split("/")[-1]
        if self.config.ranker == "llm_judge" and self.config.ranker_model:
            fp["ranker_model"] = self.config.ranker_model
        return fp

    def ranker(self, ctx: StageContext):
        cfg = self.config
        if cfg.ranker == "llm_judge":
            return load_ranker("llm_judge", generator=ctx.generator(cfg.ranker_model), template=self.template,
                               options=cfg.ranker_options, chat=cfg.ranker_chat)
        if self._ranker is None:
            path = str(find_file(cfg.ranker_path, self.base_dir, "ranker checkpoint"))
            self._ranker = load_ranker(cfg.ranker, path=path, batch_size=cfg.ranker_batch_size)
        return self._ranker

    def _request(self, prompt: str) -> GenerationRequest:
        msgs = [{"role": "system", "content": self.config.system}] if self.config.system else []
        return GenerationRequest(messages=msgs + [{"role": "user", "content": prompt}], params=self.params)

    def process(self, rows: list[dict[str, Any]], ctx: StageContext) -> list[dict[str, Any]]:
        cfg = self.config
        prompts: dict[str, str] = {}
        for r in rows:
            p = r.get(cfg.prompt_column)
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"row {r.get(ROW_ID)}: column {cfg.prompt_column!r} must be a non-empty string")
            prompts[r[ROW_ID]] = p
        cands: dict[str, list[str]] = {}
        finish: dict[str, str] = {}
        gen = None
        if cfg.candidates_column:
            for r in rows:
                c = r.get(cfg.candidates_column)
                if not isinstance(c, list) or not all(isinstance(x, str) for x in c):
                    raise ValueError(f"row {r[ROW_ID]}: column {cfg.candidates_column!r} must be a list of strings")
                cands[r[ROW_ID]] = c
                finish[r[ROW_ID]] = "given"
        else:
            gen = ctx.generator(cfg.model)
            ids = [r[ROW_ID] for r in rows]
            results = gen.generate([self._request(prompts[i]) for i in ids], desc=f"{ctx.stage_name} sample")
            for rid, res in zip(ids, results):
                if res.error:
                    ctx.stats.add("failed_requests")
                    ctx.record_failure(rid, res.error)
                    continue
                ctx.stats.add("truncated_responses", sum(c.finish_reason == "length" for c in res.completions))
                cands[rid] = [c.text for c in res.completions]
                finish[rid] = ",".join(c.finish_reason for c in res.completions)
        keep = []
        for rid, cs in cands.items():
            if len(cs) < 2:
                ctx.stats.add("fewer_than_two_responses")
            elif len(set(cs)) == 1:
                ctx.stats.add("all_responses_identical")
            else:
                keep.append(rid)
        ranker = self.ranker(ctx) if keep else None
        mats = dict(zip(keep, ranker.compare([prompts[i] for i in keep], [cands[i] for i in keep]))) if keep else {}
        out = []
        for r in rows:
            rid = r[ROW_ID]
            if rid not in mats:
                continue
            m = mats[rid]
            scores = scores_from_matrix(m, cfg.aggregate)
            pick = pick_pair(scores, cands[rid], cfg.min_margin)
            if pick.reason:
                ctx.stats.add(pick.reason)
                continue
            bias = position_bias(m)
            base = {c: v for c, v in r.items() if c not in (cfg.prompt_column, PROVENANCE)}
            history = list(r.get(PROVENANCE) or [])
            if gen is not None:
                history.append(ctx.provenance(gen, self.params, "", finish[rid]))
            if cfg.ranker == "llm_judge":
                history.append(ctx.provenance(ranker.gen, _SCORING, self.template.sha256, "scored"))
            out.append({
                **base, **trl_pair(prompts[rid], cands[rid][pick.best], cands[rid][pick.worst], cfg.format,
                                   cfg.system),
                "score_chosen": float(scores[pick.best]), "score_rejected": float(scores[pick.worst]),
                "margin": float(pick.margin),
                "all_responses": cands[rid],
                "all_scores": [float(x) for x in scores],
                "all_ranks": [int(x) for x in ranks_from_scores(scores)],
                "comparison_matrix": [[float(x) for x in row] for row in m],
                "position_bias": None if math.isnan(bias) else bias,
                "ranker": ranker.name,
                PROVENANCE: history,
            })
        return out
