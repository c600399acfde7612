"""Self-Instruct (Wang et al., 2022) and the Alpaca variant as pipeline stages.

* ``self_instruct_bootstrap`` (iterative): seed pool -> new instructions,
  8 demos per prompt (<= 2 machine-made), filters, ROUGE-L novelty, until
  ``num_instructions`` are accepted.
* ``self_instruct_classify``: is each instruction a classification task?
* ``self_instruct_instances``: output-first (classification) or input-first
  instance generation with the reference post-filters; one row per instance.
* ``alpaca_bootstrap`` (iterative): Alpaca's single call, 3 seed demos with
  input/output, up to 20 tasks with their instance per response.

Prompts are files in ``prompts/``; every step hands all its prompts to the
generator in one call. See specs/methods.md section 1.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from ..data import PROVENANCE, ROW_ID
from ..engine.stage import IterativeStage, MapStage, StageContext
from ..llm.types import SamplingParams
from .filters import RougeLIndex
from .self_instruct_filters import (
    ALPACA_EXTRA_BLACKLIST,
    SELF_INSTRUCT_BLACKLIST,
    clean_instruction,
    demo_instruction,
    filter_instances,
    instruction_drop_reason,
    parse_alpaca_blocks,
    parse_input_first,
    parse_instruction_list,
    parse_output_first,
    parse_yes_no,
)
from ..llm.prompts import text_request

# Reference decoding (GPT-3 davinci, section 1.2); user ``sampling`` overrides.
BOOTSTRAP_SAMPLING = dict(temperature=0.7, top_p=0.5, max_tokens=1024, presence_penalty=2.0,
                          frequency_penalty=0.0, stop=["\n\n", "\n16", "16.", "16 ."])
ALPACA_SAMPLING = dict(temperature=1.0, top_p=1.0, max_tokens=3072, stop=["\n20", "20.", "20."])
CLASSIFY_SAMPLING = dict(temperature=0.0, max_tokens=3, stop=["\n", "Task"])
INSTANCE_SAMPLING = dict(temperature=0.0, presence_penalty=1.5, stop=["Example 6", "Task:"])


def _seed_text(row: dict[str, Any], column: str) -> str:
    v = row.get(column)
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"seed row {row.get(ROW_ID)!r}: column {column!r} is missing or empty")
    return v


@dataclass
class BootstrapConfig:
    num_instructions: int = field(default=100, metadata={"help": "stop once this many machine instructions are accepted"})
    prompts_per_step: int = field(default=64, metadata={"help": "prompts sent to the model per step (one engine call)"})
    num_demos: int = field(default=8, metadata={"help": "in-context instructions per prompt"})
    max_machine_demos: int = field(default=2, metadata={"help": "at most this many demos come from machine output"})
    classification_only: bool = field(default=False, metadata={"help": "ask for classification tasks; demos from seeds with is_classification"})
    instruction_column: str = field(default="instruction", metadata={"help": "seed column holding the instruction"})
    prompt: str = field(default="self_instruct_generate.jinja", metadata={"help": "prompt template (variables: demos, chat, classification_only)"})
    chat: bool = field(default=False, metadata={"help": "send the prompt as a chat message (false: raw completion ending in '9.')"})
    system: str | None = field(default=None, metadata={"help": "system message (chat mode; in completion mode a paragraph before the prompt)"})
    sampling: dict = field(default_factory=dict, metadata={"help": "overrides of the reference decoding (temperature 0.7, top_p 0.5, presence_penalty 2, ...)"})
    discard_truncated: bool = field(default=True, metadata={"help": "drop a whole response that hit max_tokens (reference)"})
    faithful_capitalize: bool = field(default=True, metadata={"help": "str.capitalize() like the reference (lower-cases the rest)"})
    extra_blacklist: list[str] = field(default_factory=list, metadata={"help": "words added to the keyword blacklist"})
    rouge_threshold: float = field(default=0.7, metadata={"help": "reject when ROUGE-L F1 with seeds or accepted > this"})
    max_steps: int = field(default=200, metadata={"help": "give up (counted) after this many steps short of the target"})
    model: str | None = field(default=None, metadata={"help": "model for this stage (default: the pipeline's)"})


class SelfInstructBootstrapStage(IterativeStage):
    """Self-Instruct's instruction bootstrap loop (iterative stage).

    Input rows are the seed pool. Each step samples demos (RNG seeded from
    ``(seed, step)``), sends ``prompts_per_step`` prompts in one call, parses
    the numbered lists, applies the filters in reference order and then the
    ROUGE-L novelty filter against seeds + everything accepted so far. Each
    output row records the ids of the demos that produced it.
    """

    kind = "self_instruct_bootstrap"
    Config = BootstrapConfig
    uses_model = True
    default_sampling = BOOTSTRAP_SAMPLING
    base_blacklist = SELF_INSTRUCT_BLACKLIST

    def __init__(self, config, base_dir):
        super().__init__(config, base_dir)
        c = self.config
        if c.num_demos < 1 or not 0 <= c.max_machine_demos <= c.num_demos:
            raise ValueError("need num_demos >= 1 and 0 <= max_machine_demos <= num_demos")
        if c.num_instructions < 1 or c.prompts_per_step < 1:
            raise ValueError("num_instructions and prompts_per_step must be >= 1")
        self.params = SamplingParams.from_dict({**self.default_sampling, **c.sampling})
        self.template = self.load_template("prompt")
        self.blacklist = tuple(self.base_blacklist) + tuple(c.extra_blacklist)
        self._index: RougeLIndex | None = None
        self._index_key: tuple | None = None

    def required_columns(self) -> set[str]:
        return {self.config.instruction_column}

    def output_columns(self, input_columns: list[str]) -> list[str]:
        return [ROW_ID, "instruction", "source", "step", "demo_ids", "rouge_l_max", "most_similar", PROVENANCE]

    def fingerprint(self) -> dict[str, Any]:
        fp = super().fingerprint()
        fp["template_sha256"] = self.template.sha256
        fp["config"].pop("prompt", None)
        return fp

    # -- pieces shared with the Alpaca variant --------------------------------
    def _seed_pool(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        col = self.config.instruction_column
        for r in rows:
            _seed_text(r, col)
        if self.config.classification_only:
            rows = [r for r in rows if r.get("is_classification")]
            if not rows:
                raise ValueError("classification_only: no seed row has is_classification = true")
        return rows

    def _novelty_index(self, seeds: list[dict], produced: list[dict]) -> RougeLIndex:
        """Index of seeds + accepted instructions, kept between steps and
        rebuilt when it does not match ``produced`` (e.g. after a resume)."""
        key = (len(seeds), len(produced), produced[-1][ROW_ID] if produced else None)
        if self._index is None or self._index_key != key:
            col = self.config.instruction_column
            texts = [r[col] for r in seeds] + [p["instruction"] for p in produced]
            self._index = RougeLIndex(texts)
            self._index_texts = texts
        return self._index

    def _demos(self, seeds, produced, rng: random.Random) -> list[dict[str, Any]]:
        """``num_demos`` demos ({row_id, text}): up to ``max_machine_demos``
        machine ones, the rest seeds, shuffled."""
        c = self.config
        col = c.instruction_column
        machine = rng.sample(produced, min(c.max_machine_demos, len(produced)))
        k = min(c.num_demos - len(machine), len(seeds))
        human = rng.sample(seeds, k)
        demos = [{ROW_ID: m[ROW_ID], "text": m["instruction"]} for m in machine]
        demos += [{ROW_ID: h[ROW_ID], "text": h[col]} for h in human]
        rng.shuffle(demos)
        return demos

    def _prompt(self, demos) -> str:
        return self.template.render(
            {"demos": [demo_instruction(d["text"]) for d in demos], "chat": self.config.chat,
             "classification_only": self.config.classification_only}, "bootstrap prompt")

    def _candidates(self, completion, ctx: StageContext) -> list[dict[str, str]]:
        """Parse one response into candidate rows (only 'instruction' here)."""
        if completion.finish_reason == "length" and self.config.discard_truncated:
            ctx.stats.add("truncated_responses_discarded")
            return []
        raw = parse_instruction_list(completion.text, first_unnumbered=not self.config.chat)
        return [{"instruction": clean_instruction(t, self.config.faithful_capitalize)} for t in raw]

    # -- the loop ----------------------------------------------------------------
    def step(self, rows, produced, step, ctx: StageContext):
        c = self.config
        if len(produced) >= c.num_instructions:
            return None
        if step > c.max_steps:
            return None
        if step == c.max_steps:
            ctx.stats.add("stopped_at_max_steps_short_of_target", c.num_instructions - len(produced))
            return []
        seeds = self._seed_pool(rows)
        index = self._novelty_index(seeds, produced)
        rng = random.Random(f"{ctx.seed}:{self.kind}:{step}")
        demo_sets = [self._demos(seeds, produced, rng) for _ in range(c.prompts_per_step)]
        requests = [text_request(self._prompt(d), self.params, c.chat, c.system) for d in demo_sets]
        gen = ctx.generator(c.model)
        results = gen.generate(requests, desc=ctx.stage_name)
        ctx.stats.add("prompts", len(requests))
        new: list[dict[str, Any]] = []
        need = c.num_instructions - len(produced)
        for p_idx, (demos, res) in enumerate(zip(demo_sets, results)):
            if res.error:
                ctx.stats.add("failed_requests")
                ctx.record_failure(f"step{step}/prompt{p_idx}", res.error)
                continue
            for comp in res.completions:
                cands = self._candidates(comp, ctx)
                ctx.stats.add("candidates", len(cands))
                if not cands:
                    ctx.stats.add("responses_without_candidates")
                prov = ctx.provenance(gen, self.params, self.template.sha256, comp.finish_reason)
                for cand in cands:
                    reason = instruction_drop_reason(cand["instruction"], self.blacklist)
                    if reason is None and len(new) >= need:
                        reason = "over_target"
                    if reason is None:
                        if index.exceeds(cand["instruction"], c.rouge_threshold):
                            reason = "rouge_l_similar"
                    if reason is not None:
                        ctx.stats.add(f"dropped_{reason}")
                        continue
                    score, best = index.max_score(cand["instruction"])
                    index.add(cand["instruction"])
                    self._index_texts.append(cand["instruction"])
                    ctx.stats.add("accepted")
                    new.append({
                        ROW_ID: f"si-{step:05d}-{len(new):05d}",
                        **cand,
                        "source": "machine",
                        "step": step,
                        "demo_ids": [d[ROW_ID] for d in demos],
                        "rouge_l_max": float(score),
                        "most_similar": self._index_texts[best] if best >= 0 else "",
                        PROVENANCE: [prov],
                    })
        self._index_key = (len(seeds), len(produced) + len(new), new[-1][ROW_ID] if new else
                           (produced[-1][ROW_ID] if produced else None))
        return new


@dataclass
class AlpacaConfig:
    num_instructions: int = field(default=100, metadata={"help": "stop once this many tasks are accepted"})
    prompts_per_step: int = field(default=32, metadata={"help": "prompts per step (one engine call)"})
    num_demos: int = field(default=3, metadata={"help": "seed tasks (with input/output) per prompt"})
    tasks_per_response: int = field(default=20, metadata={"help": "how many tasks the prompt asks for"})
    instruction_column: str = field(default="instruction", metadata={"help": "seed column: instruction"})
    input_column: str | None = field(default=None, metadata={"help": "seed column: input (default: instances[0].input, the seed-file format)"})
    output_column: str | None = field(default=None, metadata={"help": "seed column: output (default: instances[0].output)"})
    prompt: str = field(default="alpaca_generate.jinja", metadata={"help": "prompt template (variables: demos, chat, num_tasks)"})
    chat: bool = field(default=False, metadata={"help": "send as a chat message (false: raw completion)"})
    system: str | None = field(default=None, metadata={"help": "system message (chat mode; in completion mode a paragraph before the prompt)"})
    sampling: dict = field(default_factory=dict, metadata={"help": "overrides of Alpaca's decoding (temperature 1, top_p 1, ...)"})
    faithful_capitalize: bool = field(default=False, metadata={"help": "Alpaca does not capitalize; true applies str.capitalize()"})
    extra_blacklist: list[str] = field(default_factory=list, metadata={"help": "words added to the keyword blacklist"})
    rouge_threshold: float = field(default=0.7, metadata={"help": "reject when ROUGE-L F1 > this"})
    max_steps: int = field(default=200, metadata={"help": "give up (counted) after this many steps"})
    model: str | None = field(default=None, metadata={"help": "model for this stage (default: the pipeline's)"})


class AlpacaBootstrapStage(SelfInstructBootstrapStage):
    """Alpaca's simplification: demos only from seeds (with input/output),
    one call yields instruction, input and output; no classification step."""

    kind = "alpaca_bootstrap"
    Config = AlpacaConfig
    default_sampling = ALPACA_SAMPLING
    base_blacklist = SELF_INSTRUCT_BLACKLIST + ALPACA_EXTRA_BLACKLIST

    def __init__(self, config, base_dir):
        config.max_machine_demos = 0  # type: ignore[attr-defined]
        config.classification_only = False  # type: ignore[attr-defined]
        super().__init__(config, base_dir)

    def fingerprint(self) -> dict[str, Any]:
        fp = super().fingerprint()
        for k in ("max_machine_demos", "classification_only"):
            fp["config"].pop(k, None)
        return fp

    def required_columns(self) -> set[str]:
        c = self.config
        cols = {c.instruction_column, c.input_column, c.output_column} - {None}
        return cols if c.input_column and c.output_column else cols | {"instances"}

    def _seed_io(self, row: dict[str, Any]) -> tuple[str, str]:
        c = self.config
        if c.input_column and c.output_column:
            inp, outp = row.get(c.input_column), row.get(c.output_column)
        else:
            inst = row.get("instances") or []
            if not inst or not isinstance(inst[0], dict):
                raise ValueError(f"seed row {row.get(ROW_ID)!r}: 'instances' must hold at least one {{input, output}}")
            inp, outp = inst[0].get("input"), inst[0].get("output")
        if not isinstance(outp, str) or not outp.strip():
            raise ValueError(f"seed row {row.get(ROW_ID)!r}: the demo output is missing or empty")
        return (inp or "").strip(), outp.strip()

    def output_columns(self, input_columns: list[str]) -> list[str]:
        cols = super().output_columns(input_columns)
        return cols[:2] + ["input", "output"] + cols[2:]

    def _demos(self, seeds, produced, rng):
        """Seeds only (Alpaca never shows machine output)."""
        return rng.sample(seeds, min(self.config.num_demos, len(seeds)))

    def _prompt(self, demos) -> str:
        c = self.config
        items = []
        for d in demos:
            inp, outp = self._seed_io(d)
            items.append({"instruction": demo_instruction(d[c.instruction_column]),
                          "input": inp or "<noinput>", "output": outp})
        return self.template.render({"demos": items, "chat": c.chat, "num_tasks": c.tasks_per_response},
                                    "alpaca prompt")

    def _candidates(self, completion, ctx):
        items, bad = parse_alpaca_blocks(completion.text, self.config.num_demos + 1,
                                         truncated=completion.finish_reason == "length")
        ctx.stats.add("dropped_malformed_block", bad)
        for it in items:
            it["instruction"] = clean_instruction(it["instruction"], self.config.faithful_capitalize)
        return items


@dataclass
class ClassifyConfig:
    instruction_column: str = field(default="instruction", metadata={"help": "column holding the task instruction"})
    output_column: str = field(default="is_classification", metadata={"help": "boolean column written"})
    prompt: str = field(default="self_instruct_is_classification.jinja", metadata={"help": "few-shot prompt (variables: instruction, chat)"})
    chat: bool = field(default=False, metadata={"help": "send as a chat message (false: raw completion)"})
    sampling: dict = field(default_factory=dict, metadata={"help": "overrides of the reference decoding (greedy, max_tokens 3)"})
    unparseable_as: bool = field(default=False, metadata={"help": "label given when the answer is neither yes nor no (counted)"})
    model: str | None = field(default=None, metadata={"help": "model for this stage (default: the pipeline's)"})


class SelfInstructClassifyStage(MapStage):
    """Labels each instruction as classification or not (few-shot Yes/No).
    Answers that are neither are counted (``unparseable_label``) and get
    ``unparseable_as``; rows with an existing label are not re-asked."""

    kind = "self_instruct_classify"
    Config = ClassifyConfig
    uses_model = True

    def __init__(self, config, base_dir):
        super().__init__(config, base_dir)
        self.params = SamplingParams.from_dict({**CLASSIFY_SAMPLING, **config.sampling})
        self.template = self.load_template("prompt")

    def required_columns(self) -> set[str]:
        return {self.config.instruction_column}

    def output_columns(self, input_columns: list[str]) -> list[str]:
        cols = [c for c in input_columns if c not in (PROVENANCE, self.config.output_column)]
        return cols + [self.config.output_column, PROVENANCE]

    def fingerprint(self) -> dict[str, Any]:
        fp = super().fingerprint()
        fp["template_sha256"] = self.template.sha256
        fp["config"].pop("prompt", None)
        return fp

    def process(self, rows, ctx):
        c = self.config
        gen = ctx.generator(c.model)
        todo = [r for r in rows if r.get(c.output_column) is None]
        ctx.stats.add("already_labelled", len(rows) - len(todo))
        reqs = [text_request(self.template.render({"instruction": _seed_text(r, c.instruction_column), "chat": c.chat},
                                                  r.get(ROW_ID)), self.params, c.chat) for r in todo]
        results = dict(zip((r[ROW_ID] for r in todo), gen.generate(reqs, desc=ctx.stage_name)))
        out = []
        for r in rows:
            row = dict(r)
            row[PROVENANCE] = list(r.get(PROVENANCE) or [])
            res = results.get(r[ROW_ID])
            if res is not None:
                label = None
                finish = "error"
                if res.error:
                    ctx.stats.add("failed_requests")
                    ctx.record_failure(r[ROW_ID], res.error)
                else:
                    label = parse_yes_no(res.completions[0].text)
                    finish = res.completions[0].finish_reason
                if label is None:
                    ctx.stats.add("unparseable_label")
                    label = c.unparseable_as
                ctx.stats.add("classification" if label else "not_classification")
                row[c.output_column] = bool(label)
                row[PROVENANCE].append(ctx.provenance(gen, self.params, self.template.sha256, finish))
            else:
                row[c.output_column] = bool(r[c.output_column])
            out.append(row)
        return out


@dataclass
class InstancesConfig:
    instruction_column: str = field(default="instruction", metadata={"help": "column holding the task instruction"})
    classification_column: str = field(default="is_classification", metadata={"help": "boolean column choosing output-first"})
    input_first_prompt: str = field(default="self_instruct_input_first.jinja", metadata={"help": "prompt for non-classification tasks"})
    output_first_prompt: str = field(default="self_instruct_output_first.jinja", metadata={"help": "prompt for classification tasks"})
    chat: bool = field(default=False, metadata={"help": "send as a chat message (false: raw completion)"})
    sampling: dict = field(default_factory=dict, metadata={"help": "overrides (reference: greedy, presence_penalty 1.5, max_tokens 300/350)"})
    max_instances: int = field(default=5, metadata={"help": "keep at most this many instances per task (random sample)"})
    model: str | None = field(default=None, metadata={"help": "model for this stage (default: the pipeline's)"})


class SelfInstructInstancesStage(MapStage):
    """Generates input/output instances per task: output-first for
    classification tasks, input-first otherwise; applies the reference
    instance filters and emits one row per kept instance (``row_id/k``)."""

    kind = "self_instruct_instances"
    Config = InstancesConfig
    uses_model = True

    def __init__(self, config, base_dir):
        super().__init__(config, base_dir)
        self.input_first = self.load_template("input_first_prompt")
        self.output_first = self.load_template("output_first_prompt")
        self.params = {
            True: SamplingParams.from_dict({**INSTANCE_SAMPLING, "max_tokens": 300, **config.sampling}),
            False: SamplingParams.from_dict({**INSTANCE_SAMPLING, "max_tokens": 350, **config.sampling}),
        }

    def required_columns(self) -> set[str]:
        return {self.config.instruction_column, self.config.classification_column}

    def output_columns(self, input_columns: list[str]) -> list[str]:
        cols = [c for c in input_columns if c not in (PROVENANCE, "input", "output", "generation_mode")]
        return cols + ["input", "output", "generation_mode", PROVENANCE]

    def fingerprint(self) -> dict[str, Any]:
        fp = super().fingerprint()
        fp["template_sha256"] = self.input_first.sha256 + ":" + self.output_first.sha256
        fp["config"].pop("input_first_prompt", None)
        fp["config"].pop("output_first_prompt", None)
        return fp

    def process(self, rows, ctx):
        c = self.config
        gen = ctx.generator(c.model)
        reqs = []
        for r in rows:
            clf = bool(r.get(c.classification_column))
            tpl = self.output_first if clf else self.input_first
            text = tpl.render({"instruction": _seed_text(r, c.instruction_column), "chat": c.chat}, r.get(ROW_ID))
            reqs.append(text_request(text, self.params[clf], c.chat))
        results = gen.generate(reqs, desc=ctx.stage_name)
        out = []
        for r, res in zip(rows, results):
            if res.error:
                ctx.stats.add("failed_requests")
                ctx.record_failure(r[ROW_ID], res.error)
                continue
            clf = bool(r.get(c.classification_column))
            comp = res.completions[0]
            truncated = comp.finish_reason == "length"
            parse = parse_output_first if clf else parse_input_first
            parsed = parse(comp.text, truncated)
            ctx.stats.add("instances_parsed", len(parsed))
            counts: dict[str, int] = {}
            rng = random.Random(f"{ctx.seed}:{r[ROW_ID]}")
            kept = filter_instances(parsed, c.max_instances, rng, counts)
            for k, v in counts.items():
                ctx.stats.add(f"dropped_{k}", v)
            ctx.stats.add("instances_kept", len(kept))
            if not kept:
                ctx.stats.add("tasks_without_instances")
                continue
            tpl = self.output_first if clf else self.input_first
            prov = ctx.provenance(gen, self.params[clf], tpl.sha256, comp.finish_reason)
            base = {k: v for k, v in r.items() if k != PROVENANCE}
            for k, (inp, outp) in enumerate(kept):
                out.append({**base, ROW_ID: f"{r[ROW_ID]}/{k}", "input": inp, "output": outp,
                            "generation_mode": "output_first" if clf else "input_first",
                            PROVENANCE: list(r.get(PROVENANCE) or []) + [prov]})
        return out
