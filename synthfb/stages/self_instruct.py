"""Self-Instruct (Wang et al., 2022) and the Alpaca variant as pipeline stages.

* ``self_instruct_bootstrap`` (iterative): seed pool -> new instructions,
  8 demos per prompt (<= 2 machine-made), filters, ROUGE-L novelty, until
  ``num_instructions`` are accepted.
* ``self_instruct_classify``: is each instruction a classification task?
* ``self_instruct_instances``: output-first (classification) or input-first
  instance generation with the reference post-filters; one row per instance.
* ``alpaca_bootstrap`` (iterative): Alpaca's single call, 3 seed demos with
  input/output, up to 20 tasks with their instance per response.

The instance rows of ``self_instruct_instances`` and ``alpaca_bootstrap`` are
SFT rows (:func:`instance_sft`): ``prompt`` is the instruction, then the input
(if any) after a blank line, ``completion`` the output; ``instruction``,
``input`` and ``output`` stay as columns.

Prompts are files in ``prompts/``; every step hands all its prompts to the
generator in one call. The filters (reason codes, counted as
``dropped_<reason>``) are in :mod:`.self_instruct_filters`. See
specs/methods.md section 1.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Literal

from ..data import PROVENANCE, ROW_ID
from ..data.trl import SFT_COLUMNS, sft_row
from ..engine.stage import IterativeStage, ModelConfig, StageContext
from ..llm.prompts import text_request
from ..llm.types import GenerationRequest
from .self_instruct_filters import (
    ALPACA_EXTRA_BLACKLIST,
    SELF_INSTRUCT_BLACKLIST,
    NoveltyPool,
    clean_instruction,
    demo_instruction,
    instruction_drop_reason,
    parse_alpaca_blocks,
    parse_instruction_list,
)

# Reference decoding (GPT-3 davinci, section 1.2); user ``sampling`` overrides.
BOOTSTRAP_SAMPLING = dict(temperature=0.7, top_p=0.5, max_tokens=1024, presence_penalty=2.0,
                          frequency_penalty=0.0, stop=["\n\n", "\n16", "16.", "16 ."])
ALPACA_SAMPLING = dict(temperature=1.0, top_p=1.0, max_tokens=3072, stop=["\n20", "20.", "20."])
CLASSIFY_SAMPLING = dict(temperature=0.0, max_tokens=3, stop=["\n", "Task"])
INSTANCE_SAMPLING = dict(temperature=0.0, presence_penalty=1.5, stop=["Example 6", "Task:"])


# Stanford Alpaca's training prompts (train.py PROMPT_DICT), ending in a line break before the output.
ALPACA_PROMPT = {
    True: ("Below is an instruction that describes a task, paired with an input that provides further context. "
           "Write a response that appropriately completes the request.\n\n"
           "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"),
    False: ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"),
}


def instance_sft(instruction: str, inp: str | None, output: str, fmt: str = "conversational",
                 method: Literal["self_instruct", "alpaca"] = "self_instruct") -> dict[str, Any]:
    """The SFT columns of one task instance.

    conversational: the user turn is the instruction, then the input (if
    any) after a blank line (Self-Instruct's fixed encoding, and the usual
    chat form of Alpaca data); the completion is the output. standard: the
    paper's plain-text prompt: Self-Instruct's ``"{instruction}\\n\\n{input}\\n\\n"``
    (prepare_for_finetuning.py, fixed template) or Alpaca's
    ``### Instruction: / ### Input: / ### Response:`` prompt."""
    inst, inp = instruction.strip(), (inp or "").strip()
    if fmt == "standard" and method == "alpaca":
        user = ALPACA_PROMPT[bool(inp)].format(instruction=inst, input=inp)
    elif fmt == "standard":
        user = f"{inst}\n\n{inp}\n\n" if inp else f"{inst}\n\n"
    else:
        user = f"{inst}\n\n{inp}" if inp else inst
    return sft_row(user, output, None, fmt)  # type: ignore[arg-type]


def _seed_text(row: dict[str, Any], column: str) -> str:
    v = row.get(column)
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"seed row {row.get(ROW_ID)!r}: column {column!r} is missing or empty")
    return v


@dataclass
class BootstrapConfig(ModelConfig):
    num_instructions: int = field(default=100, metadata={"help": "stop once this many machine instructions are accepted"})
    prompts_per_step: int = field(default=64, metadata={"help": "prompts sent to the model per step (one engine call)"})
    num_demos: int = field(default=8, metadata={"help": "in-context instructions per prompt"})
    max_machine_demos: int = field(default=2, metadata={"help": "at most this many demos come from machine output"})
    classification_only: bool = field(default=False, metadata={"help": "ask for classification tasks; demos from seeds with is_classification"})
    instruction_column: str = field(default="instruction", metadata={"help": "seed column holding the instruction"})
    prompt: str = field(default="self_instruct_generate.jinja", metadata={"help": "prompt template (variables: demos, chat, classification_only)"})
    chat: bool = field(default=False, metadata={"help": "send the prompt as a chat message (false: raw completion ending in '9.')"})
    system: str | None = field(default=None, metadata={"help": "system message (chat mode; in completion mode a paragraph before the prompt)"})
    discard_truncated: bool = field(default=True, metadata={"help": "drop a whole response that hit max_tokens (reference)"})
    faithful_capitalize: bool = field(default=True, metadata={"help": "str.capitalize() like the reference (lower-cases the rest)"})
    extra_blacklist: list[str] = field(default_factory=list, metadata={"help": "words added to the keyword blacklist"})
    rouge_threshold: float = field(default=0.7, metadata={"help": "reject when ROUGE-L F1 with seeds or accepted > this"})
    max_steps: int = field(default=200, metadata={"help": "give up (counted) after this many steps short of the target"})


class SelfInstructBootstrapStage(IterativeStage):
    """Self-Instruct's instruction bootstrap loop (iterative stage).

    Input rows are the seed pool. Each step samples demos (``ctx.rng(step)``),
    sends ``prompts_per_step`` prompts in one call, parses the numbered lists,
    applies the filters in reference order and then the ROUGE-L novelty
    filter against seeds + everything accepted so far. Each output row
    records the ids of the demos that produced it.
    """

    kind = "self_instruct_bootstrap"
    Config = BootstrapConfig
    sampling_defaults = BOOTSTRAP_SAMPLING
    base_blacklist = SELF_INSTRUCT_BLACKLIST

    def __init__(self, config, base_dir):
        super().__init__(config, base_dir)
        c = self.config
        if c.num_demos < 1 or not 0 <= getattr(c, "max_machine_demos", 0) <= c.num_demos:
            raise ValueError("need num_demos >= 1 and 0 <= max_machine_demos <= num_demos")
        if c.num_instructions < 1 or c.prompts_per_step < 1:
            raise ValueError("num_instructions and prompts_per_step must be >= 1")
        self.params = self.sampling()
        self.template = self.load_template("prompt")
        self.blacklist = tuple(self.base_blacklist) + tuple(c.extra_blacklist)
        self._pool: NoveltyPool | None = None  # kept between steps while it matches what is on disk

    def required_columns(self) -> set[str]:
        return {self.config.instruction_column}

    def output_columns(self, input_columns: list[str]) -> list[str]:
        return [ROW_ID, "instruction", "source", "step", "demo_ids", "rouge_l_max", "most_similar", PROVENANCE]

    # -- pieces shared with (or replaced by) the Alpaca variant ---------------
    def _seed_pool(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for r in rows:
            _seed_text(r, self.config.instruction_column)
        if getattr(self.config, "classification_only", False):
            rows = [r for r in rows if r.get("is_classification")]
            if not rows:
                raise ValueError("classification_only: no seed row has is_classification = true")
        return rows

    def _demos(self, seeds, produced, rng: random.Random) -> list[dict[str, Any]]:
        """``num_demos`` demos ({row_id, text}): up to ``max_machine_demos``
        machine ones, the rest seeds, shuffled."""
        c = self.config
        machine = rng.sample(produced, min(c.max_machine_demos, len(produced)))
        human = rng.sample(seeds, min(c.num_demos - len(machine), len(seeds)))
        demos = [{ROW_ID: m[ROW_ID], "text": m["instruction"]} for m in machine]
        demos += [{ROW_ID: h[ROW_ID], "text": h[c.instruction_column]} for h in human]
        rng.shuffle(demos)
        return demos

    def _prompt(self, demos) -> str:
        return self.template.render(
            {"demos": [demo_instruction(d["text"]) for d in demos], "chat": self.config.chat,
             "classification_only": self.config.classification_only}, "bootstrap prompt")

    def _candidates(self, completion, ctx: StageContext) -> list[dict[str, str]]:
        """One response's candidate rows (only 'instruction' here); a
        truncated one is discarded whole (counted as ``truncated_outputs``)."""
        if completion.finish_reason == "length" and self.config.discard_truncated:
            return []
        raw = parse_instruction_list(completion.text, first_unnumbered=not self.config.chat)
        return [{"instruction": clean_instruction(t, self.config.faithful_capitalize)} for t in raw]

    # -- the loop ----------------------------------------------------------------
    def _novelty_pool(self, seeds: list[dict], produced: list[dict]) -> NoveltyPool:
        """Seeds + accepted instructions; rebuilt when it does not hold
        exactly those (e.g. after a resume)."""
        texts = [r[self.config.instruction_column] for r in seeds] + [p["instruction"] for p in produced]
        if self._pool is None or self._pool.texts != texts:
            self._pool = NoveltyPool(texts)
        return self._pool

    def step(self, rows, produced, step, ctx: StageContext):
        c = self.config
        if len(produced) >= c.num_instructions or step > c.max_steps:
            return None
        if step == c.max_steps:
            ctx.stats.add("stopped_at_max_steps_short_of_target", c.num_instructions - len(produced))
            return []
        seeds = self._seed_pool(rows)
        pool = self._novelty_pool(seeds, produced)
        rng = ctx.rng(step)
        demo_sets = [self._demos(seeds, produced, rng) for _ in range(c.prompts_per_step)]
        results = self._generate([self._prompt(d) for d in demo_sets], step, ctx)
        ctx.stats.add("prompts", len(demo_sets))
        gen, new, need = ctx.generator(), [], c.num_instructions - len(produced)
        for demos, res in zip(demo_sets, results):
            for comp in [] if res.error else res.completions:  # failures: counted and recorded by ctx.call
                cands = self._candidates(comp, ctx)
                ctx.stats.add("candidates", len(cands))
                if not cands:
                    ctx.stats.add("responses_without_candidates")
                prov = ctx.provenance(gen, self.params, None, comp.finish_reason)
                for cand in cands:
                    inst = cand["instruction"]
                    # the filters in reference order, then the target, then ROUGE-L novelty
                    reason = (instruction_drop_reason(inst, self.blacklist)
                              or (None if len(new) < need else "over_target")
                              or pool.drop_reason(inst, c.rouge_threshold))
                    if reason:
                        ctx.stats.add(f"dropped_{reason}")
                        continue
                    score, similar = pool.add(inst)
                    ctx.stats.add("accepted")
                    new.append({ROW_ID: f"si-{step:05d}-{len(new):05d}", **cand, "source": "machine", "step": step,
                                "demo_ids": [d[ROW_ID] for d in demos], "rouge_l_max": score,
                                "most_similar": similar, **self._sft(cand), PROVENANCE: [prov]})
        return new

    def _generate(self, prompts: list[str], step: int, ctx: StageContext) -> list[Any]:
        """One result per prompt, all in one engine call."""
        c = self.config
        return ctx.call([text_request(p, self.params, c.chat, c.system) for p in prompts],
                        owners=[f"step{step}/prompt{k}" for k in range(len(prompts))])

    def _sft(self, cand: dict[str, str]) -> dict[str, Any]:
        """The SFT columns of an accepted candidate (none: a bare instruction is no SFT row)."""
        return {}


@dataclass
class AlpacaConfig(ModelConfig):
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
    faithful_capitalize: bool = field(default=False, metadata={"help": "Alpaca does not capitalize; true applies str.capitalize()"})
    format: Literal["conversational", "standard"] = field(default="conversational", metadata={
        "help": "TRL format of the SFT columns prompt/completion: conversational (user turn: instruction, blank "
                "line, input) or standard (Alpaca's '### Instruction:' prompt as a string)"})
    fill: Literal["response", "fields"] = field(default="response", metadata={
        "help": "response (Alpaca): one call per prompt writes up to tasks_per_response task blocks, parsed "
                "afterwards; fields: one new task per prompt, written in three calls that each continue the "
                "document after a prefilled header ('N. Instruction:' to the end of the line, 'N. Input:' up to "
                "'N. Output:', 'N. Output:' up to the next '###'), so every block has the three fields in order "
                "(for small models that break the block format; chat must be false)"})
    extra_blacklist: list[str] = field(default_factory=list, metadata={"help": "words added to the keyword blacklist"})
    rouge_threshold: float = field(default=0.7, metadata={"help": "reject when ROUGE-L F1 > this"})
    max_steps: int = field(default=200, metadata={"help": "give up (counted) after this many steps"})


class AlpacaBootstrapStage(SelfInstructBootstrapStage):
    """Alpaca's simplification: demos only from seeds (with input/output),
    one call yields instruction, input and output; no classification step."""

    kind = "alpaca_bootstrap"
    Config = AlpacaConfig
    sampling_defaults = ALPACA_SAMPLING
    base_blacklist = SELF_INSTRUCT_BLACKLIST + ALPACA_EXTRA_BLACKLIST

    def required_columns(self) -> set[str]:
        c = self.config
        cols = {c.instruction_column, c.input_column, c.output_column} - {None}
        return cols if c.input_column and c.output_column else cols | {"instances"}

    def output_columns(self, input_columns: list[str]) -> list[str]:
        cols = super().output_columns(input_columns)
        return cols[:2] + ["input", "output"] + cols[2:-1] + list(SFT_COLUMNS) + [PROVENANCE]

    def _sft(self, cand: dict[str, str]) -> dict[str, Any]:
        return instance_sft(cand["instruction"], cand.get("input"), cand["output"], self.config.format, "alpaca")

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

    def _demos(self, seeds, produced, rng):
        """Seeds only (Alpaca never shows machine output)."""
        return rng.sample(seeds, min(self.config.num_demos, len(seeds)))

    def _prompt(self, demos) -> str:
        c = self.config
        items = []
        for d in demos:
            inp, outp = self._seed_io(d)
            items.append({"instruction": demo_instruction(d[c.instruction_column]), "input": inp or "<noinput>",
                          "output": outp})
        return self.template.render({"demos": items, "chat": c.chat, "num_tasks": c.tasks_per_response},
                                    "alpaca prompt")

    def __init__(self, config, base_dir):
        super().__init__(config, base_dir)
        if self.config.fill not in ("response", "fields"):
            raise ValueError(f"fill: expected 'response' or 'fields', got {self.config.fill!r}")
        if self.config.fill == "fields" and self.config.chat:
            raise ValueError("fill: fields continues a raw document; it needs chat: false")

    def _generate(self, prompts: list[str], step: int, ctx: StageContext) -> list[Any]:
        if self.config.fill == "response":
            return super()._generate(prompts, step, ctx)
        return self._fill_fields(prompts, step, ctx)

    def _fill_fields(self, prompts: list[str], step: int, ctx: StageContext) -> list[Any]:
        """``fill: fields``: per prompt (which ends with ``"N. Instruction:"``)
        the instruction (to the end of its line), then the input after
        ``"\nN. Input:\n"`` (up to ``N. Output:``), then the output after
        ``"\nN. Output:\n"`` (up to the next ``###``, block or repeated field header), each call
        continuing the document so far; the three fields become one block
        text, parsed like a response. A failed call fails the prompt."""
        import dataclasses

        from ..llm.types import Completion, GenerationResult

        n = self.config.num_demos + 1
        p = self.params
        owners = [f"step{step}/prompt{k}" for k in range(len(prompts))]
        short = min(p.max_tokens, 128)
        fields = [("instruction", "", dataclasses.replace(p, n=1, max_tokens=short, stop=("\n",))),
                  ("input", f"\n{n}. Input:\n", dataclasses.replace(
                      p, n=1, max_tokens=short, stop=(f"\n{n}. Output", f"{n}. Output", "\n###", "###"))),
                  ("output", f"\n{n}. Output:\n", dataclasses.replace(
                      # a field header the model writes again ends the output, as the line end ends the
                      # instruction: the block keeps its three fields
                      p, n=1, stop=("\n###", "###", f"\n{n}. Instruction", f"\n{n + 1}. Instruction",
                                    f"\n{n}. Input:", f"\n{n}. Output:")))]
        system = self.config.system
        docs = [f"{system}\n\n{x}" if system else x for x in prompts]  # as text_request sends it
        texts, finish, errors = [""] * len(prompts), ["stop"] * len(prompts), [None] * len(prompts)
        for name, header, params in fields:
            live = [i for i in range(len(prompts)) if errors[i] is None]
            res = ctx.call([GenerationRequest(prompt=docs[i] + header, params=params) for i in live],
                           owners=[owners[i] for i in live], call=f"{name}s")
            for i, r in zip(live, res):
                if r.error:
                    errors[i] = r.error
                    continue
                comp = r.completions[0]
                body = comp.text.rstrip() if name != "instruction" else comp.text.split("\n")[0].rstrip()
                docs[i] += header + body
                texts[i] += header + body
                if comp.finish_reason == "length":
                    finish[i] = "length"
        return [GenerationResult(completions=[], error=errors[i]) if errors[i] else
                GenerationResult(completions=[Completion(text=texts[i], finish_reason=finish[i], num_tokens=0)])
                for i in range(len(prompts))]

    def _candidates(self, completion, ctx):
        items, bad = parse_alpaca_blocks(completion.text, self.config.num_demos + 1,
                                         truncated=completion.finish_reason == "length")
        ctx.stats.add("dropped_malformed_block", bad)
        ctx.stats.add("outputs", len(items) + bad)
        ctx.stats.add("parsed", len(items))
        for it in items:
            it["instruction"] = clean_instruction(it["instruction"], self.config.faithful_capitalize)
        return items


from .self_instruct_tasks import (ClassifyConfig, InstancesConfig, SelfInstructClassifyStage,  # noqa: E402,F401
                                 SelfInstructInstancesStage)
