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
from ..engine.stage import Stage, StageContext
from ..llm.types import GenerationRequest
from .templates import PromptTemplate, load_template


@dataclass
class GenerateConfig:
    prompt: str | None = field(default=None, metadata={"help": "prompt template file (Jinja; row columns are its variables)"})
    input_column: str = field(default="instruction", metadata={"help": "column used as the prompt when no template is given"})
    output_column: str = field(default="response", metadata={"help": "column that receives the generated text"})
    system: str | None = field(default=None, metadata={"help": "system message (chat models)"})
    chat: bool = field(default=True, metadata={"help": "apply the model's chat template (false: raw completion)"})
    n: int = field(default=1, metadata={"help": "samples per prompt"})
    explode: bool = field(default=True, metadata={"help": "n>1: one row per sample (row_id/k); false: a list column"})
    sampling: dict = field(default_factory=dict, metadata={"help": "temperature, top_p, max_tokens, stop, ..."})
    json_schema: dict | None = field(default=None, metadata={"help": "constrain output to this JSON schema"})
    keep_truncated: bool = field(default=True, metadata={"help": "keep outputs that hit max_tokens (counted either way)"})
    model: str | None = field(default=None, metadata={"help": "model for this stage (default: the pipeline's)"})


class GenerateStage(Stage):
    """Samples ``n`` responses per row from the stage's model in one engine
    call per chunk; counts truncated, schema-invalid and failed outputs."""

    kind = "generate"
    Config = GenerateConfig
    template_fields = ("prompt",)
    uses_model = True

    def __init__(self, config: GenerateConfig, base_dir):
        super().__init__(config, base_dir)
        self.params = self.sampling_params("sampling", n="n")
        if config.json_schema is not None:  # a bad schema would only fail once the engine uses it
            try:
                jsonschema.validators.validator_for(config.json_schema).check_schema(config.json_schema)
            except jsonschema.SchemaError as e:
                where = "/".join(str(p) for p in e.absolute_path) or "(top)"
                raise ValueError(f"json_schema: not a valid JSON schema at {where}: {e.message}") from None
        if config.prompt is not None:
            self.template = load_template(self, "prompt")
        else:
            self.template = PromptTemplate("{{ " + config.input_column + " }}", f"column {config.input_column!r}")

    def required_columns(self) -> set[str]:
        return set(self.template.variables)

    def output_columns(self, input_columns: list[str]) -> list[str]:
        cols = [c for c in input_columns if c != PROVENANCE]
        return cols + [self.config.output_column, PROVENANCE]

    def fingerprint(self) -> dict[str, Any]:
        fp = super().fingerprint()
        fp["template_sha256"] = self.template.sha256
        fp["config"].pop("prompt", None)
        return fp

    def _request(self, row: dict[str, Any]) -> GenerationRequest:
        text = self.template.render(row, row.get(ROW_ID))
        if not self.config.chat:
            return GenerationRequest(prompt=text, params=self.params, json_schema=self.config.json_schema)
        messages = [{"role": "system", "content": self.config.system}] if self.config.system else []
        messages.append({"role": "user", "content": text})
        return GenerationRequest(messages=messages, params=self.params, json_schema=self.config.json_schema)

    def process(self, rows: list[dict[str, Any]], ctx: StageContext) -> list[dict[str, Any]]:
        gen = ctx.generator(self.config.model)
        requests = [self._request(r) for r in rows]
        results = gen.generate(requests, desc=ctx.stage_name)
        out_col = self.config.output_column
        out: list[dict[str, Any]] = []
        for row, res in zip(rows, results):
            if res.error:
                ctx.stats.add("failed_requests")
                ctx.record_failure(row[ROW_ID], res.error)
                continue
            history = list(row.get(PROVENANCE) or [])
            kept = []
            for c in res.completions:
                if c.finish_reason == "length":
                    ctx.stats.add("truncated_outputs")
                    if not self.config.keep_truncated:
                        continue
                if self.config.json_schema is not None and c.error:
                    ctx.stats.add("schema_invalid_outputs")
                    continue
                kept.append(c)
            ctx.stats.add("outputs_dropped", len(res.completions) - len(kept))
            base = {k: v for k, v in row.items() if k != PROVENANCE}
            if self.config.explode or self.config.n == 1:
                for k, c in enumerate(res.completions):
                    if c not in kept:
                        continue
                    rid = row[ROW_ID] if self.config.n == 1 else f"{row[ROW_ID]}/{k}"
                    value = json.dumps(c.parsed) if c.parsed is not None else c.text
                    prov = ctx.provenance(gen, self.params, self.template.sha256, c.finish_reason)
                    out.append({**base, ROW_ID: rid, out_col: value, PROVENANCE: history + [prov]})
            elif kept:
                prov = ctx.provenance(gen, self.params, self.template.sha256, ",".join(c.finish_reason for c in kept))
                out.append({**base, out_col: [c.text for c in kept], PROVENANCE: history + [prov]})
        return out
