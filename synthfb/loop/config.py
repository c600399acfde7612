"""Loop files: the YAML of ``synthfb loop``, checked before any work.

A loop file is described by config dataclasses (:class:`LoopFile`,
:class:`PairsSection`, :class:`EvalSection`; each field's ``help`` is its
documentation) and checked with the same schema builder, validator and
one-line error format as pipelines and trainer configs
(:mod:`synthfb.data.config`). Each pairs stage is checked against the schema
of its own config dataclass (the same one ``synthfb run`` uses), and each
trainer section against its trainer's config class: the loop's ``method:``
names an entry of the method registry (:mod:`synthfb.train.methods`, shared
with ``synthfb train``), whose steps read their settings from the sections
``train:`` (DPO, ``method: dpo``, the default) or ``rm:`` and ``ppo:``
(``method: rm_ppo``). Errors name the file and the field path
(``loop.yaml: pairs.stages[0].n: expected integer, got str 'many'``).

A loop file::

    name: rlaif_tiny
    backend: vllm
    policy: runs/tiny-model          # round-0 policy (alias `default`, local folder, hub id)
    judge: null                      # default: the round-0 policy, fixed; `policy`: the current policy
    backend_options: {dtype: float32}
    seed: 0
    rounds: 2
    prompts: data/feedback_prompts.jsonl    # or an inline list of strings
    pairs:                           # feedback stages run on the prompts (the loop adds the `load`)
      stages:
        - {stage: onpolicy_pairs, n: 4, sampling: {max_tokens: 16}}
    train: {max_steps: 2, beta: 0.1} # DPOConfig fields (model, dataset, output_dir are the loop's)
    # method: spin | self_rewarding | rft (issue #14): see pipelines/*_tiny.yaml and README
    # or, instead of `train:`, a reward model on the pairs and PPO against it:
    # method: rm_ppo
    # rm: {max_steps: 4}             # RMConfig fields; `model` = RM initial weights (default: round-0 policy)
    # ppo: {max_steps: 2}            # PPOConfig fields; rollouts on the loop's backend unless set
    # rm_pairs: round                # `all_rounds`: each round's RM trains on the pairs of rounds 0..k
    eval:                            # fixed held-out prompts, new policy vs round-0 policy
      prompts: ["...", "..."]
      judge_prompt: heldout_judge.jinja  # the default; the held-out judge may not be the training ranker
    # optional warm-up before round 0 (its checkpoint is the round-0 policy and round 0's DPO reference):
    # sft:
    #   pipeline: {stages: [...]}      # or a pipeline file; must end in SFT rows (prompt/completion or messages)
    #   model: null                    # the model that writes the data (default: `policy`)
    #   train: {max_steps: 8}          # SFTConfig fields (model, dataset, output_dir are the loop's)
    # method humpback (instruction backtranslation, pipelines/humpback_loop_tiny.yaml): `sft:` trains M_0 on the
    # seed, `backward:` (the same shape) trains the backward model M_yx that the `backtranslate` stage uses
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..data import ROW_ID, yamlio
from ..data.config import ConfigError, build, dataclass_schema, option, validate
from ..engine.pipeline import NAME_SCHEMA, PIPELINE_SCHEMA, stage_error
from ..train import methods as registry

# The loop trains new checkpoints, so the backend must load local folders.
LOOP_BACKENDS = ("vllm", "vllm-cpu", "transformers")
# How a round turns its pairs into a new policy: the registry's loop methods.
METHODS = tuple(registry.loop_methods())
DEFAULT_METHOD = "dpo"
# Stage fields that pick models: the loop sets them (policy generates, judge judges).
RESERVED_STAGE = ("model", "ranker_model")
# The stage that writes the candidates' instructions with the backward model M_yx (method humpback): the
# loop's `backward:` section trains M_yx and sets the stage's `model:`; without that section the stage names a
# given M_yx with its own `model:`.
BACKWARD_STAGE = "backtranslate"
# Stages that write new prompts few-shot from the loop's `prompts` (the seeds) and may name a fixed
# `model:` the loop keeps (Self-Rewarding's prompt generator): stage kind -> the column of the prompts.
PROMPT_WRITERS = {"self_instruct_bootstrap": "instruction"}
SELF_JUDGE = "policy"
# The held-out judge's default template: another prompt than the training rankers' default
# (pairwise_judge.jinja), so the held-out win rate is not the training signal read back.
HELDOUT_JUDGE_PROMPT = "heldout_judge.jinja"
# The warm-up trainers (`sft:`) and the default one.
WARMUP_METHODS = tuple(registry.warmup_methods())
DEFAULT_WARMUP = "sft"
# The phases before round 0 with their own data pipeline and SFT: the warm-up (`sft:`, the round-0 policy) and
# method humpback's backward model (`backward:`, M_yx); the loop-file section, folder and loop.json key are one name.
WARMUP_PHASE, BACKWARD_PHASE = "sft", "backward"
# Pipeline settings the loop sets when it runs the warm-up's data pipeline (one engine pool).
SFT_PIPELINE_SETS = ("backend", "model", "backend_options", "models", "seed")
# Bootstrap of the held-out win rate: percentile interval over held-out prompts.
CI_LEVEL = 0.95

_PROMPTS = {
    "anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
    ],
}
_NON_EMPTY = {"minLength": 1}


class LoopError(ConfigError):
    """A loop file or loop folder is invalid; the message names file and field."""


def stable_hash(obj: Any) -> str:
    """A short content hash of a JSON-able object (fingerprints)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:24]


# --- the loop file's schema --------------------------------------------------------------------

@dataclass
class PairsSection:
    """``pairs:``: how each round turns the training prompts into preference pairs."""

    stages: list[dict] = option(
        help="feedback stages run on the prompts with the round's policy (the loop adds the `load`); the last "
             "must emit prompt/chosen/rejected (e.g. `onpolicy_pairs` or `judge_pairs`); a first "
             "`self_instruct_bootstrap` with its own `model:` has that fixed model write each round's prompts "
             "few-shot from the `prompts` (the seeds; Self-Rewarding), recorded in round-NN/prompts.jsonl",
        schema={"minItems": 1, "items": {"type": "object", "required": ["stage"],
                                         "properties": {"stage": {"type": "string"}}}})
    chunk_size: int = option(2048, "rows per checkpointed chunk of the pairs run", ge=1)


@dataclass
class EvalSection:
    """``eval:``: the held-out comparison of each round's policy with the round-0 policy."""

    prompts: str | list[str] = option(help="held-out prompts: a data file or an inline list of strings",
                                      schema=_PROMPTS)
    prompt_column: str = option("prompt", "column of the held-out prompts file", schema=_NON_EMPTY)
    limit: int | None = option(None, "use only the first N held-out prompts", ge=1)
    sampling: dict = option({}, "decoding of the compared responses (default greedy: temperature 0, "
                                "max_tokens 128)")
    judge: str | None = option(None, "held-out judge model, frozen across rounds (default: the loop's fixed "
                                     "`judge`, or the loop's `policy` as written, never a trained checkpoint)",
                               schema=_NON_EMPTY)
    judge_prompt: str = option(HELDOUT_JUDGE_PROMPT, "A/B judge template (uses prompt, response_a, response_b); "
                                                     "with the same model as a training ranker it must be another "
                                                     "template than that ranker's", schema=_NON_EMPTY)
    judge_chat: bool = option(False, "render the judge prompt as a chat turn")
    options: list[str] = option([" (A)", " (B)"], "the judge's two answer strings (first = response_a)",
                                schema={"minItems": 2, "maxItems": 2})
    bootstrap_resamples: int = option(2000, "resamples of the percentile bootstrap of the win rate's 95% "
                                            "interval (over held-out prompts)", ge=100)
    bootstrap_seed: int = option(0, "seed of that bootstrap (fixed: the interval is reproducible)")


@dataclass
class SFTSection:
    """``sft:``: an optional warm-up before round 0: a data pipeline runs
    once, a warm-up trainer (SFT) trains the loop's ``policy`` on its rows,
    and that checkpoint becomes the round-0 policy."""

    pipeline: str | dict = option(
        help="the data pipeline that writes the SFT rows: a pipeline file (relative to the loop file, or a shipped "
             "name) or an inline pipeline mapping (`stages`, optional `name`, `chunk_size`, ...); the loop sets its "
             + ", ".join(SFT_PIPELINE_SETS) + " (a file's own are replaced); its last stage must emit SFT rows",
        schema={"anyOf": [{"type": "string", "minLength": 1},
                          {"type": "object", "required": ["stages"], "properties": {"stages": {"type": "array"}}}]})
    model: str | None = option(None, "the pipeline's model, which writes the data (default: the loop's `policy`)",
                               schema=_NON_EMPTY)
    method: str = option(DEFAULT_WARMUP, "the warm-up trainer (training-method registry): "
                         + "; ".join(f"{k}: {m.help}" for k, m in registry.warmup_methods().items()),
                         schema={"enum": list(WARMUP_METHODS)})
    train: dict = option({}, "the trainer's config fields (SFTConfig); the loop sets model (the loop's `policy`), "
                             "dataset (the pipeline's rows), output_dir (OUT/sft/checkpoint) and resume")


@dataclass
class LoopFile:
    """The top level of a loop file. The trainer sections (``train:``,
    ``rm:``, ``ppo:``) come from the method registry; see :func:`loop_schema`."""

    name: str = option(help=NAME_SCHEMA["description"], schema={"pattern": NAME_SCHEMA["pattern"]})
    policy: str = option(help="initial policy: alias, local folder or hub id; the round-0 policy, or with `sft:` "
                              "the model SFT starts from", schema=_NON_EMPTY)
    prompts: str | list[str] = option(help="training prompts: a data file or an inline list of strings (with a "
                                           "prompt-writing pairs stage: the seeds it writes new prompts from)",
                                      schema=_PROMPTS)
    pairs: PairsSection = option(help="feedback stages that turn each round's samples into preference pairs")
    eval: EvalSection = option(help="held-out prompts: each round's policy against the round-0 policy")
    description: str = option("", "what is built and why (goes into each round's data card)")
    license: str | None = option(None, "license of the pairs datasets")
    backend: Literal[LOOP_BACKENDS] = option("vllm", "inference backend (must load local checkpoints)")
    judge: str | None = option(None, "judge model of the pairs (default: the `policy` model as written, fixed); "
                                     "`policy`: each round's policy judges itself")
    backend_options: dict = option({}, "passed to every engine")
    models: dict[str, dict] = option({}, "per-model backend options, keyed by model name (e.g. the judge)")
    seed: int = option(0, "engine seed (sampling) and training seed default")
    rounds: int = option(2, "generate -> judge -> train rounds", ge=1)
    prompt_column: str = option("prompt", "column of the prompts file", schema=_NON_EMPTY)
    limit: int | None = option(None, "use only the first N prompts", ge=1)
    keep_checkpoints: bool = option(False, "keep the resumable checkpoint-N folders of finished rounds "
                                           "(default: removed)")
    method: str = option(DEFAULT_METHOD, "how a round turns its pairs into a new policy: "
                         + "; ".join(f"{k}: {m.help}" for k, m in registry.loop_methods().items()),
                         schema={"enum": list(METHODS)})
    rm_pairs: Literal["round", "all_rounds"] = option(
        "round", "a method with a reward model: train each round's reward model on its own pairs (round) or on "
                 "the pairs of rounds 0..k (all_rounds)")
    sft: SFTSection | None = option(None, "warm-up before round 0: run a data pipeline once (e.g. seeds -> "
                                          "Self-Instruct), SFT the `policy` on its rows; that checkpoint is the "
                                          "round-0 policy (and round 0's DPO reference)")
    backward: SFTSection | None = option(None, "method humpback: the backward model M_yx, trained once before round "
                                               "0 like `sft:` (a data pipeline, e.g. humpback_backward.yaml's "
                                               "reversed seed pairs, then SFT of the `policy` into "
                                               "OUT/backward/checkpoint); the `backtranslate` pairs stage writes "
                                               "the candidates' instructions with it")
    history: int | None = option(None, "earlier rounds whose round data the new policy also trains on: N (the "
                                       "last N rounds), -1 (all: Llama 2's pool of earlier rejection-sampling "
                                       "winners), 0 (none); default: the method's (spin: 1, the previous iteration; "
                                       "others 0)", ge=-1)
    carry_columns: list[str] = option([], "columns of the prompts file carried to the pairs stages besides the "
                                          "prompt (e.g. the gold response of method spin); needs a prompts file",
                                      schema={"items": {"type": "string", "minLength": 1}})


def _section_help(m: registry.Method) -> str:
    users = [k for k, lm in registry.loop_methods().items() if m.name in [s.name for s in lm.step_methods()]]
    return (f"{m.config_name} fields of the `{m.name}` step (method {', '.join(users)}); the loop sets "
            f"{', '.join(m.loop_sets)}")


@functools.cache
def loop_schema() -> dict[str, Any]:
    """JSON schema of a loop file: :class:`LoopFile` plus one mapping per
    trainer section of the registry's loop methods (checked in full against
    the trainer's config class once the method is known)."""
    schema = dataclass_schema(LoopFile)
    for section, m in registry.loop_sections().items():
        schema["properties"][section] = {"type": "object", "description": _section_help(m)}
    for name, users in _round_data_sections().items():
        schema["properties"][name] = {"type": "object", "description": f"settings of the round-data step {name!r} "
                                      f"(method {', '.join(users)}): synthfb/loop/round_data.py"}
    return schema


def _round_data_sections() -> dict[str, list[str]]:
    """Loop-file sections of the round-data builders -> the loop methods that use them."""
    out: dict[str, list[str]] = {}
    for k, m in registry.round_data_methods().items():
        out.setdefault(m.round_data, []).append(k)
    return out


def looks_like_loop(data: Any) -> bool:
    """Whether a parsed YAML document is a loop file rather than a pipeline
    file: it has no ``stages`` and at least one key only loop files have."""
    if not isinstance(data, dict) or "stages" in data:
        return False
    only_loop = set(loop_schema()["properties"]) - set(PIPELINE_SCHEMA["properties"])
    return any(k in only_loop for k in data)


# --- the validated loop --------------------------------------------------------------------------

@dataclass
class EvalConfig:
    """The held-out comparison of each round's new policy with the round-0 policy."""

    prompts: list[str]
    sampling: dict[str, Any] = field(default_factory=lambda: {"temperature": 0.0, "max_tokens": 128})
    judge: str | None = None
    judge_prompt: str = HELDOUT_JUDGE_PROMPT
    judge_chat: bool = False
    options: list[str] = field(default_factory=lambda: [" (A)", " (B)"])
    bootstrap_resamples: int = 2000
    bootstrap_seed: int = 0


@dataclass
class WarmupConfig:
    """A validated ``sft:`` section."""

    method: str
    settings: dict[str, Any]  # the trainer's fields (seed default filled in)
    pipeline: dict[str, Any]  # the pipeline mapping, without the settings the loop sets
    pipeline_source: str  # for error messages: the pipeline file, or "LOOP: sft.pipeline"
    pipeline_dir: Path  # where the pipeline's relative paths start
    model: str | None = None

    @property
    def trainer(self) -> registry.Method:
        return registry.get(self.method)


@dataclass
class LoopConfig:
    """A validated loop file."""

    name: str
    policy: str
    prompts: list[str]
    pairs_stages: list[dict[str, Any]]
    eval: EvalConfig
    # loop-file section -> settings of each step of `method` (seed default filled in)
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    judge: str | None = None
    method: str = DEFAULT_METHOD
    rm_pairs: str = "round"
    description: str = ""
    license: str | None = None
    backend: str = "vllm"
    backend_options: dict[str, Any] = field(default_factory=dict)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    seed: int = 0
    rounds: int = 2
    chunk_size: int = 2048
    keep_checkpoints: bool = False
    sft: WarmupConfig | None = None
    backward: WarmupConfig | None = None  # method humpback: the backward model M_yx's phase (`backward:`)
    # the pairs stages that judge with an LLM: index, kind, template name and sha256 (see training_rankers)
    ranker_templates: list[dict[str, Any]] = field(default_factory=list)
    # per training prompt: the prompts file's `carry_columns` values (empty dicts without carry_columns)
    prompt_extras: list[dict[str, Any]] = field(default_factory=list)
    history_rounds: int | None = None  # the file's `history` (None: the method's)

    @property
    def history(self) -> int:
        """Earlier rounds whose data the policy step also trains on (the file's, else the method's)."""
        return self.training.history if self.history_rounds is None else self.history_rounds
    source: str = "<python>"
    base_dir: Path = field(default_factory=Path.cwd)
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def training(self) -> registry.Method:
        """The registry entry of ``method``."""
        return registry.get(self.method)

    @property
    def steps(self) -> list[registry.Method]:
        """The trainers a round runs, in order (the last produces the new policy)."""
        return self.training.step_methods()

    # the settings of the built-in sections, by their loop-file names
    @property
    def train(self) -> dict[str, Any]:
        return self.sections.get("train", {})

    @property
    def rm(self) -> dict[str, Any]:
        return self.sections.get("rm", {})

    @property
    def ppo(self) -> dict[str, Any]:
        return self.sections.get("ppo", {})

    @property
    def self_judging(self) -> bool:
        return self.judge == SELF_JUDGE

    def judge_for(self, policy: str) -> str:
        """The model that judges the pairs of a round whose policy is ``policy``."""
        if self.self_judging:
            return policy
        return self.judge or self.policy

    def eval_judge(self) -> str:
        """The fixed model that judges held-out win rates (never the moving
        policy, never a checkpoint the loop trains)."""
        if self.eval.judge:
            return self.eval.judge
        return self.policy if (self.self_judging or not self.judge) else self.judge

    def training_rankers(self) -> list[dict[str, Any]]:
        """The LLM judges of the pairs stages (the training signal): stage,
        model and template, for the loop's records and card."""
        model = "the round's policy" if self.self_judging else self.judge_for(self.policy)
        return [{**r, "model": model} for r in self.ranker_templates]

    def warmup(self, phase: str = WARMUP_PHASE) -> WarmupConfig:
        """The validated section of a phase before round 0: ``sft`` (the
        warm-up) or ``backward`` (method humpback's M_yx)."""
        w = getattr(self, phase)
        assert w is not None, phase
        return w

    def data_model(self, phase: str = WARMUP_PHASE) -> str:
        """The model that writes the data of the warm-up (or of ``backward``)."""
        w = getattr(self, phase)
        return (w.model if w else None) or self.policy

    def sft_pipeline_data(self, phase: str = WARMUP_PHASE) -> dict[str, Any]:
        """The warm-up's data pipeline (or ``backward``'s) as the loop runs
        it: its own stages and settings, with the loop's backend, engine
        options and seed, and :meth:`data_model` as its model."""
        w = self.warmup(phase)
        data = json.loads(json.dumps(w.pipeline))
        data.setdefault("name", f"{self.name}-{phase}")
        what = "SFT warm-up data" if phase == WARMUP_PHASE else "backward-model (M_yx) data"
        data.setdefault("description", (self.description + "\n\n" if self.description else "")
                        + f"{what} of an RLAIF loop.")
        if self.license and "license" not in data:
            data["license"] = self.license
        data.update(backend=self.backend, model=self.data_model(phase), backend_options=self.backend_options,
                    models=self.models, seed=self.seed)
        return data

    def candidate_stages(self) -> list[dict[str, Any]]:
        """Method humpback: the pairs stages that write the fixed candidates
        (all but the last), the backward stage's ``model:`` removed (the
        candidates pipeline runs with M_yx as its model)."""
        out = []
        for sd in self.pairs_stages[:-1]:
            sd = json.loads(json.dumps(sd))
            if sd["stage"] == BACKWARD_STAGE:
                sd.pop("model", None)
            out.append(sd)
        return out

    def given_backward_model(self) -> str | None:
        """Method humpback without ``backward:``: the M_yx the backward stage names."""
        return next((sd.get("model") for sd in self.pairs_stages if sd["stage"] == BACKWARD_STAGE), None)

    def prompt_writers(self) -> list[dict[str, Any]]:
        """The pairs stages that write each round's prompts few-shot from the
        seed ``prompts``: index, kind, the column they write and their model
        (a fixed ``model:`` the loop keeps, or None: the round's policy)."""
        return [{"stage": i, "kind": sd["stage"], "column": PROMPT_WRITERS[sd["stage"]], "model": sd.get("model")}
                for i, sd in enumerate(self.pairs_stages) if sd["stage"] in PROMPT_WRITERS]

    def fixed_stage_models(self) -> list[str]:
        """Models named by pairs stages themselves (fixed for every round)."""
        return list(dict.fromkeys(w["model"] for w in self.prompt_writers() if w["model"]))

    def round_models(self, policy: str) -> list[str]:
        """Every model the pairs pipeline of a round with ``policy`` calls:
        the policy, the judge, and the stages' fixed models."""
        return list(dict.fromkeys([policy, self.judge_for(policy), *self.fixed_stage_models()]))

    def stages_for(self, policy: str) -> list[dict[str, Any]]:
        """The pairs stages of one round with the judge model filled in (a
        prompt writer's own ``model:`` is kept: it is not the policy's)."""
        judge = None if self.self_judging else self.judge_for(policy)
        out = []
        for sd in self.pairs_stages:
            sd = json.loads(json.dumps(sd))
            key = judge_field(sd)
            if judge is not None and judge != policy and key:
                sd[key] = judge
            out.append(sd)
        return out if not self.training.fixed_candidates else out[-1:]  # humpback: the rest ran once

    def policy_messages(self, prompt: str) -> list[dict[str, str]]:
        """A training prompt as the policy sees it when it samples pairs (the
        ``system`` of the ``onpolicy_pairs`` stage, then the user turn); PPO
        rollouts use the same chat turns."""
        system = next((sd.get("system") for sd in self.pairs_stages if sd["stage"] == "onpolicy_pairs"), None)
        return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]

    def fingerprint(self) -> str:
        """Everything that shapes a round besides its starting policy: prompts,
        stages, method and training settings, eval settings, engine options and seed."""
        return stable_hash({
            "prompts": self.prompts, "stages": self.pairs_stages, "method": self.method, "train": self.sections,
            "rm_pairs": self.rm_pairs, "eval": dataclasses.asdict(self.eval), "backend": self.backend,
            "backend_options": self.backend_options, "models": self.models, "seed": self.seed,
            "chunk_size": self.chunk_size, "judge": self.judge,
            **({"carried": self.prompt_extras} if any(self.prompt_extras) else {}),
            **({"history": self.history_rounds} if self.history_rounds is not None else {}),
        })


def judge_field(sd: dict[str, Any]) -> str | None:
    """The field of a pairs stage that names its judge model (the loop fills
    it in), or None for a stage that judges with no LLM (or not at all)."""
    if sd["stage"] == "onpolicy_pairs" and sd.get("ranker", "llm_judge") == "llm_judge":
        return "ranker_model"
    if sd["stage"] in ("judge_pairs", "self_curate"):  # self_curate: Humpback's curator M_t rates the candidates
        return "model"
    return None


def _read_prompts(value: Any, column: str, limit: int | None, base_dir: Path, source: str, where: str,
                  column_field: str) -> list[str]:
    """Prompt texts from an inline list or a data file (column ``column``)."""
    from ..data.io import InputError, read_user_file
    from ..llm.prompts import find_file

    if isinstance(value, list):
        texts = list(value)
    else:
        try:
            path = find_file(value, base_dir, "prompts file")
            table = read_user_file(path)
        except (FileNotFoundError, InputError) as e:
            raise LoopError(f"{source}: {where}: {e}") from None
        if column not in table.column_names:
            raise LoopError(f"{source}: {where}: {path} has no column {column!r} (columns {table.column_names}); "
                            f"set `{column_field}`")
        texts = table.column(column).to_pylist()
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise LoopError(f"{source}: {where}: {path} row {i + 1}: {column!r} must be a non-empty string")
    if limit is not None:
        texts = texts[:limit]
    if not texts:
        raise LoopError(f"{source}: {where}: no prompts")
    seen: set[str] = set()
    for t in texts:
        if t in seen:
            raise LoopError(f"{source}: {where}: duplicate prompt {t[:60]!r}")
        seen.add(t)
    return texts


def _carried(value: Any, carry: list[str], n: int, base_dir: Path, source: str) -> list[dict[str, Any]]:
    """Per training prompt (the first ``n`` rows), the values of the
    ``carry_columns`` of the prompts file (empty dicts without them)."""
    if not carry:
        return [{} for _ in range(n)]
    if isinstance(value, list):
        raise LoopError(f"{source}: carry_columns: needs a prompts file (inline prompts have no other columns)")
    from ..data.io import read_user_file
    from ..llm.prompts import find_file

    table = read_user_file(find_file(value, base_dir, "prompts file"))
    missing = [c for c in carry if c not in table.column_names]
    if missing:
        raise LoopError(f"{source}: carry_columns: the prompts file has no column(s) {missing} (columns "
                        f"{table.column_names})")
    if {"id", "prompt", ROW_ID} & set(carry):
        raise LoopError(f"{source}: carry_columns: `id` and `prompt` are written by the loop; carry other columns")
    cols = {c: table.column(c).to_pylist()[:n] for c in carry}
    return [{c: cols[c][i] for c in carry} for i in range(n)]


def _check_stages(stages: list[dict], base_dir: Path, source: str, needs: list[str], carry: tuple[str, ...] = (),
                  reader: str = "", fixed_model_stages: tuple[str, ...] = ()) -> list:
    """Each pairs stage against its config schema, then the column flow; the
    last stage's output must have the columns ``needs`` (what the method's
    pair-reading trainers, or its round-data step ``reader``, read; an entry
    may list '|' alternatives of '+'-joined columns). Returns the built stages."""
    from ..data import ROW_ID
    from ..engine.pipeline import PipelineError
    from ..engine.stage import SourceStage, stage_kinds

    kinds = stage_kinds()
    cols = [ROW_ID, "id", "prompt", *carry]  # what the loop's load stage emits
    built = []
    for i, sd in enumerate(stages):
        where = f"pairs.stages[{i}]"
        kind = sd["stage"]
        if kind not in kinds:
            raise LoopError(f"{source}: {where}.stage: unknown stage {kind!r}; expected one of {sorted(kinds)}")
        cls = kinds[kind]
        if issubclass(cls, SourceStage):
            raise LoopError(f"{source}: {where}: {kind!r} reads data; the loop loads the `prompts` itself, "
                            f"so pairs stages start after it")
        for k in RESERVED_STAGE:
            if k in sd and not (k == "model" and (kind in PROMPT_WRITERS or kind in fixed_model_stages)):
                raise LoopError(f"{source}: {where}.{k}: set by the loop (the current policy generates, `judge:` "
                                f"judges; only a prompt-writing stage, {', '.join(PROMPT_WRITERS)}, may name a "
                                f"fixed model); remove it")
        cfg = {k: v for k, v in sd.items() if k != "stage"}
        validate(cfg, dataclass_schema(cls.Config), source, ["pairs", "stages", i], error=LoopError)
        try:
            stage = cls.from_dict(cfg, base_dir)
            stage.check()
        except (ValueError, FileNotFoundError, PipelineError) as e:
            raise LoopError(f"{source}: {stage_error(where, kind, cls, e)}") from None
        missing = sorted(stage.required_columns() - set(cols))
        if missing:
            raise LoopError(f"{source}: {where} ({kind}): needs column(s) {missing}, but its input has {cols}")
        cols = stage.output_columns(cols)
        built.append(stage)
    lacking = [spec for spec in needs if not any(set(alt.split("+")) <= set(cols) for alt in spec.split("|"))]
    if lacking and reader:
        raise LoopError(f"{source}: pairs.stages: the round-data step {reader!r} reads {lacking}, which the last "
                        f"stage does not emit (columns {cols}); see its loop-file section `{reader}:`")
    if lacking:
        raise LoopError(f"{source}: pairs.stages: the last stage must emit preference pairs; its output lacks "
                        f"{lacking} (columns {cols}); end with `onpolicy_pairs` or `judge_pairs`")
    return built


def _sets_note(m: registry.Method) -> str:
    """What the loop sets a step's fields to, for the "set by the loop" error."""
    reads = {"pairs": "the round's pairs", "prompts": "the training prompts"}.get(m.data or "", "its data")
    into = "round-NN/checkpoint (the new policy)" if m.produces == "policy" else f"round-NN/{m.produces}"
    start = "starts from the round's policy, " if "model" in m.loop_sets else ""
    reward = f" against the round's {m.reward_from.replace('_', ' ')}" if m.reward_from else ""
    return f"each round's {m.title} step {start}trains on {reads}{reward} and writes {into}"


def _check_step(m: registry.Method, values: Any, source: str, prefix: tuple[str, ...] = (),
                note: str | None = None) -> dict:
    """A trainer section (``train``, ``rm`` or ``ppo``; ``prefix``: its path
    when it is not the method's own section, e.g. ``sft.train``, and ``note``
    what the loop sets there) against its config class, minus the fields the
    loop sets."""
    from ..train.config import ConfigError as TrainConfigError
    from ..train.config import load_config

    prefix = prefix or (m.section,)
    section = ".".join(prefix)
    if values is None:
        values = {}
    if isinstance(values, dict):
        for k in m.loop_sets:
            if k in values:
                raise LoopError(f"{source}: {section}.{k}: set by the loop ({note or _sets_note(m)}); remove it")
    # what the loop fills in per round, as placeholders (checked for real when the round builds the config):
    # the fields it sets, and required fields the user may but need not write (`rm.model`: default round-0 policy)
    cls = m.config
    fixed = {k: "-" for k in ("model", "dataset", "output_dir", m.reward_from) if k and k in m.loop_sets}
    optional = {f.name: "-" for f in dataclasses.fields(cls) if f.metadata.get("required") and f.name not in fixed}
    try:
        load_config(cls, {**optional, **values} if isinstance(values, dict) else values, where=source,
                    prefix=list(prefix), fixed=fixed)
    except TrainConfigError as e:
        raise LoopError(str(e)) from None
    return dict(values)


def _check_method(data: dict, source: str) -> tuple[str, dict[str, dict]]:
    """(method, section -> settings with the loop's defaults filled in); a
    trainer section the chosen method does not read is an error, not
    silently ignored."""
    method = data.get("method", DEFAULT_METHOD)
    steps = registry.get(method).step_methods()
    used = {s.section for s in steps}
    reads = " and ".join(f"`{s.section}:`" for s in steps)
    for section in registry.loop_sections():
        if section in data and section not in used:
            other = next(k for k, lm in registry.loop_methods().items()
                         if section in {s.section for s in lm.step_methods()})
            raise LoopError(f"{source}: {section}: not used by method {method!r} (which reads {reads}); remove it "
                            f"or set `method: {other}`")
    if "rm_pairs" in data and not any(s.produces == "reward_model" for s in steps):
        raise LoopError(f"{source}: rm_pairs: not used by method {method!r} (it trains no reward model); remove it")
    sections = {}
    for s in steps:
        values = _check_step(s, data.get(s.section), source)
        sections[s.section] = {"seed": data.get("seed", 0), **dict(s.loop_defaults), **values}
    own = registry.get(method).round_data
    for name, users in _round_data_sections().items():
        if name in data and name != own:
            raise LoopError(f"{source}: {name}: not used by method {method!r}; remove it or set `method: "
                            f"{users[0]}`")
    if own:
        from .round_data import BUILDERS

        values = data.get(own) or {}
        validate(values, dataclass_schema(BUILDERS[own].config), source, [own], error=LoopError)
        sections[own] = dict(values)
    return method, sections


def _warmup_note(m: registry.Method, phase: str = WARMUP_PHASE) -> str:
    what = "the round-0 policy" if phase == WARMUP_PHASE else "the backward model M_yx"
    phase_name = "warm-up" if phase == WARMUP_PHASE else "backward phase"
    return (f"the {m.title} {phase_name} starts from the loop's `policy`, "
            f"trains on the rows of `{phase}.pipeline` and writes {phase}/checkpoint, {what}")


def _check_warmup(values: dict, seed: int, base_dir: Path, source: str, phase: str = WARMUP_PHASE) -> WarmupConfig:
    """The ``sft:`` section: its trainer's settings (the registry's warm-up
    method) and its data pipeline (a file or an inline mapping). The
    pipeline itself is checked by :func:`_check_warmup_pipeline` once the
    loop's engine settings are known."""
    from ..data.shipped import shipped_dir
    from ..llm.prompts import find_file

    sec: SFTSection = build(SFTSection, values)
    m = registry.get(sec.method)
    settings = _check_step(m, sec.train, source, prefix=(phase, "train"), note=_warmup_note(m, phase))
    if isinstance(sec.pipeline, str):
        name = sec.pipeline
        if not name.endswith((".yaml", ".yml")) and "/" not in name and not (base_dir / name).exists():
            name += ".yaml"  # a shipped pipeline by name (`self_instruct`)
        try:
            path = find_file(name, base_dir, "pipeline file", shipped=(shipped_dir("pipelines"),), want="file")
        except (ValueError, FileNotFoundError) as e:
            raise LoopError(f"{source}: {phase}.pipeline: {e}") from None
        try:
            pdata = yamlio.load_file(path, "pipeline file")
        except yamlio.YAMLInputError as e:
            raise LoopError(str(e)) from None
        if not isinstance(pdata, dict):
            raise LoopError(f"{path}: expected a mapping at the top level, got {type(pdata).__name__}")
        psource, pdir = str(path), path.parent
    else:
        pdata, psource, pdir = dict(sec.pipeline), f"{source}: {phase}.pipeline", base_dir
        for k in SFT_PIPELINE_SETS:
            if k in pdata:
                what = f"`{phase}.model` picks the model that writes the data" if k == "model" else \
                    "the data pipeline runs on the loop's engines"
                raise LoopError(f"{source}: {phase}.pipeline.{k}: set by the loop ({what}); remove it")
    pdata = {k: v for k, v in pdata.items() if k not in SFT_PIPELINE_SETS}
    return WarmupConfig(method=sec.method, settings={"seed": seed, **dict(m.loop_defaults), **settings},
                        pipeline=pdata, pipeline_source=psource, pipeline_dir=Path(pdir), model=sec.model)


def _check_warmup_pipeline(cfg: LoopConfig, phase: str = WARMUP_PHASE) -> None:
    """The warm-up's (or ``backward``'s) data pipeline as the loop will run
    it validates, and its last stage emits the rows its trainer reads."""
    from ..engine.pipeline import Pipeline, PipelineError

    w = cfg.warmup(phase)
    try:
        pipe = Pipeline.from_dict(cfg.sft_pipeline_data(phase), w.pipeline_dir, source=w.pipeline_source)
        pipe.check_columns()
    except PipelineError as e:
        raise LoopError(str(e)) from None
    cols: list[str] = []
    for st in pipe.stages:
        cols = st.output_columns(cols)
    m = w.trainer
    lacking = m.missing_columns(cols)
    if lacking:
        want = "; ".join(spec.replace("+", " and ").replace("|", ", or ") for spec in lacking)
        raise LoopError(f"{w.pipeline_source}: the last stage must emit {m.title} rows ({want}); its output "
                        f"has {cols}")


def _ranker_templates(stage_dicts: list[dict], stages: list) -> list[dict[str, Any]]:
    out = []
    for i, (sd, st) in enumerate(zip(stage_dicts, stages)):
        if judge_field(sd):
            for fname, tpl in getattr(st, "prompt_templates", {}).items():
                out.append({"stage": i, "kind": sd["stage"], "template": getattr(st.config, fname, fname),
                            "template_sha256": tpl.sha256})
    return out


def _check_judges_distinct(cfg: LoopConfig, eval_tpl) -> None:
    """The held-out judge may not be a training ranker read back: the same
    model (by name) with the same template text as a pairs stage that judges
    round 0 is an error (another template, such as the default, or another
    model via ``eval.judge`` fixes it)."""
    start = cfg.policy if cfg.sft is None else "<the SFT checkpoint>"
    if cfg.judge_for(start) != cfg.eval_judge():
        return
    for r in cfg.ranker_templates:
        if r["template_sha256"] == eval_tpl.sha256:
            raise LoopError(
                f"{cfg.source}: eval.judge_prompt: the held-out judge would be the training ranker of "
                f"pairs.stages[{r['stage']}] (model {cfg.eval_judge()!r}, template {r['template']}), so its win "
                f"rate would not be an independent measure; use another template (default "
                f"{HELDOUT_JUDGE_PROMPT}) or another model (eval.judge)")


def load_loop(path: str | Path | None = None, *, data: dict | None = None, base_dir: Path | None = None,
              overrides: dict[str, Any] | None = None) -> LoopConfig:
    """Read and validate a loop file (or ``data`` with ``base_dir``).

    ``overrides`` replace top-level keys before validation (e.g. the CLI's
    ``--policy``/``--rounds``). Nothing is loaded or written here.
    """
    if data is None:
        if path is None:
            raise LoopError("load_loop needs a path or data")
        p = Path(path)
        source = str(p)
        try:
            data = yamlio.load_file(p, "loop file")
        except yamlio.YAMLInputError as e:
            raise LoopError(str(e)) from None
        base_dir = p.parent.resolve()
    else:
        source = str(path) if path else "<python>"
        base_dir = Path(base_dir or Path.cwd()).resolve()
    if not isinstance(data, dict):
        raise LoopError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    data = {**data, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    validate(data, loop_schema(), source, error=LoopError)
    lf: LoopFile = build(LoopFile, {k: v for k, v in data.items()
                                    if k not in registry.loop_sections() and k not in _round_data_sections()})
    method_entry = registry.get(lf.method)
    steps = method_entry.step_methods()
    method, sections = _check_method(data, source)
    if method_entry.round_data:
        from .round_data import needed_columns

        needs = needed_columns(method_entry.round_data, sections[method_entry.round_data])
    else:
        needs = list(dict.fromkeys(c for s in steps if s.data in ("pairs", "sft") for c in s.columns))
    built = _check_stages(lf.pairs.stages, base_dir, source, needs, tuple(lf.carry_columns),
                          method_entry.round_data,
                          (BACKWARD_STAGE,) if method_entry.fixed_candidates else ())  # see _check_fixed_candidates
    if method_entry.round_stages and lf.pairs.stages[-1]["stage"] not in method_entry.round_stages:
        raise LoopError(f"{source}: pairs.stages[{len(lf.pairs.stages) - 1}]: method {method!r} builds its pairs "
                        f"with {' or '.join(method_entry.round_stages)}; end pairs.stages with it")
    judge = lf.judge
    if method_entry.self_judge:
        if judge not in (None, SELF_JUDGE):
            raise LoopError(f"{source}: judge: method {method!r} judges each round with the round's policy; "
                            f"remove `judge` (or write `judge: {SELF_JUDGE}`)")
        judge = SELF_JUDGE
    warmup = _check_warmup(data["sft"], lf.seed, base_dir, source) if data.get("sft") is not None else None
    backward = (_check_warmup(data[BACKWARD_PHASE], lf.seed, base_dir, source, BACKWARD_PHASE)
                if data.get(BACKWARD_PHASE) is not None else None)
    if method_entry.fixed_candidates:
        _check_fixed_candidates(lf.pairs.stages, method, warmup, backward, source)
    elif backward is not None:
        users = [k for k, m in registry.loop_methods().items() if m.fixed_candidates]
        raise LoopError(f"{source}: backward: not used by method {method!r} (only {', '.join(users)} trains a "
                        f"backward model); remove it")
    prompts = _read_prompts(lf.prompts, lf.prompt_column, lf.limit, base_dir, source, "prompts", "prompt_column")
    extras = _carried(lf.prompts, lf.carry_columns, len(prompts), base_dir, source)
    ev = lf.eval
    held = _read_prompts(ev.prompts, ev.prompt_column, ev.limit, base_dir, source, "eval.prompts",
                         "eval.prompt_column")
    overlap = sorted(set(held) & set(prompts))
    if overlap:
        raise LoopError(f"{source}: eval.prompts: {len(overlap)} held-out prompt(s) are also training prompts "
                        f"(e.g. {overlap[0][:60]!r}); held-out prompts must be unseen")
    from ..llm.prompts import PromptTemplate
    from ..llm.types import SamplingParams

    sampling = {"temperature": 0.0, "max_tokens": 128, **ev.sampling, "n": 1}
    try:
        SamplingParams.from_dict(sampling, where="eval.sampling")
    except ValueError as e:
        raise LoopError(f"{source}: {e}") from None
    try:
        tpl = PromptTemplate.load(ev.judge_prompt, base_dir)
    except (ValueError, FileNotFoundError) as e:
        raise LoopError(f"{source}: eval.judge_prompt: {e}") from None
    missing = {"prompt", "response_a", "response_b"} - tpl.variables
    if missing:
        raise LoopError(f"{source}: eval.judge_prompt: {tpl.source} must use {sorted(missing)}")
    if ev.options[0] == ev.options[1]:
        raise LoopError(f"{source}: eval.options: the two option strings must differ")
    evc = EvalConfig(prompts=held, sampling=sampling, judge=ev.judge, judge_prompt=ev.judge_prompt,
                     judge_chat=ev.judge_chat, options=list(ev.options), bootstrap_resamples=ev.bootstrap_resamples,
                     bootstrap_seed=ev.bootstrap_seed)
    cfg = LoopConfig(
        name=lf.name, policy=lf.policy, prompts=prompts, pairs_stages=lf.pairs.stages, eval=evc,
        sections=sections, judge=judge, method=method, rm_pairs=lf.rm_pairs, description=lf.description,
        license=lf.license, backend=lf.backend, backend_options=dict(lf.backend_options), models=dict(lf.models),
        seed=lf.seed, rounds=lf.rounds, chunk_size=lf.pairs.chunk_size, keep_checkpoints=lf.keep_checkpoints,
        sft=warmup, backward=backward, source=source, base_dir=base_dir, raw=data, prompt_extras=extras,
        history_rounds=lf.history,
    )
    cfg.ranker_templates = _ranker_templates(cfg.pairs_stages, built)
    _check_judges_distinct(cfg, tpl)
    if cfg.sft is not None:
        _check_warmup_pipeline(cfg)
    if cfg.backward is not None:
        _check_warmup_pipeline(cfg, BACKWARD_PHASE)
    return cfg


def _check_fixed_candidates(stages: list[dict], method: str, warmup: WarmupConfig | None,
                            backward: WarmupConfig | None, source: str) -> None:
    """Method humpback: the seed model M_0 is the ``sft:`` warm-up (its rows
    are also each round's seed share), one ``backtranslate`` stage before the
    last writes the candidates with M_yx, which ``backward:`` trains or the
    stage names (``model:``), not both."""
    if warmup is None:
        raise LoopError(f"{source}: sft: method {method!r} trains the seed model M_0 in the `sft:` warm-up (its "
                        f"rows are also the seed share of every round's training rows); add it")
    at = [i for i, sd in enumerate(stages[:-1]) if sd["stage"] == BACKWARD_STAGE]
    if len(at) != 1:
        raise LoopError(f"{source}: pairs.stages: method {method!r} needs one `{BACKWARD_STAGE}` stage before the "
                        f"last (the backward model writes the candidates' instructions); found {len(at)}")
    named = stages[at[0]].get("model")
    if backward is not None and named:
        raise LoopError(f"{source}: pairs.stages[{at[0]}].model: set by the loop (the `backward:` section trains "
                        f"M_yx); remove it, or remove `backward:` to use a given M_yx")
    if backward is None and not named:
        raise LoopError(f"{source}: backward: method {method!r} writes the candidates with a backward model M_yx: "
                        f"add a `backward:` section (trained by the loop) or name a given M_yx with "
                        f"`model:` on pairs.stages[{at[0]}]")
    if stages[-1].get("drop") is False:
        raise LoopError(f"{source}: pairs.stages[{len(stages) - 1}].drop: false would train on every candidate, "
                        f"not on the curated A_5 that method {method!r} keeps; remove it")
