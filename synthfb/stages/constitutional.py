"""Constitutional AI (Bai et al., 2022; spec section 4).

``cai_revise`` (SL-CAI): for each row, ``rounds`` critique -> revision steps
(default 4); each step samples one principle from the constitution file and
asks the model to critique its current response, then to rewrite it. Every
step is one batched engine call per chunk (critiques, then revisions).
``style: transcript`` (default, the paper's section 3.1) keeps ONE growing
transcript per sample, few-shot exchanges first: round k's critique request
follows round k-1's revision in the same text; ``style: separate`` asks each
critique and revision in a fresh chat request about the current response.
Rows marked by ``helpful_column`` are helpfulness samples, mixed in without
revision. Emits SFT rows ``prompt``/``completion`` (the final revision, or
one row per revision step) and keeps all critiques and revisions in
``cai_steps``.

``cai_label`` (RL-CAI): for two responses per prompt, a multiple-choice
comparison prompt ending in options (A)/(B). The label is the normalized
probability of the option strings read from the backend's log-probs (not
parsed text), evaluated in BOTH orders and averaged; the position-bias gap
is recorded. One sampled principle per label by default, an average over
``principles_per_label`` as an option; a chain-of-thought variant whose
probabilities are clamped (default [0.4, 0.6]). ``emit: unpaired`` writes
two KTO rows ``prompt``/``completion``/``label`` per labelled pair instead of
one ``prompt``/``chosen``/``rejected`` row (:func:`synthfb.data.trl.trl_unpaired`;
``score`` is the probability the feedback model gives that completion).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ..data import PROVENANCE, ROW_ID
from ..data.trl import FORMATS, UNPAIRED_COLUMNS, check_emit, trl_completion, trl_pair, trl_unpaired
from ..engine.stage import Ask, Drop, ModelConfig, ModelStage, StageContext, config_field
from ..llm.types import GenerationRequest
from ..rank.llm_judge import OptionScorer, clamp, merge_orders, soft_label
from .constitution import (DEFAULT_CONSTITUTION, DEFAULT_FEW_SHOT, Constitution, Principle,  # noqa: F401
                           _check_variables, _mean, _read_yaml, _shipped, _text, clean_revision,
                           load_examples)


# -- SL-CAI ------------------------------------------------------------------
TRANSCRIPT_STOP = ["Critique request:", "Revision request:", "User:", "==="]
"""Transcript style's default stop strings: the next label of the transcript
(the paper stops at "Human:")."""


@dataclass
class CAIReviseConfig(ModelConfig):
    constitution: str = field(default=DEFAULT_CONSTITUTION, metadata={"help": "principles file (YAML: id, critique, revision, comparison)"})
    prompt_column: str = field(default="prompt", metadata={"help": "column with the user prompt"})
    response_column: str = field(default="response", metadata={"help": "column with the initial response to revise"})
    rounds: int = field(default=4, metadata={"help": "critique -> revision steps per prompt (one principle sampled per step; the paper: 4)"})
    style: Literal["transcript", "separate"] = field(default="transcript", metadata={"help": "transcript (the paper's, section 3.1): one growing transcript per sample, the few-shot exchanges first, then the conversation and every earlier critique request, critique, revision request and revision; the model continues after `Critique:` / `Revision:` (`transcript_prompt`). separate: each critique and each revision is a fresh chat request showing only the current response (`critique_prompt`, `revision_prompt`)"})
    transcript_prompt: str = field(default="cai_transcript.jinja", metadata={"help": "transcript style: template of the whole transcript (examples, prompt, response, rounds)"})
    chat: bool = field(default=False, metadata={"help": "transcript style: false sends the transcript as raw text for the model to continue (as in the paper); true sends it as one user turn through the chat template. Separate style always sends chat turns"})
    critique_prompt: str = field(default="cai_critique.jinja", metadata={"help": "separate style: template of the critique request"})
    revision_prompt: str = field(default="cai_revision.jinja", metadata={"help": "separate style: template of the revision request"})
    few_shot: str | None = field(default=None, metadata={"help": "YAML list of example exchanges (prompt, response, rounds: [{critique_request, critique, revision_request, revision}]; one round may be written flat), shown before every request: in transcript style as earlier transcripts, in separate style as earlier chat turns. null: synthfb's pipelines/data/cai_few_shot.yaml in transcript style (the paper prepends few-shot exchanges), none in separate style; a file holding [] shows none"})
    helpful_column: str | None = field(default=None, metadata={"help": "boolean column marking helpfulness samples (the paper mixes responses to harmless prompts into the SL data): rows where it is true are emitted as they are, prompt -> initial response, revision_step 0, no critique or revision; null/false rows are revised. null: revise every row"})
    emit: Literal["final", "all"] = field(default="final", metadata={"help": "final: one SFT row per prompt (last revision); all: one row per revision step (row_id/k)"})
    format: Literal["conversational", "standard"] = field(default="conversational", metadata={"help": "TRL prompt-completion format of prompt/completion"})


class CAIReviseStage(ModelStage):
    """SL-CAI critique/revision rounds -> SFT rows with the full history."""

    kind = "cai_revise"
    Config = CAIReviseConfig
    sampling_defaults = {"temperature": 1.0, "max_tokens": 256}

    def __init__(self, config: CAIReviseConfig, base_dir):
        super().__init__(config, base_dir)
        if config.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {config.rounds}")
        defaults = CAIReviseConfig()
        other = ("critique_prompt", "revision_prompt") if config.style == "transcript" else ("transcript_prompt", "chat")
        for name in other:  # a field the chosen style never reads: say so rather than ignore it
            if getattr(config, name) != getattr(defaults, name):
                raise ValueError(f"{name}: not used with style: {config.style} "
                                 f"(set style: {'separate' if config.style == 'transcript' else 'transcript'})")
        path = self.data_file("constitution", "constitution file", shipped=_shipped(config.constitution))
        with config_field("constitution"):
            self.constitution = Constitution.load(path, need=("critique", "revision"))
        self.examples = self._load_examples()
        if config.style == "transcript":
            self.t_script = self.load_template("transcript_prompt")
            _check_variables(self.t_script, {"examples", "prompt", "response", "rounds"})
            self.params = self.sampling(defaults={**self.sampling_defaults, "stop": TRANSCRIPT_STOP})
        else:
            self.t_crit = self.load_template("critique_prompt")
            self.t_rev = self.load_template("revision_prompt")
            _check_variables(self.t_crit, {"prompt", "response", "critique_request"})
            _check_variables(self.t_rev, {"prompt", "response", "critique", "revision_request"})
            self.params = self.sampling()
            # each example round as an earlier chat exchange; round k+1 shows round k's revision as the response
            self.shots_c, self.shots_r = [], []
            for ex in self.examples:
                response = ex["response"]
                for r in ex["rounds"]:
                    v = {"prompt": ex["prompt"], "response": response, **r}
                    self.shots_c.append((self.t_crit.render(v), r["critique"]))
                    self.shots_r.append((self.t_rev.render(v), r["revision"]))
                    response = r["revision"]

    def _load_examples(self) -> list[dict[str, Any]]:
        name = self.config.few_shot
        if name is None and self.config.style == "separate":
            return []
        name = DEFAULT_FEW_SHOT if name is None else name
        path = self.data_file("few_shot", "few-shot file", name=name, shipped=_shipped(name))
        with config_field("few_shot"):
            return load_examples(path)

    def required_columns(self) -> set[str]:
        return {self.config.prompt_column, self.config.response_column} | (
            {self.config.helpful_column} if self.config.helpful_column else set())

    def consumes(self) -> set[str]:
        return {self.config.prompt_column, self.config.response_column}

    def output_columns(self, input_columns: list[str]) -> list[str]:
        drop = {self.config.prompt_column, self.config.response_column, PROVENANCE, "prompt", "completion"}
        return [c for c in input_columns if c not in drop] + [
            "prompt", "completion", "initial_response", "revision_step", "cai_steps", PROVENANCE]

    def _request(self, prompt: str, first: str, current: str, done: list[dict[str, str]], turn: dict[str, str],
                 rid: Any) -> GenerationRequest:
        """The request for the open ``turn`` (a critique when it has no critique yet, else a revision)."""
        if self.config.style == "transcript":  # one text: examples, conversation, every round so far
            text = self.t_script.render({"examples": self.examples, "prompt": prompt, "response": first,
                                         "rounds": [*done, turn]}, rid)
            return self.chat(text, self.params, chat=self.config.chat)
        critique = "critique" not in turn
        t, shots = (self.t_crit, self.shots_c) if critique else (self.t_rev, self.shots_r)
        msgs: list[dict[str, str]] = []
        for u, a in shots:
            msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        msgs.append({"role": "user", "content": t.render({"prompt": prompt, "response": current, **turn}, rid)})
        return GenerationRequest(messages=msgs, params=self.params)

    def run(self, row: dict[str, Any], ctx: StageContext):
        cfg, rid = self.config, row[ROW_ID]
        prompt, first = _text(row, cfg.prompt_column, "prompt"), _text(row, cfg.response_column, "response")
        if cfg.helpful_column and _is_helpful(row, cfg.helpful_column):
            ctx.stats.add("helpful_samples")  # mixed in as it is (paper section 3.1)
            return {ROW_ID: rid, **trl_completion(prompt, first, cfg.format), "initial_response": first,
                    "revision_step": 0, "cai_steps": []}
        current, done, steps = first, [], []
        for step in range(cfg.rounds):
            p = self.constitution.sample(ctx.rng(rid, step))[0]
            turn = {"critique_request": p.critique}
            res = yield Ask(self._request(prompt, first, current, done, turn, rid), call="critiques")
            turn.update(critique=res.completions[0].text.strip(), revision_request=p.revision)
            if not turn["critique"]:
                ctx.stats.add("empty_critiques")
            res = yield Ask(self._request(prompt, first, current, done, turn, rid), call="revisions")
            c = res.completions[0]
            rev = clean_revision(c.text)
            if rev is None:
                ctx.stats.add("empty_revisions_kept_previous")
                rev = current
            done.append({**turn, "revision": rev})
            steps.append({"principle_id": p.id, "critique": turn["critique"], "revision": rev,
                          "finish_reason": c.finish_reason})
            current = rev
        emit = range(len(steps)) if cfg.emit == "all" else [len(steps) - 1]
        return [{ROW_ID: rid if cfg.emit == "final" else f"{rid}/{k + 1}",
                 **trl_completion(prompt, steps[k]["revision"], cfg.format),
                 "initial_response": row[cfg.response_column], "revision_step": k + 1, "cai_steps": steps}
                for k in emit]


def _is_helpful(row: dict[str, Any], col: str) -> bool:
    v = row.get(col)
    if v is None or isinstance(v, bool) or (isinstance(v, int) and v in (0, 1)):
        return bool(v)
    raise ValueError(f"row {row.get(ROW_ID)}: column {col!r} (helpful_column) must be true, false or null, got {v!r}")


# -- RL-CAI --------------------------------------------------------------------
@dataclass
class CAILabelConfig(ModelConfig):
    constitution: str = field(default=DEFAULT_CONSTITUTION, metadata={"help": "principles file (uses each principle's `comparison`)"})
    prompt_column: str = field(default="prompt", metadata={"help": "column with the user prompt"})
    responses_column: str = field(default="responses", metadata={"help": "list column with (at least) two responses; the first two are compared"})
    compare_prompt: str = field(default="cai_compare.jinja", metadata={"help": "multiple-choice template (prompt, comparison, response_a, response_b)"})
    chat: bool = field(default=False, metadata={"help": "false: the feedback model reads a raw prompt (as in the paper); true: a chat user turn"})
    options: list[str] = field(default_factory=lambda: [" (A)", " (B)"], metadata={"help": "the two option strings scored as continuations"})
    principles_per_label: int = field(default=1, metadata={"help": "1 (faithful): one sampled principle per label; k > 1: average p over k principles (extension)"})
    cot: bool = field(default=False, metadata={"help": "chain-of-thought variant: sample a rationale, then score the options after it"})
    cot_prompt: str = field(default="cai_compare_cot.jinja", metadata={"help": "template of the CoT comparison request"})
    cot_samples: int = field(default=1, metadata={"help": "CoT rationales per order, probabilities averaged (paper's ensembled CoT: 5)"})
    cot_answer: str = field(default="So the answer is:", metadata={"help": "text placed after the rationale before scoring the options"})
    cot_sampling: dict = field(default_factory=dict, metadata={"help": "sampling of rationales (default temperature 1.0, max_tokens 256)"})
    clamp: list[float] = field(default_factory=lambda: [0.4, 0.6], metadata={"help": "CoT only: clamp p to [lo, hi] (non-CoT labels are not clamped)"})
    drop_ties: bool = field(default=True, metadata={"help": "drop labels with p exactly 0.5 (no preferred response)"})
    format: Literal["conversational", "standard"] = field(default="conversational", metadata={"help": "TRL preference format of prompt/chosen/rejected"})
    emit: Literal["pairs", "unpaired"] = field(default="pairs", metadata={"help": "pairs: prompt/chosen/rejected with the soft label p_chosen; unpaired: two rows prompt/completion/label (chosen true, rejected false; TRL KTO), each with its probability as `score`"})


class CAILabelStage(ModelStage):
    """RL-CAI soft preference labels from option log-probs, both orders."""

    kind = "cai_label"
    Config = CAILabelConfig

    def __init__(self, config: CAILabelConfig, base_dir):
        super().__init__(config, base_dir)
        if config.sampling:
            raise ValueError("sampling: cai_label scores the options (no sampling); rationales take `cot_sampling`")
        if config.principles_per_label < 1 or config.cot_samples < 1:
            raise ValueError("principles_per_label and cot_samples must be >= 1")
        if len(config.clamp) != 2 or not 0 <= config.clamp[0] <= config.clamp[1] <= 1:
            raise ValueError(f"clamp must be [lo, hi] with 0 <= lo <= hi <= 1, got {config.clamp}")
        check_emit(config.emit, ("pairs", "unpaired"))
        path = self.data_file("constitution", "constitution file", shipped=_shipped(config.constitution))
        with config_field("constitution"):
            self.constitution = Constitution.load(path, need=("comparison",))
        self.template = self.load_template("cot_prompt" if config.cot else "compare_prompt")
        _check_variables(self.template, {"prompt", "comparison", "response_a", "response_b"})
        with config_field("options"):
            self.scorer = OptionScorer(config.options, config.chat)
        self.cot_params = self.sampling(
            "cot_sampling", {"temperature": 1.0, "max_tokens": 256, "stop": ["Human:", "User:", config.cot_answer]},
            n="cot_samples")

    def required_columns(self) -> set[str]:
        return {self.config.prompt_column, self.config.responses_column}

    def consumes(self) -> set[str]:
        return {self.config.prompt_column}

    def output_columns(self, input_columns: list[str]) -> list[str]:
        head = ["prompt", "chosen", "rejected", "score_chosen", "score_rejected", "score_margin", "p_chosen"] \
            if self.config.emit == "pairs" else [*UNPAIRED_COLUMNS, "score"]
        drop = {self.config.prompt_column, PROVENANCE, "prompt", "chosen", "rejected", *head}
        return [c for c in input_columns if c not in drop] + head + [
            "p_response_1", "p_order_ab", "p_order_ba", "position_gap", "principle_ids", "label_logprobs",
            "cot_rationales", PROVENANCE]

    def _after_rationale(self, context: str, cot: str) -> Any:
        if self.config.chat:
            return [{"role": "user", "content": context}, {"role": "assistant", "content": cot},
                    {"role": "user", "content": self.config.cot_answer}]
        return f"{context}\nLet's think step by step: {cot}\n{self.config.cot_answer}"

    def run(self, row: dict[str, Any], ctx: StageContext):
        cfg, rid = self.config, row[ROW_ID]
        resp = row.get(cfg.responses_column)
        if not isinstance(resp, list) or len(resp) < 2 or not all(isinstance(x, str) for x in resp[:2]):
            return Drop("fewer_than_two_responses")
        r1, r2 = resp[0], resp[1]
        if r1.strip() == r2.strip():
            return Drop("identical_responses")
        prompt = _text(row, cfg.prompt_column, "prompt")
        principles = self.constitution.sample(ctx.rng(rid, "label"), cfg.principles_per_label)
        # per principle, both orders: (principle, order, context)
        jobs = [(p, order, self.template.render({"prompt": prompt, "comparison": p.comparison,
                                                 "response_a": a, "response_b": b}, rid))
                for p in principles for order, a, b in (("ab", r1, r2), ("ba", r2, r1))]
        contexts, rationales = [(j, c) for j, (_, _, c) in enumerate(jobs)], []  # (job index, scored context)
        if cfg.cot:  # one rationale call, then the options are scored after each rationale
            results = yield Ask([self.chat(c if cfg.chat else c + "\nLet's think step by step:", self.cot_params,
                                           chat=cfg.chat) for _, _, c in jobs], call="rationales")
            rationales = [[c.text.strip() for c in res.completions] for res in results]
            contexts = [(j, self._after_rationale(c, cot)) for j, c in contexts for cot in rationales[j]]
        scores = yield [r for _, c in contexts for r in self.scorer.requests(c)]
        # P(A) for each (job, sample); then average over samples, merge orders, average over principles
        per_job: list[list[tuple[float, float, float]]] = [[] for _ in jobs]  # (P(A), lp_A, lp_B)
        for k, (j, _) in enumerate(contexts):
            la, lb = float(scores[2 * k].logprob), float(scores[2 * k + 1].logprob)
            per_job[j].append((soft_label(la, lb), la, lb))
        logs = [{"principle_id": p.id, "order": order, "sample": s, "logprob_a": la, "logprob_b": lb}
                for (p, order, _), got in zip(jobs, per_job) for s, (_, la, lb) in enumerate(got)]
        pa = [_mean([x[0] for x in got]) for got in per_job]  # P(A) per job, averaged over samples
        merged = [merge_orders(pa[j], pa[j + 1]) for j in range(0, len(jobs), 2)]  # one principle, both orders
        p = _mean([m[0] for m in merged])
        if cfg.cot:
            p = clamp(p, cfg.clamp[0], cfg.clamp[1])
        if p == 0.5 and cfg.drop_ties:
            return Drop("tie")
        first = p >= 0.5
        chosen, rejected = (r1, r2) if first else (r2, r1)
        pc = p if first else 1.0 - p
        meta = {"p_response_1": p, "p_order_ab": _mean(pa[0::2]), "p_order_ba": _mean([1.0 - x for x in pa[1::2]]),
                "position_gap": _mean([m[1] for m in merged]), "principle_ids": [pr.id for pr in principles],
                "label_logprobs": logs, "cot_rationales": [t for r in rationales for t in r]}
        if cfg.emit == "unpaired":
            return [{**kto, "score": v, **meta}
                    for kto, v in zip(trl_unpaired(prompt, chosen, rejected, cfg.format), (pc, 1.0 - pc))]
        return {**trl_pair(prompt, chosen, rejected, cfg.format),
                "score_chosen": pc, "score_rejected": 1.0 - pc, "score_margin": 2.0 * pc - 1.0, "p_chosen": pc, **meta}


__all__ = ["CAILabelStage", "CAIReviseStage", "Constitution", "Principle", "clean_revision", "FORMATS"]
