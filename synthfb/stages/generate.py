"""Generate stage: render a prompt per row, sample ``n`` responses.

The building block of the other methods and of the quickstart: prompt
template (a file in ``prompts/`` or an input column) -> chat request ->
responses, with provenance per output row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import jsonschema

from ..data import PROVENANCE, ROW_ID
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

    def required_columns(self) -> set[str]:
        return set(self.prompt.variables)

    def output_columns(self, input_columns: list[str]) -> list[str]:
        return [c for c in input_columns if c != PROVENANCE] + [self.config.output_column, PROVENANCE]

    def requests(self, row: dict[str, Any], ctx: StageContext) -> GenerationRequest:
        req = self.chat(self.prompt.render(row, row.get(ROW_ID)), self.params, self.config.system, self.config.chat)
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
        return [{ROW_ID: row[ROW_ID] if cfg.n == 1 else f"{row[ROW_ID]}/{k}",
                 cfg.output_column: json.dumps(c.parsed) if c.parsed is not None else c.text,
                 PROVENANCE: {"finish_reason": c.finish_reason}} for k, c in kept]


__all__ = ["Drop", "GenerateConfig", "GenerateStage"]
