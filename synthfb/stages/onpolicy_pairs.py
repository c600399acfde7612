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

``emit`` (:data:`synthfb.data.trl.EMITS`): ``pairs`` (default) one
``prompt``/``chosen``/``rejected`` row per prompt; ``unpaired`` two KTO rows
``prompt``/``completion``/``label`` (best: true, worst: false) with their
``score``; ``ranked`` one row ``prompt``/``completions``/``scores``/``ranks``
over all N candidates (the aggregated scores; ranks 1 = best, ties share),
which replaces ``all_responses``/``all_scores``/``all_ranks``. Prompts
without a pair (identical responses, an exact tie) are dropped in every mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from ..data import PROVENANCE, ROW_ID
from ..data.trl import RANKED_COLUMNS, UNPAIRED_COLUMNS, check_emit, trl_ranked, trl_unpaired
from ..engine.stage import SCORING, Ask, ModelConfig, ModelStage, StageContext, config_field
from ..llm.prompts import find_file
from ..rank import load_ranker
from ..rank.aggregate import pick_pair, position_bias, ranks_from_scores, scores_from_matrix, trl_pair


@dataclass
class OnPolicyPairsConfig(ModelConfig):
    prompt_column: str = field(default="prompt", metadata={"help": "column with the user prompt"})
    n: int = field(default=5, metadata={"help": "responses sampled per prompt (one engine call per chunk)"})
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
    emit: Literal["pairs", "unpaired", "ranked"] = field(default="pairs", metadata={"help": "pairs: prompt/chosen/rejected (DPO, reward model); unpaired: two rows prompt/completion/label, best true and worst false (TRL KTO); ranked: prompt/completions/scores/ranks over all n candidates (K-way reward model; ranks 1 = best, ties share)"})


class OnPolicyPairsStage(ModelStage):
    """Sample N, rank with a pairwise ranker, keep (best, worst)."""

    kind = "onpolicy_pairs"
    Config = OnPolicyPairsConfig
    sampling_defaults = {"temperature": 0.8, "top_p": 0.95, "max_tokens": 512}

    def __init__(self, config: OnPolicyPairsConfig, base_dir):
        super().__init__(config, base_dir)
        if config.n < 2:
            raise ValueError(f"n must be >= 2, got {config.n}")
        self.params = self.sampling(n="n")
        if config.ranker == "llm_judge":
            self.template = self.load_template("ranker_prompt")
            opts = config.ranker_options
            if len(opts) != 2 or opts[0] == opts[1]:
                raise ValueError(f"ranker_options: need exactly two distinct option strings, got {opts!r}")
        elif not config.ranker_path:
            raise ValueError(f"ranker {config.ranker} needs `ranker_path` (a local checkpoint folder)")
        self._ranker = None
        check_emit(config.emit)

    def check(self) -> None:
        if self.config.ranker_path:
            with config_field("ranker_path"):
                find_file(self.config.ranker_path, self.base_dir, "ranker checkpoint", want="dir")

    def required_columns(self) -> set[str]:
        return {self.config.prompt_column, self.config.candidates_column} - {None}

    def output_columns(self, input_columns: list[str]) -> list[str]:
        head = {"pairs": ["prompt", "chosen", "rejected", "score_chosen", "score_rejected", "score_margin",
                          "all_responses", "all_scores", "all_ranks"],
                "unpaired": [*UNPAIRED_COLUMNS, "score", "all_responses", "all_scores", "all_ranks"],
                "ranked": list(RANKED_COLUMNS)}[self.config.emit]
        drop = {self.config.prompt_column, PROVENANCE, "prompt", "chosen", "rejected", "all_responses", *head}
        return [c for c in input_columns if c not in drop] + head + [
            "comparison_matrix", "position_bias", "ranker", PROVENANCE]

    def fingerprint(self) -> dict[str, Any]:
        # templates are hashed by load_template; this only adds the ranker checkpoint, by its
        # content (revision) rather than by where it lies
        fp = super().fingerprint()
        if self.config.ranker_path:
            from ..llm.models import model_revision

            fp["ranker_revision"] = model_revision(str(find_file(self.config.ranker_path, self.base_dir)))
            fp["config"]["ranker_path"] = str(self.config.ranker_path).rstrip("/").split("/")[-1]
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

    def run(self, row: dict[str, Any], ctx: StageContext):
        """The row's candidates (sampled, or read from ``candidates_column``),
        as ``all_responses``; rows with fewer than two distinct ones leave."""
        cfg = self.config
        prompt = row.get(cfg.prompt_column)
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"row {row.get(ROW_ID)}: column {cfg.prompt_column!r} must be a non-empty string")
        if cfg.candidates_column:
            cands = row.get(cfg.candidates_column)
            if not isinstance(cands, list) or not all(isinstance(x, str) for x in cands):
                raise ValueError(f"row {row[ROW_ID]}: column {cfg.candidates_column!r} must be a list of strings")
        else:
            res = yield Ask(self.chat(prompt, self.params, cfg.system), call="responses")  # truncated_responses
            cands = [c.text for c in res.completions]
        if len(set(cands)) < 2:  # counted under the stage's historical names (no dropped_ prefix)
            ctx.stats.add("fewer_than_two_responses" if len(cands) < 2 else "all_responses_identical")
            return []
        return {"all_responses": cands, PROVENANCE: {"template_sha256": ""}}  # sampling uses no template

    def process(self, rows: list[dict[str, Any]], ctx: StageContext) -> list[dict[str, Any]]:
        cfg = self.config
        sampled = super().process(rows, ctx)  # one sampling call for the chunk
        if not sampled:
            return []
        ranker = self.ranker(ctx)
        mats = ranker.compare([r[cfg.prompt_column] for r in sampled], [r["all_responses"] for r in sampled])
        out = []
        for r, m in zip(sampled, mats):
            cands = r["all_responses"]
            scores = scores_from_matrix(m, cfg.aggregate)
            pick = pick_pair(scores, cands, cfg.min_margin)
            if pick.reason:
                ctx.stats.add(pick.reason)
                continue
            bias = position_bias(m)
            base = {c: v for c, v in r.items() if c not in (cfg.prompt_column, PROVENANCE, "all_responses")}
            # the ranker is not a per-row model call: its scoring record is appended here
            judged = [ctx.provenance(ranker.gen, SCORING, None, "scored")] if cfg.ranker == "llm_judge" else []
            prompt, fmt, sys_ = r[cfg.prompt_column], cfg.format, cfg.system
            meta = {"comparison_matrix": [[float(x) for x in row] for row in m],
                    "position_bias": None if math.isnan(bias) else bias, "ranker": ranker.name,
                    PROVENANCE: list(r[PROVENANCE]) + judged}
            every = {"all_responses": cands, "all_scores": [float(x) for x in scores],
                     "all_ranks": [int(x) for x in ranks_from_scores(scores)]}
            if cfg.emit == "ranked":
                out.append({**base, **trl_ranked(prompt, cands, [float(x) for x in scores], fmt, sys_), **meta})
            elif cfg.emit == "unpaired":
                for k, (kto, i) in enumerate(zip(trl_unpaired(prompt, cands[pick.best], cands[pick.worst], fmt, sys_),
                                                 (pick.best, pick.worst))):
                    out.append({**base, ROW_ID: f"{r[ROW_ID]}/{k}", **kto, "score": float(scores[i]), **every, **meta})
            else:
                out.append({
                    **base, **trl_pair(prompt, cands[pick.best], cands[pick.worst], fmt, sys_),
                    "score_chosen": float(scores[pick.best]), "score_rejected": float(scores[pick.worst]),
                    "score_margin": float(pick.margin), **every, **meta})
        return out
