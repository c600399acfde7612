"""Best-of-N rejection-sampling fine-tuning data (Llama 2 section 3.2.3; RAFT, Dong et al. 2023).

Per prompt: sample ``n`` responses from the policy (one engine call per
chunk), score each, keep the highest-scored one as the new SFT target
(specs/methods-2.md section 2). Scorers:

- ``reward_model``: a sequence-classification checkpoint scored through
  :class:`synthfb.rank.reward_model.RewardModelRanker` (the scorer of
  ``onpolicy_pairs`` and PPO), one batched forward pass per chunk. The
  papers' way (Llama 2: the best RM available; RAFT: a 3B RM);
- ``judge``: the additive 5-point LLM judge of ``judge_pairs``
  (``prompts/judge_additive.jinja``), read from label log-probabilities on
  local engines (:mod:`synthfb.rank.label_scores`, G-Eval) or from
  ``judge_samples`` sampled judgements parsed and averaged (``scoring``);
  the judge is the policy itself unless ``judge_model`` names another.

Selection (:func:`select_best`): per prompt, the argmax (RAFT's rule; ties:
the first sampled), or the ``top_k`` best; optionally only candidates
scoring ``>= min_reward`` and only prompts whose winner beats the runner-up
by ``>= min_gap`` (near ties make the winner arbitrary). Output: SFT rows
(:func:`synthfb.data.trl.sft_row`) with every candidate and score as
metadata, or with ``emit: ranked`` one ranked row per prompt (``prompt``,
``completions``, ``scores``, ``ranks``; 1 = best, ties share a rank) for a
K-way reward model.

The selection is plain code over rows (:func:`best_of_n_rows`), so a loop
(``rft``: sample -> score -> SFT on winners -> regenerate) can call it on
candidates and scores it got elsewhere; the stage also reads candidates (and
scores) from columns (``candidates_column``, ``scores_column``).

Deviations: RAFT's optional KL-regularised ranking key (r - beta log pi/pi0)
and LMFlow's global top-fraction selection across prompts are not
implemented (a Bradley-Terry reward is comparable only within a prompt,
spec 2.3); Llama 2's pooling of the best samples of all earlier iterations
is the loop's job.

:class:`ScoredSamplesStage` (sample, then score with a reward model or a
judge) is shared with the ``rso_pairs`` stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from ..data import PROVENANCE, ROW_ID
from ..data.trl import sft_row
from ..engine.stage import Ask, Drop, ModelConfig, ModelStage, StageContext, config_field
from ..llm.prompts import find_file
from ..rank.aggregate import ranks_from_scores
from ..rank.label_scores import SCORING_MODES, LabelScorer, resolve_scoring
from .judge import JUDGE_LABELS, mean_scores

# -- selection, as plain code over rows ------------------------------------------------------------------------


def select_best(scores: list[float], top_k: int = 1, min_reward: float | None = None,
                min_gap: float | None = None) -> tuple[list[int], str | None]:
    """Indices of the kept candidates, best first (equal scores: the lower
    index first), or ``([], reason)``: ``too_few_scored`` (no candidate has
    a score; NaN = unscored), ``small_gap`` (best - runner-up < ``min_gap``),
    ``below_min_reward`` (no candidate scores ``>= min_reward``)."""
    s = [float(x) for x in scores]
    ok = sorted((i for i, x in enumerate(s) if not math.isnan(x)), key=lambda i: (-s[i], i))
    if not ok:
        return [], "too_few_scored"
    if min_gap is not None and len(ok) > 1 and s[ok[0]] - s[ok[1]] < min_gap:
        return [], "small_gap"
    if min_reward is not None:
        ok = [i for i in ok if s[i] >= min_reward]
        if not ok:
            return [], "below_min_reward"
    return ok[:top_k], None


def best_of_n_rows(prompt: str, candidates: list[str], scores: list[float], *, top_k: int = 1,
                   min_reward: float | None = None, min_gap: float | None = None,
                   emit: Literal["sft", "ranked"] = "sft", system: str | None = None,
                   fmt: Literal["conversational", "standard"] = "conversational") -> list[dict[str, Any]] | Drop:
    """The rows best-of-N makes of one prompt's ``candidates`` and their
    ``scores`` (NaN: unscored): with ``emit: sft`` one SFT row per kept
    candidate (:func:`select_best`), with the winner's ``score``, its
    ``score_gap`` to the runner-up (None with one scored candidate), its
    ``selected_rank`` and all candidates and scores; with ``emit: ranked``
    one row with ``completions`` (scored candidates, distinct texts, each in
    the form of a preference row's ``chosen``), ``scores`` and ``ranks``
    (1 = best, ties share the best rank). A :class:`Drop` says why none."""
    if len(candidates) != len(scores):
        raise ValueError(f"{len(candidates)} candidates but {len(scores)} scores")
    s = [float(x) if x is not None else math.nan for x in scores]
    if emit == "ranked":
        seen, keep = set(), []
        for i, c in enumerate(candidates):
            if not math.isnan(s[i]) and c not in seen:
                seen.add(c)
                keep.append(i)
        if len(keep) < 2:
            return Drop("too_few_scored")
        base = sft_row(prompt, "", system, fmt)
        comps = [sft_row(prompt, candidates[i], system, fmt)["completion"] for i in keep]
        ks = [s[i] for i in keep]
        return [{"prompt": base["prompt"], "completions": comps, "scores": ks,
                 "ranks": [int(r) for r in ranks_from_scores(ks)]}]
    if emit != "sft":
        raise ValueError(f"emit: expected sft or ranked, got {emit!r}")
    picked, why = select_best(s, top_k, min_reward, min_gap)
    if why:
        return Drop(why)
    scored = sorted((x for x in s if not math.isnan(x)), reverse=True)
    gap = scored[0] - scored[1] if len(scored) > 1 else None
    ranks = ranks_from_scores([x if not math.isnan(x) else -math.inf for x in s])
    all_scores = [None if math.isnan(x) else x for x in s]
    return [{**sft_row(prompt, candidates[i], system, fmt), "score": s[i], "score_gap": gap,
             "selected_rank": int(ranks[i]), "all_responses": list(candidates), "all_scores": all_scores}
            for i in picked]


# -- sample, then score: shared with rso_pairs ---------------------------------------------------------------


@dataclass
class ScoredSamplesConfig(ModelConfig):
    prompt_column: str = field(default="prompt", metadata={"help": "column with the user prompt (a string)"})
    system: str | None = field(default=None, metadata={"help": "system message for the policy"})
    candidates_column: str | None = field(default=None, metadata={
        "help": "score this list column of responses instead of sampling (`n` and `sampling` unused)"})
    scorer: Literal["reward_model", "judge"] = field(default="judge", metadata={
        "help": "reward_model: a sequence-classification checkpoint at `reward_model_path` (the papers' way); "
                "judge: the additive 5-point LLM judge (`judge_prompt`, scores 0-5)"})
    reward_model_path: str | None = field(default=None, metadata={"help": "scorer reward_model: local checkpoint folder"})
    reward_batch_size: int = field(default=8, metadata={"help": "scorer reward_model: forward batch size"})
    judge_model: str | None = field(default=None, metadata={"help": "scorer judge: judge model (default: the stage's model)"})
    judge_prompt: str = field(default="judge_additive.jinja", metadata={
        "help": "scorer judge: template (variables: prompt, response; score_only is true under logprobs scoring)"})
    judge_chat: bool = field(default=True, metadata={"help": "scorer judge: send the judge prompt as a chat turn"})
    scoring: Literal["auto", "logprobs", "text"] = field(default="auto", metadata={
        "help": "scorer judge: logprobs = probability-weighted mean over the scores 0-5 read from log-probs "
                "(G-Eval); text = sample `judge_samples` judgements and parse 'Score: N'; auto = logprobs on "
                "vllm/transformers, text otherwise"})
    judge_samples: int = field(default=3, metadata={"help": "scorer judge, text scoring: judgements sampled per candidate and averaged"})
    judge_sampling: dict = field(default_factory=dict, metadata={
        "help": "scorer judge, text scoring: sampling of the judgements (default temperature 0.7, top_p 0.9, "
                "max_tokens 256)"})
    format: Literal["conversational", "standard"] = field(default="conversational", metadata={
        "help": "TRL format of the emitted rows (message lists, or strings)"})


class ScoredSamplesStage(ModelStage):
    """Base of stages that sample candidates and score each one: ``run``
    samples (or reads) ``all_responses`` and, for the judge, scores them
    through the seam; ``process`` scores with the reward model and hands
    each row to ``finish(row, candidates, scores, ctx)``."""

    scorers: tuple[str, ...] = ("reward_model", "judge")

    def __init__(self, config: ScoredSamplesConfig, base_dir):
        super().__init__(config, base_dir)
        if config.scorer not in self.scorers:
            raise ValueError(f"scorer: expected one of {list(self.scorers)}, got {config.scorer!r}")
        if config.scoring not in SCORING_MODES:
            raise ValueError(f"scoring: expected one of {list(SCORING_MODES)}, got {config.scoring!r}")
        if config.judge_samples < 1 or config.reward_batch_size < 1:
            raise ValueError(f"judge_samples and reward_batch_size must be >= 1, got {config.judge_samples}, "
                             f"{config.reward_batch_size}")
        if config.scorer == "reward_model" and not config.reward_model_path:
            raise ValueError("scorer reward_model needs `reward_model_path` (a local checkpoint folder)")
        if config.scorer == "judge":
            self.judge = self.load_template("judge_prompt")
            if {"prompt", "response"} - self.judge.variables:
                raise ValueError(f"{self.judge.source}: judge template must use `prompt` and `response`")
            self.judge_params = self.sampling("judge_sampling", {"temperature": 0.7, "top_p": 0.9, "max_tokens": 256},
                                              n="judge_samples")
            self.labels = LabelScorer(JUDGE_LABELS, "Score:", chat=config.judge_chat)
        self._rm = None

    def check(self) -> None:
        if self.config.reward_model_path:
            with config_field("reward_model_path"):
                find_file(self.config.reward_model_path, self.base_dir, "reward model checkpoint", want="dir")

    def fingerprint(self) -> dict[str, Any]:
        fp = super().fingerprint()
        if self.config.reward_model_path:  # the checkpoint by its content, not by where it lies
            from ..llm.models import model_revision

            fp["reward_model_revision"] = model_revision(str(find_file(self.config.reward_model_path, self.base_dir)))
            fp["config"]["reward_model_path"] = str(self.config.reward_model_path).rstrip("/").split("/")[-1]
        return fp

    def required_columns(self) -> set[str]:
        return {self.config.prompt_column, self.config.candidates_column} - {None}

    def consumes(self) -> set[str]:
        return {self.config.prompt_column}

    def scorer_name(self, ctx: StageContext) -> str:
        if self.config.scorer == "reward_model":
            return f"reward_model:{str(self.config.reward_model_path).rstrip('/').split('/')[-1]}"
        from ..llm.models import public_model_name  # a row column: never a local path

        judge = ctx.generator(self.config.judge_model or self.model_name())
        return f"{self.config.scorer}:{public_model_name(judge.info.name)}"

    def reward_model(self):
        if self._rm is None:
            from ..rank.reward_model import RewardModelRanker

            path = str(find_file(self.config.reward_model_path, self.base_dir, "reward model checkpoint"))
            self._rm = RewardModelRanker(path, batch_size=self.config.reward_batch_size)
        return self._rm

    def candidates(self, row: dict[str, Any], prompt: str, ctx: StageContext):
        """The candidates: sampled (``self.params``) or read from ``candidates_column``."""
        cfg = self.config
        if cfg.candidates_column:
            cands = row.get(cfg.candidates_column)
            if not isinstance(cands, list) or not all(isinstance(x, str) for x in cands):
                raise ValueError(f"row {row.get(ROW_ID)}: column {cfg.candidates_column!r} must be a list of strings")
            return cands
        res = yield Ask(self.chat(prompt, self.params, cfg.system), call="responses")
        return [c.text for c in res.completions]

    def judge_scores(self, row: dict[str, Any], prompt: str, cands: list[str], ctx: StageContext):
        """The additive judge's score of each candidate (NaN: unscored), as in ``judge_pairs``."""
        cfg = self.config
        rid = row.get(ROW_ID)
        if resolve_scoring(cfg.scoring, ctx.generator(cfg.judge_model or self.model_name()).info.backend) == "logprobs":
            res = yield Ask([r for c in cands for r in self.labels.requests(
                self.judge.render({"prompt": prompt, "response": c, "score_only": True}, rid))],
                model=cfg.judge_model, call="judgements")
            read = self.labels.read_all(res)
            ok = sum(x.ok for x in read)
            for key, v in (("outputs", len(read)), ("parsed", ok), ("scored_from_logprobs", len(read)),
                           ("unscored_candidates", len(read) - ok)):
                ctx.stats.add(key, v)
            return [x.score for x in read]
        res = yield Ask([self.chat(self.judge.render({"prompt": prompt, "response": c}, rid), self.judge_params,
                                   chat=cfg.judge_chat) for c in cands], model=cfg.judge_model, call="judgements",
                        partial=True)
        scores, _, counts = mean_scores([None if r.error else [c.text for c in r.completions] for r in res])
        for key, v in counts.items():
            ctx.stats.add(key, v)
        ctx.stats.add("outputs", counts.get("judgements", 0))
        ctx.stats.add("parsed", counts.get("judgements", 0) - sum(v for k, v in counts.items()
                                                                  if k.startswith("unparseable_judgements_")))
        return scores

    def prompt_text(self, row: dict[str, Any]) -> str:
        p = row.get(self.config.prompt_column)
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"row {row.get(ROW_ID)}: column {self.config.prompt_column!r} must be a non-empty string")
        return p

    def run(self, row: dict[str, Any], ctx: StageContext):
        prompt = self.prompt_text(row)
        cands = yield from self.candidates(row, prompt, ctx)
        if not cands:
            return Drop("no_candidates")
        out: dict[str, Any] = {"all_responses": cands, PROVENANCE: {"template_sha256": self.template_sha256}}
        scores = yield from self.extra_scores(row, prompt, cands, ctx)
        if scores is not None:
            out["all_scores"] = scores
        return out

    def extra_scores(self, row: dict[str, Any], prompt: str, cands: list[str], ctx: StageContext):
        """Scores computed through the seam (None: scored later, in ``process``)."""
        if self.config.scorer == "judge":
            return (yield from self.judge_scores(row, prompt, cands, ctx))
        return None

    def process(self, rows: list[dict[str, Any]], ctx: StageContext) -> list[dict[str, Any]]:
        cfg = self.config
        rows = [{**r, "_prompt": r[cfg.prompt_column]} for r in rows]
        sampled = super().process(rows, ctx)
        if sampled and any("all_scores" not in r for r in sampled):
            todo = [r for r in sampled if "all_scores" not in r]
            for r, s in zip(todo, self.reward_model().score([r["_prompt"] for r in todo],
                                                             [r["all_responses"] for r in todo])):
                r["all_scores"] = [float(x) for x in s]
        out, name = [], self.scorer_name(ctx) if sampled else ""
        for r in sampled:
            made = self.finish(r, r.pop("_prompt"), r.pop("all_responses"), r.pop("all_scores"), ctx)
            if isinstance(made, Drop):
                ctx.stats.add(f"dropped_{made.reason}")
                continue
            base = {k: v for k, v in r.items() if k != PROVENANCE}
            for k, new in enumerate(made):
                rid = r[ROW_ID] if len(made) == 1 else f"{r[ROW_ID]}/{k}"
                out.append({**base, ROW_ID: rid, **new, "scorer": name, PROVENANCE: r[PROVENANCE]})
        return out

    def finish(self, row: dict[str, Any], prompt: str, cands: list[str], scores: list[float],
               ctx: StageContext) -> list[dict[str, Any]] | Drop:
        raise NotImplementedError


# -- the stage -----------------------------------------------------------------------------------------------


@dataclass
class BestOfNConfig(ScoredSamplesConfig):
    n: int = field(default=8, metadata={"help": "responses sampled per prompt, K (RAFT: 8/16/32; Llama 2 sweeps 1-100)"})
    scores_column: str | None = field(default=None, metadata={
        "help": "with candidates_column: a list column of their scores (no scoring at all; NaN/null = unscored)"})
    top_k: int = field(default=1, metadata={"help": "SFT targets kept per prompt, best first (1: RAFT's argmax)"})
    min_reward: float | None = field(default=None, metadata={
        "help": "keep only candidates scoring >= this (None: no threshold; units of the scorer)"})
    min_gap: float | None = field(default=None, metadata={
        "help": "skip prompts whose best score beats the runner-up by less than this (None: off)"})
    emit: Literal["sft", "ranked"] = field(default="sft", metadata={
        "help": "sft: prompt/completion rows of the kept candidates; ranked: one row per prompt with `completions`, "
                "`scores`, `ranks` (1 = best, ties share a rank) for a K-way reward model"})


class BestOfNStage(ScoredSamplesStage):
    """Sample N, score, keep the best as the SFT target (or emit the ranked list)."""

    kind = "best_of_n"
    Config = BestOfNConfig
    sampling_defaults = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 256}

    def __init__(self, config: BestOfNConfig, base_dir):
        super().__init__(config, base_dir)
        if config.n < 1 or config.top_k < 1:
            raise ValueError(f"n and top_k must be >= 1, got n={config.n}, top_k={config.top_k}")
        if config.emit not in ("sft", "ranked"):
            raise ValueError(f"emit: expected sft or ranked, got {config.emit!r}")
        if config.scores_column and not config.candidates_column:
            raise ValueError("scores_column needs candidates_column (the responses the scores belong to)")
        if config.min_gap is not None and config.min_gap < 0:
            raise ValueError(f"min_gap must be >= 0, got {config.min_gap}")
        self.params = self.sampling(n="n")

    def required_columns(self) -> set[str]:
        return super().required_columns() | ({self.config.scores_column} if self.config.scores_column else set())

    def output_columns(self, input_columns: list[str]) -> list[str]:
        new = (["prompt", "completions", "scores", "ranks"] if self.config.emit == "ranked" else
               ["prompt", "completion", "score", "score_gap", "selected_rank", "all_responses", "all_scores"])
        drop = {self.config.prompt_column, PROVENANCE, "scorer", *new}
        return [c for c in input_columns if c not in drop] + new + ["scorer", PROVENANCE]

    def extra_scores(self, row, prompt, cands, ctx):
        col = self.config.scores_column
        if col:
            s = row.get(col)
            if not isinstance(s, list) or len(s) != len(cands) or not all(
                    x is None or (isinstance(x, (int, float)) and not isinstance(x, bool)) for x in s):
                raise ValueError(f"row {row.get(ROW_ID)}: column {col!r} must be a list of {len(cands)} numbers "
                                 f"(one per candidate in {self.config.candidates_column!r})")
            return [math.nan if x is None else float(x) for x in s]
        return (yield from super().extra_scores(row, prompt, cands, ctx))

    def scorer_name(self, ctx: StageContext) -> str:
        return f"column:{self.config.scores_column}" if self.config.scores_column else super().scorer_name(ctx)

    def finish(self, row, prompt, cands, scores, ctx):
        cfg = self.config
        ctx.stats.add("candidates", len(cands))
        made = best_of_n_rows(prompt, cands, scores, top_k=cfg.top_k, min_reward=cfg.min_reward,
                              min_gap=cfg.min_gap, emit=cfg.emit, system=cfg.system, fmt=cfg.format)
        return made


__all__ = ["BestOfNConfig", "BestOfNStage", "ScoredSamplesConfig", "ScoredSamplesStage", "best_of_n_rows",
           "select_best"]
