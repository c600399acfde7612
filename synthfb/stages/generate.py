"""Generate stage: render a prompt per row, sample ``n`` responses.

The building block of the other methods and of the quickstart: prompt
template (a file in ``prompts/`` or an input column) -> chat request ->
responses, with provenance per output row.

Its rows are SFT rows (:func:`synthfb.data.trl.sft_row`): besides the
response in ``output_column``, ``prompt`` holds what the model was asked
(the stage's ``system`` message, then the rendered prompt as the user turn)
and ``completion`` the response, in TRL's conversational format by default
(``format: standard``: strings). Not with ``n > 1`` and ``explode: false``
(a list of samples is no SFT row), nor with ``sft_columns: false``. A stage
after ``generate`` that reads ``prompt`` gets the message list; the
constitutional and generate stages read its last (user) turn.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

import jsonschema

from ..data import PROVENANCE, ROW_ID
from ..data.trl import SFT_COLUMNS, sft_row
from ..engine.stage import Drop, ModelConfig, ModelStage, StageContext
from ..llm.prompts import PromptTemplate
from ..llm.types import GenerationRequest, GenerationResult


@dataclass
class GenerateConfig(ModelConfig):
    prompt: str | None = field(default=None, metadata={"help": "prompt template file (Jinja; row columns are its variables)"})
    input_column: str = field(default="instruction", metadata={"help": "column used as the prompt when no template is given"})
    output_column: str = field(default="response", metadata={"help": "column that receives the generated text"})
    system: str | None = field(default=None, metadata={"help": "system message (chat models)"})
    chat: bool = field(default=True, metadata={"help": "apply the model's chat template (false: raw completion)"})
    n: int = field(default=1, metadata={"help": "samples per prompt"})
    explode: bool = field(default=True, metadata={"help": "n>1: one row per sample (row_id/k); false: a list column"})
    json_schema: dict | None = field(default=None, metadata={"help": "constrain output to this JSON schema"})
    keep_truncated: bool = field(default=True, metadata={"help": "keep outputs that hit max_tokens (counted either way)"})
    sft_columns: bool = field(default=True, metadata={
        "help": "also write the SFT columns `prompt` (system message + the rendered prompt as the user turn) and "
                "`completion` (the response), TRL's prompt-completion format; never for n > 1 with explode: false "
                "(a list of samples is no SFT row). false: only output_column"})
    format: Literal["conversational", "standard"] = field(default="conversational", metadata={
        "help": "TRL format of the SFT columns: conversational (message lists) or standard (strings)"})


class GenerateStage(ModelStage):
    """Samples ``n`` responses per row; counts truncated, schema-invalid and
    failed outputs."""

    kind = "generate"
    Config = GenerateConfig

    def __init__(self, config: GenerateConfig, base_dir):
        super().__init__(config, base_dir)
        self.params = self.sampling(n="n")
        if config.json_schema is not None:  # a bad schema would only fail once the engine uses it
            try:
                jsonschema.validators.validator_for(config.json_schema).check_schema(config.json_schema)
            except jsonschema.SchemaError as e:
                where = "/".join(str(p) for p in e.absolute_path) or "(top)"
                raise ValueError(f"json_schema: not a valid JSON schema at {where}: {e.message}") from None
        if config.prompt is not None:
            self.prompt = self.load_template("prompt")
        else:
            self.prompt = PromptTemplate("{{ " + config.input_column + " }}", f"column {config.input_column!r}")
        if config.format not in ("conversational", "standard"):
            raise ValueError(f"format: expected conversational or standard, got {config.format!r}")
        # SFT columns: one response per output row
        self.sft = config.sft_columns and (config.n == 1 or config.explode)
        if self.sft and config.output_column in SFT_COLUMNS:
            raise ValueError(f"output_column: {config.output_column!r} is one of the SFT columns {list(SFT_COLUMNS)} "
                             f"this stage writes; choose another name (or set sft_columns: false)")

    def required_columns(self) -> set[str]:
        return set(self.prompt.variables)

    def output_columns(self, input_columns: list[str]) -> list[str]:
        new = [self.config.output_column] + (list(SFT_COLUMNS) if self.sft else [])
        return [c for c in input_columns if c not in (PROVENANCE, *new)] + new + [PROVENANCE]

    def _asked(self, row: dict[str, Any]) -> tuple[str | None, str]:
        """(system message, user text) of a row: the stage's ``system`` and
        the rendered prompt. Without a template, a conversational input
        column (a message list, e.g. an earlier stage's ``prompt``) gives its
        last turn, and its system message when the stage has none."""
        system = self.config.system
        if self.config.prompt is None:
            v = row.get(self.config.input_column)
            if isinstance(v, list) and v and all(isinstance(m, dict) for m in v) \
                    and isinstance(v[-1].get("content"), str):
                if system is None and len(v) > 1 and v[0].get("role") == "system":
                    system = v[0].get("content") or None
                return system, v[-1]["content"].strip()
        return system, self.prompt.render(row, row.get(ROW_ID))

    def requests(self, row: dict[str, Any], ctx: StageContext) -> GenerationRequest:
        system, user = self._asked(row)
        req = self.chat(user, self.params, system, self.config.chat)
        return GenerationRequest(prompt=req.prompt, messages=req.messages, params=self.params,
                                 json_schema=self.config.json_schema)

    def parse(self, row: dict[str, Any], res: GenerationResult, ctx: StageContext) -> Any:
        cfg = self.config
        kept = []
        for k, c in enumerate(res.completions):
            if c.finish_reason == "length" and not cfg.keep_truncated:
                continue
            if cfg.json_schema is not None and c.error:
                ctx.stats.add("schema_invalid_outputs")
                continue
            kept.append((k, c))
        ctx.stats.add("outputs_dropped", len(res.completions) - len(kept))
        if not kept:
            return []
        if not cfg.explode and cfg.n > 1:
            return {cfg.output_column: [c.text for _, c in kept],
                    PROVENANCE: {"finish_reason": ",".join(c.finish_reason for _, c in kept)}}
        system, user = self._asked(row) if self.sft else (None, "")
        out = []
        for k, c in kept:
            text = json.dumps(c.parsed) if c.parsed is not None else c.text
            new = {ROW_ID: row[ROW_ID] if cfg.n == 1 else f"{row[ROW_ID]}/{k}", cfg.output_column: text,
                   PROVENANCE: {"finish_reason": c.finish_reason}}
            if self.sft:
                new.update(sft_row(user, text, system, cfg.format))
            out.append(new)
        return out


__all__ = ["Drop", "GenerateConfig", "GenerateStage"]
