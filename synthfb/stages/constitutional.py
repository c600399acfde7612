"""Constitutional AI (Bai et al., 2022; spec section 4).

``cai_revise`` (SL-CAI): for each row, ``rounds`` critique -> revision steps
(default 4); each step samples one principle from the constitution file and
asks the model to critique its current response, then to rewrite it. Every
step is one batched engine call per chunk (critiques, then revisions).
Emits SFT rows ``prompt``/``completion`` (the final revision, or one row per
revision step) and keeps all critiques and revisions in ``cai_steps``.

``cai_label`` (RL-CAI): for two responses per prompt, a multiple-choice
comparison prompt ending in options (A)/(B). The label is the normalized
probability of the option strings read from the backend's log-probs (not
parsed text), evaluated in BOTH orders and averaged; the position-bias gap
is recorded. One sampled principle per label by default, an average over
``principles_per_label`` as an option; a chain-of-thought variant whose
probabilities are clamped (default [0.4, 0.6]).
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..data import PROVENANCE, ROW_ID, yamlio
from ..engine.stage import MapStage, StageContext, config_field
from ..llm.types import GenerationRequest, SamplingParams
from ..data.trl import FORMATS, trl_completion, trl_pair
from ..rank.llm_judge import OptionScorer, clamp, merge_orders, soft_label
from ..llm.prompts import find_file
from ..data.shipped import shipped_dir

DEFAULT_CONSTITUTION = "pipelines/data/constitution.yaml"  # the shipped one, relative to the synthfb checkout


def _read_yaml(path: Path) -> Any:
    try:
        return yamlio.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 (byte offset {e.start})") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: {yamlio.describe(e)}") from None


# -- the constitution file -------------------------------------------------
@dataclass(frozen=True)
class Principle:
    id: str
    critique: str
    revision: str
    comparison: str


class Constitution:
    """Principles read from a YAML file: ``principles: [{id, critique,
    revision, comparison}, ...]`` (a bare list is accepted too)."""

    def __init__(self, principles: list[Principle], source: str, sha256: str):
        self.principles = principles
        self.by_id = {p.id: p for p in principles}
        self.source = source
        self.sha256 = sha256

    @classmethod
    def load(cls, name: str, base_dir: Path, need: tuple[str, ...] = ("critique", "revision", "comparison")) -> "Constitution":
        # the default names the shipped file; any other path is the user's (absolute or
        # relative to the pipeline's folder)
        path = find_file(name, base_dir, "constitution file", want="file",
                         shipped=(shipped_dir("pipelines").parent,) if name == DEFAULT_CONSTITUTION else ())
        raw = path.read_bytes()
        data = _read_yaml(path)
        items = data.get("principles") if isinstance(data, dict) else data
        if not isinstance(items, list) or not items:
            raise ValueError(f"{path}: expected a non-empty list under `principles:`")
        out, seen = [], set()
        for i, it in enumerate(items):
            if not isinstance(it, dict):
                raise ValueError(f"{path}: principles[{i}]: expected a mapping, got {type(it).__name__}")
            pid = str(it.get("id") or f"p{i}")
            if pid in seen:
                raise ValueError(f"{path}: principles[{i}]: duplicate id {pid!r}")
            seen.add(pid)
            for f in need:
                v = it.get(f)
                if not isinstance(v, str) or not v.strip():
                    raise ValueError(f"{path}: principles[{i}] ({pid}): field {f!r} is missing or empty")
            out.append(Principle(pid, *(str(it.get(f) or "").strip() for f in ("critique", "revision", "comparison"))))
        return cls(out, str(path), hashlib.sha256(raw).hexdigest())

    def sample(self, seed: int, row_id: Any, step: Any, k: int = 1) -> list[Principle]:
        """``k`` distinct principles, reproducible from (seed, row id, step)
        and independent of chunking and row order."""
        rng = random.Random(f"{seed}|{row_id}|{step}")
        return rng.sample(self.principles, min(k, len(self.principles)))


def _text(row: dict[str, Any], col: str, what: str) -> str:
    v = row.get(col)
    if isinstance(v, list) and v and isinstance(v[-1], dict) and "content" in v[-1]:
        v = v[-1]["content"]  # conversational prompt: the last (user) turn
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"row {row.get(ROW_ID)}: column {col!r} ({what}) must be a non-empty string, got {v!r}")
    return v


_LABEL = re.compile(r"^\s*(?:here is (?:the|my|a) )?(?:revised response|revised answer|revision|revised)\s*:\s*",
                    re.IGNORECASE)


def clean_revision(text: str) -> str | None:
    """Strip a leading "Revision:"-style label; None when nothing is left."""
    t = _LABEL.sub("", text.strip(), count=1).strip()
    return t or None


# -- SL-CAI ------------------------------------------------------------------
@dataclass
class CAIReviseConfig:
    constitution: str = field(default=DEFAULT_CONSTITUTION, metadata={"help": "principles file (YAML: id, critique, revision, comparison)"})
    prompt_column: str = field(default="prompt", metadata={"help": "column with the user prompt"})
    response_column: str = field(default="response", metadata={"help": "column with the initial response to revise"})
    rounds: int = field(default=4, metadata={"help": "critique -> revision steps per prompt (one principle sampled per step)"})
    critique_prompt: str = field(default="cai_critique.jinja", metadata={"help": "template of the critique request"})
    revision_prompt: str = field(default="cai_revision.jinja", metadata={"help": "template of the revision request"})
    few_shot: str | None = field(default=None, metadata={"help": "optional YAML list of example transcripts (prompt, response, critique_request, critique, revision_request, revision) shown as earlier turns"})
    sampling: dict = field(default_factory=dict, metadata={"help": "temperature (default 1.0), top_p, max_tokens (default 256), ..."})
    emit: Literal["final", "all"] = field(default="final", metadata={"help": "final: one SFT row per prompt (last revision); all: one row per revision step (row_id/k)"})
    format: Literal["conversational", "standard"] = field(default="conversational", metadata={"help": "TRL prompt-completion format of prompt/completion"})
    model: str | None = field(default=None, metadata={"help": "model for this stage (default: the pipeline's)"})


class CAIReviseStage(MapStage):
    """SL-CAI critique/revision rounds -> SFT rows with the full history."""

    kind = "cai_revise"
    Config = CAIReviseConfig
    uses_model = True

    def __init__(self, config: CAIReviseConfig, base_dir):
        super().__init__(config, base_dir)
        if config.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {config.rounds}")
        with config_field("constitution"):
            self.constitution = Constitution.load(config.constitution, self.base_dir, need=("critique", "revision"))
        self.t_crit = self.load_template("critique_prompt")
        self.t_rev = self.load_template("revision_prompt")
        self.params = SamplingParams.from_dict({"temperature": 1.0, "max_tokens": 256, **config.sampling})
        with config_field("few_shot"):
            self.shots = self._load_shots(config.few_shot) if config.few_shot else []
        for t, need in ((self.t_crit, {"prompt", "response", "critique_request"}),
                        (self.t_rev, {"prompt", "response", "critique", "revision_request"})):
            if need - t.variables:
                raise ValueError(f"{t.source}: template must use {sorted(need - t.variables)}")

    def _load_shots(self, name: str) -> list[dict[str, str]]:
        path = find_file(name, self.base_dir, "few-shot file", want="file")
        data = _read_yaml(path)
        keys = ("prompt", "response", "critique_request", "critique", "revision_request", "revision")
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a list of transcripts")
        for i, s in enumerate(data):
            miss = [k for k in keys if not isinstance(s, dict) or not str(s.get(k) or "").strip()]
            if miss:
                raise ValueError(f"{path}: transcript {i}: missing field(s) {miss}")
        self._shots_sha = hashlib.sha256(path.read_bytes()).hexdigest()
        return data

    def required_columns(self) -> set[str]:
        return {self.config.prompt_column, self.config.response_column}

    def output_columns(self, input_columns: list[str]) -> list[str]:
        drop = {self.config.prompt_column, self.config.response_column, PROVENANCE, "prompt", "completion"}
        return [c for c in input_columns if c not in drop] + [
            "prompt", "completion", "initial_response", "revision_step", "cai_steps", PROVENANCE]

    def fingerprint(self) -> dict[str, Any]:
        fp = super().fingerprint()
        fp["template_sha256"] = hashlib.sha256((self.t_crit.sha256 + self.t_rev.sha256).encode()).hexdigest()
        fp["constitution_sha256"] = self.constitution.sha256
        if self.shots:
            fp["few_shot_sha256"] = self._shots_sha
        return fp

    def _messages(self, text: str, shot_turns: list[tuple[str, str]]) -> list[dict[str, str]]:
        msgs: list[dict[str, str]] = []
        for u, a in shot_turns:
            msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        return msgs + [{"role": "user", "content": text}]

    def process(self, rows: list[dict[str, Any]], ctx: StageContext) -> list[dict[str, Any]]:
        gen = ctx.generator(self.config.model)
        cfg = self.config
        shots_c = [(self.t_crit.render(s), s["critique"]) for s in self.shots]
        shots_r = [(self.t_rev.render(s), s["revision"]) for s in self.shots]
        live = []  # [row, prompt, current response, steps]
        for r in rows:
            live.append([r, _text(r, cfg.prompt_column, "prompt"), _text(r, cfg.response_column, "response"), []])
        for step in range(cfg.rounds):
            principles = [self.constitution.sample(ctx.seed, s[0][ROW_ID], step)[0] for s in live]
            crit_req = [
                GenerationRequest(messages=self._messages(self.t_crit.render(
                    {"prompt": s[1], "response": s[2], "critique_request": p.critique}, s[0][ROW_ID]), shots_c),
                    params=self.params)
                for s, p in zip(live, principles)
            ]
            crits = gen.generate(crit_req, desc=f"{ctx.stage_name} critique {step + 1}/{cfg.rounds}")
            ok = []
            for s, p, res in zip(live, principles, crits):
                if res.error or not res.completions:
                    ctx.stats.add("failed_requests")
                    ctx.record_failure(s[0][ROW_ID], res.error or "no completion")
                    continue
                c = res.completions[0]
                if c.finish_reason == "length":
                    ctx.stats.add("truncated_critiques")
                ok.append((s, p, c.text.strip()))
            rev_req = [
                GenerationRequest(messages=self._messages(self.t_rev.render(
                    {"prompt": s[1], "response": s[2], "critique_request": p.critique, "critique": crit,
                     "revision_request": p.revision}, s[0][ROW_ID]), shots_r), params=self.params)
                for s, p, crit in ok
            ]
            revs = gen.generate(rev_req, desc=f"{ctx.stage_name} revision {step + 1}/{cfg.rounds}")
            live = []
            for (s, p, crit), res in zip(ok, revs):
                if res.error or not res.completions:
                    ctx.stats.add("failed_requests")
                    ctx.record_failure(s[0][ROW_ID], res.error or "no completion")
                    continue
                c = res.completions[0]
                if c.finish_reason == "length":
                    ctx.stats.add("truncated_revisions")
                rev = clean_revision(c.text)
                if rev is None:
                    ctx.stats.add("empty_revisions_kept_previous")
                    rev = s[2]
                s[3].append({"principle_id": p.id, "critique": crit, "revision": rev,
                             "finish_reason": c.finish_reason})
                s[2] = rev
                live.append(s)
        out = []
        for row, prompt, final, steps in live:
            base = {k: v for k, v in row.items() if k not in (cfg.prompt_column, cfg.response_column, PROVENANCE)}
            prov = ctx.provenance(gen, self.params, self.fingerprint()["template_sha256"], steps[-1]["finish_reason"])
            history = list(row.get(PROVENANCE) or []) + [prov]
            emit = range(len(steps)) if cfg.emit == "all" else [len(steps) - 1]
            for k in emit:
                rid = row[ROW_ID] if cfg.emit == "final" else f"{row[ROW_ID]}/{k + 1}"
                out.append({**base, ROW_ID: rid, **trl_completion(prompt, steps[k]["revision"], cfg.format),
                            "initial_response": row[cfg.response_column], "revision_step": k + 1,
                            "cai_steps": steps, PROVENANCE: history})
        return out


# -- RL-CAI --------------------------------------------------------------------
@dataclass
class CAILabelConfig:
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
    model: str | None = field(default=None, metadata={"help": "feedback model (default: the pipeline's)"})


class CAILabelStage(MapStage):
    """RL-CAI soft preference labels from option log-probs, both orders."""

    kind = "cai_label"
    Config = CAILabelConfig
    uses_model = True

    def __init__(self, config: CAILabelConfig, base_dir):
        super().__init__(config, base_dir)
        if config.principles_per_label < 1 or config.cot_samples < 1:
            raise ValueError("principles_per_label and cot_samples must be >= 1")
        if len(config.clamp) != 2 or not 0 <= config.clamp[0] <= config.clamp[1] <= 1:
            raise ValueError(f"clamp must be [lo, hi] with 0 <= lo <= hi <= 1, got {config.clamp}")
        with config_field("constitution"):
            self.constitution = Constitution.load(config.constitution, self.base_dir, need=("comparison",))
        self.template = self.load_template("cot_prompt" if config.cot else "compare_prompt")
        need = {"prompt", "comparison", "response_a", "response_b"} - self.template.variables
        if need:
            raise ValueError(f"{self.template.source}: template must use {sorted(need)}")
        with config_field("options"):
            self.scorer = OptionScorer(config.options, config.chat)
        self.cot_params = self.sampling_params(
            "cot_sampling", {"temperature": 1.0, "max_tokens": 256, "stop": ["Human:", "User:", config.cot_answer]},
            n="cot_samples")

    def required_columns(self) -> set[str]:
        return {self.config.prompt_column, self.config.responses_column}

    def output_columns(self, input_columns: list[str]) -> list[str]:
        drop = {self.config.prompt_column, PROVENANCE, "prompt", "chosen", "rejected"}
        return [c for c in input_columns if c not in drop] + [
            "prompt", "chosen", "rejected", "score_chosen", "score_rejected", "margin", "p_chosen",
            "p_response_1", "p_order_ab", "p_order_ba", "position_gap", "principle_ids", "label_logprobs",
            "cot_rationales", PROVENANCE]

    def fingerprint(self) -> dict[str, Any]:
        fp = super().fingerprint()
        fp["template_sha256"] = self.template.sha256
        fp["constitution_sha256"] = self.constitution.sha256
        return fp

    def _context(self, prompt: str, principle: Principle, a: str, b: str, rid: Any) -> str:
        return self.template.render({"prompt": prompt, "comparison": principle.comparison,
                                     "response_a": a, "response_b": b}, rid)

    def process(self, rows: list[dict[str, Any]], ctx: StageContext) -> list[dict[str, Any]]:
        cfg = self.config
        gen = ctx.generator(cfg.model)
        jobs = []  # (item index, principle, order, context)
        items = []
        item_jobs: list[list[int]] = []
        for r in rows:
            resp = r.get(cfg.responses_column)
            if not isinstance(resp, list) or len(resp) < 2 or not all(isinstance(x, str) for x in resp[:2]):
                ctx.stats.add("fewer_than_two_responses")
                continue
            r1, r2 = resp[0], resp[1]
            if r1.strip() == r2.strip():
                ctx.stats.add("identical_responses")
                continue
            prompt = _text(r, cfg.prompt_column, "prompt")
            principles = self.constitution.sample(ctx.seed, r[ROW_ID], "label", cfg.principles_per_label)
            k = len(items)
            items.append((r, prompt, r1, r2, principles))
            item_jobs.append([len(jobs) + i for i in range(2 * len(principles))])
            for p in principles:
                jobs.append((k, p, "ab", self._context(prompt, p, r1, r2, r[ROW_ID])))
                jobs.append((k, p, "ba", self._context(prompt, p, r2, r1, r[ROW_ID])))
        rationales: list[list[str]] = [[] for _ in jobs]
        if cfg.cot and jobs:
            reqs = [GenerationRequest(messages=[{"role": "user", "content": c}], params=self.cot_params) if cfg.chat
                    else GenerationRequest(prompt=c + "\nLet's think step by step:", params=self.cot_params)
                    for _, _, _, c in jobs]
            for j, res in enumerate(gen.generate(reqs, desc=f"{ctx.stage_name} rationales")):
                if res.error or not res.completions:
                    ctx.stats.add("failed_rationales")
                    continue
                rationales[j] = [c.text.strip() for c in res.completions]
            contexts, owner = [], []
            for j, (_, _, _, c) in enumerate(jobs):
                for cot in rationales[j]:
                    owner.append(j)
                    if cfg.chat:
                        contexts.append([{"role": "user", "content": c}, {"role": "assistant", "content": cot},
                                         {"role": "user", "content": cfg.cot_answer}])
                    else:
                        contexts.append(f"{c}\nLet's think step by step: {cot}\n{cfg.cot_answer}")
        else:
            contexts = [c for _, _, _, c in jobs]
            owner = list(range(len(jobs)))
        lp = self.scorer.logprobs(gen, contexts)
        # P(A) for each (job, sample); then per item: average over principles and samples
        per_job: list[list[tuple[float, float, float]]] = [[] for _ in jobs]
        for j, (la, lb) in zip(owner, lp):
            per_job[j].append((soft_label(la, lb), float(la), float(lb)))
        out = []
        tpl_sha = self.fingerprint()["template_sha256"]
        for k, (r, prompt, r1, r2, principles) in enumerate(items):
            mine = item_jobs[k]
            ab = [j for j in mine if jobs[j][2] == "ab"]
            ba = [j for j in mine if jobs[j][2] == "ba"]
            if any(not per_job[j] for j in mine):
                ctx.stats.add("unlabelled_no_rationale")
                ctx.record_failure(r[ROW_ID], "no rationale could be sampled")
                continue
            p_ab, p_ba, gaps, p1s, logs = [], [], [], [], []
            for ja, jb in zip(ab, ba):  # same principle, two orders
                pa = sum(x[0] for x in per_job[ja]) / len(per_job[ja])
                pb = sum(x[0] for x in per_job[jb]) / len(per_job[jb])
                p1, gap = merge_orders(pa, pb)
                p_ab.append(pa)
                p_ba.append(1.0 - pb)
                gaps.append(gap)
                p1s.append(p1)
                for order, j in (("ab", ja), ("ba", jb)):
                    for s, (_, la, lb) in enumerate(per_job[j]):
                        logs.append({"principle_id": jobs[j][1].id, "order": order, "sample": s,
                                     "logprob_a": la, "logprob_b": lb})
            p = sum(p1s) / len(p1s)
            if cfg.cot:
                p = clamp(p, cfg.clamp[0], cfg.clamp[1])
            if p == 0.5 and cfg.drop_ties:
                ctx.stats.add("tie")
                continue
            first = p >= 0.5
            chosen, rejected = (r1, r2) if first else (r2, r1)
            pc = p if first else 1.0 - p
            base = {k2: v for k2, v in r.items() if k2 not in (cfg.prompt_column, PROVENANCE)}
            prov = ctx.provenance(gen, self.cot_params if cfg.cot else SamplingParams(n=1, temperature=0.0, max_tokens=1),
                                  tpl_sha, "scored")
            out.append({
                **base, **trl_pair(prompt, chosen, rejected, cfg.format),
                "score_chosen": pc, "score_rejected": 1.0 - pc, "margin": 2.0 * pc - 1.0, "p_chosen": pc,
                "p_response_1": p,
                "p_order_ab": sum(p_ab) / len(p_ab), "p_order_ba": sum(p_ba) / len(p_ba),
                "position_gap": sum(gaps) / len(gaps),
                "principle_ids": [pr.id for pr in principles],
                "label_logprobs": logs,
                "cot_rationales": [t for j in mine for t in rationales[j]],
                PROVENANCE: list(r.get(PROVENANCE) or []) + [prov],
            })
        return out


__all__ = ["CAILabelStage", "CAIReviseStage", "Constitution", "Principle", "clean_revision", "FORMATS"]
