"""Self-Instruct's per-task stages (Wang et al., 2022; specs/methods.md
section 1): ``self_instruct_classify`` (is the instruction a classification
task? ``scoring: logprobs``, the default on local engines, compares the
log-probabilities of " Yes" and " No" after the prompt's last line "Is it
classification?" instead of parsing a sampled answer; ``text`` parses it, for
API models) and ``self_instruct_instances`` (output-first for classification,
input-first otherwise, with the reference post-filters; one SFT row per
instance: ``prompt``/``completion`` from instruction + input -> output, see
:func:`.self_instruct.instance_sft`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..data import PROVENANCE, ROW_ID
from ..data.trl import SFT_COLUMNS
from ..engine.stage import Ask, ModelConfig, ModelStage
from ..llm.types import ScoreResult
from ..rank.label_scores import SCORING_MODES, LabelScorer, resolve_scoring
from .self_instruct_filters import (
    filter_instances,
    parse_input_first,
    parse_output_first,
    parse_yes_no,
)

# Reference decoding (GPT-3 davinci, section 1.2); user ``sampling`` overrides.
from .self_instruct import CLASSIFY_SAMPLING, INSTANCE_SAMPLING, _seed_text, instance_sft


@dataclass
class ClassifyConfig(ModelConfig):
    instruction_column: str = field(default="instruction", metadata={"help": "column holding the task instruction"})
    output_column: str = field(default="is_classification", metadata={"help": "boolean column written"})
    prompt: str = field(default="self_instruct_is_classification.jinja", metadata={"help": "few-shot prompt (variables: instruction, chat)"})
    chat: bool = field(default=False, metadata={"help": "send as a chat message (false: raw completion)"})
    unparseable_as: bool = field(default=False, metadata={"help": "label given when the answer is neither yes nor no (counted)"})
    scoring: Literal["auto", "logprobs", "text"] = field(default="auto", metadata={
        "help": "logprobs: compare the log-probabilities of 'Yes' and 'No' after 'Is it classification?' (nothing "
                "parsed; sampling unused); text: sample an answer and parse yes/no (API models); auto: logprobs on "
                "vllm/transformers, text otherwise"})


class SelfInstructClassifyStage(ModelStage):
    """Labels each instruction as classification or not (few-shot Yes/No).
    Answers that are neither, and failed requests, are counted
    (``unparseable_label``) and get ``unparseable_as``; rows with an existing
    label pass through unasked."""

    kind = "self_instruct_classify"
    Config = ClassifyConfig
    sampling_defaults = CLASSIFY_SAMPLING

    def __init__(self, config, base_dir):
        super().__init__(config, base_dir)
        self.params = self.sampling()
        self.template = self.load_template("prompt")
        if config.scoring not in SCORING_MODES:
            raise ValueError(f"scoring: expected one of {list(SCORING_MODES)}, got {config.scoring!r}")
        self.scorer = LabelScorer(("Yes", "No"), "Is it classification?", chat=config.chat, values=(1.0, 0.0))

    def required_columns(self) -> set[str]:
        return {self.config.instruction_column}

    def output_columns(self, input_columns: list[str]) -> list[str]:
        cols = [c for c in input_columns if c not in (PROVENANCE, self.config.output_column)]
        return cols + [self.config.output_column, PROVENANCE]

    def requests(self, row, ctx):
        c = self.config
        if row.get(c.output_column) is not None:
            ctx.stats.add("already_labelled")
            return None
        text = self.template.render({"instruction": _seed_text(row, c.instruction_column), "chat": c.chat},
                                    row.get(ROW_ID))
        if resolve_scoring(c.scoring, ctx.generator(self.model_name()).info.backend) == "logprobs":
            return Ask(self.scorer.requests(text))  # " Yes" / " No", batched with the chunk's other rows
        return Ask(self.chat(text, self.params, chat=c.chat), partial=True)  # a failed request: unparseable_as

    def parse(self, row, res, ctx):
        if isinstance(res, list) and res and isinstance(res[0], ScoreResult):
            read = self.scorer.read(res)
            label = bool(read.top) if read.ok else None
            ctx.stats.add("scored_from_logprobs")
        else:
            label = None if res.error else parse_yes_no(res.completions[0].text)
        if not getattr(res, "error", None):  # a failed request is no output (counted as failed_requests)
            ctx.stats.add("outputs")
            ctx.stats.add("parsed", int(label is not None))
        if label is None:
            ctx.stats.add("unparseable_label")
            label = self.config.unparseable_as
        ctx.stats.add("classification" if label else "not_classification")
        return {self.config.output_column: bool(label)}


@dataclass
class InstancesConfig(ModelConfig):
    instruction_column: str = field(default="instruction", metadata={"help": "column holding the task instruction"})
    classification_column: str = field(default="is_classification", metadata={"help": "boolean column choosing output-first"})
    input_first_prompt: str = field(default="self_instruct_input_first.jinja", metadata={"help": "prompt for non-classification tasks"})
    output_first_prompt: str = field(default="self_instruct_output_first.jinja", metadata={"help": "prompt for classification tasks"})
    chat: bool = field(default=False, metadata={"help": "send as a chat message (false: raw completion)"})
    max_instances: int = field(default=5, metadata={"help": "keep at most this many instances per task (random sample)"})
    format: Literal["conversational", "standard"] = field(default="conversational", metadata={
        "help": "TRL format of the SFT columns prompt/completion: conversational (user turn: instruction, blank "
                "line, input) or standard (Self-Instruct's '{instruction}\\n\\n{input}\\n\\n' prompt string)"})


class SelfInstructInstancesStage(ModelStage):
    """Generates input/output instances per task: output-first for
    classification tasks, input-first otherwise (reference max_tokens 300 /
    350); applies the reference instance filters and emits one row per kept
    instance (``row_id/k``)."""

    kind = "self_instruct_instances"
    Config = InstancesConfig
    sampling_defaults = INSTANCE_SAMPLING

    def __init__(self, config, base_dir):
        super().__init__(config, base_dir)
        input_first = self.load_template("input_first_prompt")
        self.templates = {True: self.load_template("output_first_prompt"), False: input_first}
        self.params = {clf: self.sampling(defaults={**INSTANCE_SAMPLING, "max_tokens": n})
                       for clf, n in ((True, 300), (False, 350))}

    def required_columns(self) -> set[str]:
        return {self.config.instruction_column, self.config.classification_column}

    def output_columns(self, input_columns: list[str]) -> list[str]:
        new = ["input", "output", "generation_mode", *SFT_COLUMNS]
        return [c for c in input_columns if c not in (PROVENANCE, *new)] + new + [PROVENANCE]

    def requests(self, row, ctx):
        c = self.config
        clf = bool(row.get(c.classification_column))
        text = self.templates[clf].render({"instruction": _seed_text(row, c.instruction_column), "chat": c.chat},
                                          row.get(ROW_ID))
        return self.chat(text, self.params[clf], chat=c.chat)

    def parse(self, row, res, ctx):
        c = self.config
        clf = bool(row.get(c.classification_column))
        comp = res.completions[0]
        parsed = (parse_output_first if clf else parse_input_first)(comp.text, comp.finish_reason == "length")
        ctx.stats.add("instances_parsed", len(parsed))
        # the task's completion parsed when it gave at least one instance (the filters below are drops); one cut
        # at max_tokens before its first instance was whole is a truncation (truncated_outputs), as in every
        # stage's parse figure, not an output that failed to parse
        if parsed or comp.finish_reason != "length":
            ctx.stats.add("outputs")
            ctx.stats.add("parsed", int(bool(parsed)))
        if not parsed:
            ctx.stats.add("completions_without_instances")
        counts: dict[str, int] = {}
        kept = filter_instances(parsed, c.max_instances, ctx.rng(row[ROW_ID]), counts)
        for reason, n in counts.items():
            ctx.stats.add(f"dropped_{reason}", n)
        ctx.stats.add("instances_kept", len(kept))
        if not kept:
            ctx.stats.add("tasks_without_instances")
        # the record names the template this row was asked with (not the hash of both)
        prov = {"template_sha256": self.templates[clf].sha256, "finish_reason": comp.finish_reason}
        mode = "output_first" if clf else "input_first"
        inst = _seed_text(row, c.instruction_column)
        return [{ROW_ID: f"{row[ROW_ID]}/{k}", "input": inp, "output": outp, "generation_mode": mode,
                 **instance_sft(inst, inp, outp, c.format), PROVENANCE: prov}
                for k, (inp, outp) in enumerate(kept)]
