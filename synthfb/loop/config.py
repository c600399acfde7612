"""Loop files: the YAML of ``synthfb loop``, checked before any work.

The top level is validated with ``jsonschema`` against ``LOOP_SCHEMA``; each
pairs stage against the schema of its own config dataclass (the same one
``synthfb run`` uses), the ``train:`` mapping against the schema of
:class:`synthfb.train.dpo.DPOConfig` (``method: dpo``, the default) or the
``rm:`` / ``ppo:`` mappings against :class:`synthfb.train.rm.RMConfig` and
:class:`synthfb.train.ppo.PPOConfig` (``method: rm_ppo``). Errors name the
file and the field path (``loop.yaml: pairs.stages[0].n: expected integer,
got str 'many'``).

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
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jsonschema.exceptions import best_match

from ..data import yamlio
from ..engine.pipeline import NAME_SCHEMA, _describe, stage_error
from ..engine.stage import StrictValidator, dataclass_schema

# The loop trains new checkpoints, so the backend must load local folders.
LOOP_BACKENDS = ("vllm", "vllm-cpu", "transformers")
# How a round turns its pairs into a new policy.
METHODS = ("dpo", "rm_ppo")
# Trainer fields the loop sets for every round.
RESERVED_TRAIN = ("model", "dataset", "output_dir", "resume", "resume_from")
RESERVED_RM = ("dataset", "output_dir", "resume", "resume_from")
RESERVED_PPO = ("model", "dataset", "output_dir", "resume", "resume_from", "reward_model", "reward_function")
# Stage fields that pick models: the loop sets them (policy generates, judge judges).
RESERVED_STAGE = ("model", "ranker_model")
SELF_JUDGE = "policy"

_PROMPTS = {
    "anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
    ],
}

LOOP_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["name", "policy", "prompts", "pairs", "eval"],
    "additionalProperties": False,
    "properties": {
        "name": NAME_SCHEMA,
        "description": {"type": "string", "description": "what is built and why (goes into each round's data card)"},
        "license": {"type": "string", "description": "license of the pairs datasets"},
        "backend": {"enum": list(LOOP_BACKENDS), "description": "inference backend (must load local checkpoints)"},
        "policy": {"type": "string", "minLength": 1, "description": "round-0 policy: alias, local folder or hub id"},
        "judge": {"type": ["string", "null"], "description": "judge model (default: the round-0 policy, fixed); "
                                                            "`policy`: each round's policy judges itself"},
        "backend_options": {"type": "object", "description": "passed to every engine"},
        "models": {"type": "object", "additionalProperties": {"type": "object"},
                   "description": "per-model backend options, keyed by model name (e.g. the judge)"},
        "seed": {"type": "integer", "description": "engine seed (sampling) and training seed default"},
        "rounds": {"type": "integer", "minimum": 1, "description": "generate -> judge -> train rounds"},
        "prompts": {**_PROMPTS, "description": "training prompts: a data file or an inline list of strings"},
        "prompt_column": {"type": "string", "minLength": 1, "description": "column of the prompts file"},
        "limit": {"type": "integer", "minimum": 1, "description": "use only the first N prompts"},
        "keep_checkpoints": {"type": "boolean", "description": "keep the resumable checkpoint-N folders of "
                                                               "finished rounds (default: removed)"},
        "pairs": {
            "type": "object",
            "required": ["stages"],
            "additionalProperties": False,
            "properties": {
                "chunk_size": {"type": "integer", "minimum": 1},
                "stages": {
                    "type": "array",
                    "minItems": 1,
                    "items": {"type": "object", "required": ["stage"], "properties": {"stage": {"type": "string"}}},
                },
            },
        },
        "method": {"enum": list(METHODS), "description": "dpo (default): DPO on the pairs; rm_ppo: a reward "
                                                        "model on the pairs, then PPO against it"},
        "train": {"type": "object", "description": "DPOConfig fields (method dpo)"},
        "rm": {"type": "object", "description": "RMConfig fields (method rm_ppo); `model` = the RM's initial "
                                                "weights (default: the round-0 policy)"},
        "ppo": {"type": "object", "description": "PPOConfig fields (method rm_ppo)"},
        "rm_pairs": {"enum": ["round", "all_rounds"], "description": "method rm_ppo: train each round's RM on "
                                                                     "its own pairs (round) or on rounds 0..k"},
        "eval": {
            "type": "object",
            "required": ["prompts"],
            "additionalProperties": False,
            "properties": {
                "prompts": {**_PROMPTS, "description": "held-out prompts: a data file or an inline list"},
                "prompt_column": {"type": "string", "minLength": 1},
                "limit": {"type": "integer", "minimum": 1},
                "sampling": {"type": "object", "description": "decoding of the compared responses (default greedy)"},
                "judge": {"type": "string", "minLength": 1,
                          "description": "judge model (default: the loop's fixed judge, or the round-0 policy)"},
                "judge_prompt": {"type": "string", "minLength": 1, "description": "A/B template"},
                "judge_chat": {"type": "boolean"},
                "options": {"type": "array", "minItems": 2, "maxItems": 2, "items": {"type": "string"}},
            },
        },
    },
}


class LoopError(ValueError):
    """A loop file or loop folder is invalid; the message names file and field."""


def _validate(obj: Any, schema: dict, source: str, prefix: list) -> None:
    errors = list(StrictValidator(schema).iter_errors(obj))
    if errors:
        e = best_match(errors)
        e.path.extendleft(reversed(prefix))  # type: ignore[attr-defined]
        raise LoopError(f"{source}: {_describe(e)}")


def stable_hash(obj: Any) -> str:
    """A short content hash of a JSON-able object (fingerprints)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _trainer_sections() -> dict[str, tuple[type, tuple[str, ...], str]]:
    """Loop-file section -> (config class, fields the loop sets, what the loop sets them to)."""
    from ..train.dpo import DPOConfig
    from ..train.ppo import PPOConfig
    from ..train.rm import RMConfig

    return {
        "train": (DPOConfig, RESERVED_TRAIN, "each round trains the current policy on its own pairs into "
                                             "round-NN/checkpoint"),
        "rm": (RMConfig, RESERVED_RM, "each round trains a reward model on its pairs into round-NN/reward_model"),
        "ppo": (PPOConfig, RESERVED_PPO, "each round runs PPO from the current policy on the training prompts "
                                         "against the round's reward model into round-NN/checkpoint"),
    }


def train_schema(section: str = "train") -> dict[str, Any]:
    """JSON schema of a trainer mapping (``train``, ``rm``, ``ppo``): its
    config dataclass minus the fields the loop sets."""
    cls, reserved, _ = _trainer_sections()[section]
    schema = dataclass_schema(cls)
    for k in reserved:
        schema["properties"].pop(k, None)
    return schema


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
    train: dict[str, Any]
    eval: EvalConfig
    judge: str | None = None
    method: str = "dpo"
    rm: dict[str, Any] = field(default_factory=dict)
    ppo: dict[str, Any] = field(default_factory=dict)
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
        stages, training and eval settings, engine options and seed."""
        parts = {
            "prompts": self.prompts, "stages": self.pairs_stages, "train": self.train,
            "eval": dataclasses.asdict(self.eval), "backend": self.backend,
            "backend_options": self.backend_options, "models": self.models, "seed": self.seed,
            "chunk_size": self.chunk_size, "judge": self.judge,
        }
        if self.method != "dpo":
            parts.update(method=self.method, rm=self.rm, ppo=self.ppo, rm_pairs=self.rm_pairs)
        return stable_hash(parts)


def _read_prompts(value: Any, column: str, limit: int | None, base_dir: Path, source: str, where: str,
                  column_field: str) -> list[str]:
    """Prompt texts from an inline list or a data file (column ``column``)."""
    from ..data.io import InputError, read_user_file
    from ..stages.templates import find_file

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


def _check_stages(stages: list[dict], base_dir: Path, source: str) -> None:
    """Each pairs stage against its config schema, then the column flow."""
    from ..data import ROW_ID
    from ..engine.pipeline import PipelineError
    from ..stages import STAGES

    cols = [ROW_ID, "id", "prompt"]  # what the loop's load stage emits
    for i, sd in enumerate(stages):
        where = f"pairs.stages[{i}]"
        kind = sd["stage"]
        if kind not in STAGES:
            raise LoopError(f"{source}: {where}.stage: unknown stage {kind!r}; expected one of {sorted(STAGES)}")
        cls = STAGES[kind]
        if cls.is_source:
            raise LoopError(f"{source}: {where}: {kind!r} reads data; the loop loads the `prompts` itself, "
                            f"so pairs stages start after it")
        for k in RESERVED_STAGE:
            if k in sd:
                raise LoopError(f"{source}: {where}.{k}: set by the loop (the current policy generates, `judge:` "
                                f"judges); remove it")
        cfg = {k: v for k, v in sd.items() if k != "stage"}
        _validate(cfg, dataclass_schema(cls.Config), source, ["pairs", "stages", i])
        try:
            stage = cls.from_dict(cfg, base_dir)
            stage.check()
        except (ValueError, FileNotFoundError, PipelineError) as e:
            raise LoopError(f"{source}: {stage_error(where, kind, cls, e)}") from None
        missing = sorted(stage.required_columns() - set(cols))
        if missing:
            raise LoopError(f"{source}: {where} ({kind}): needs column(s) {missing}, but its input has {cols}")
        cols = stage.output_columns(cols)
    lacking = [c for c in ("prompt", "chosen", "rejected") if c not in cols]
    if lacking:
        raise LoopError(f"{source}: pairs.stages: the last stage must emit preference pairs; its output lacks "
                        f"{lacking} (columns {cols}); end with `onpolicy_pairs` or `judge_pairs`")


def _check_trainer(section: str, values: dict, source: str) -> dict:
    """A trainer mapping (``train``, ``rm`` or ``ppo``) against its config class."""
    from ..train.config import ConfigError, load_config

    cls, reserved, what = _trainer_sections()[section]
    for k in reserved:
        if k in values:
            raise LoopError(f"{source}: {section}.{k}: set by the loop ({what}); remove it")
    _validate(values, train_schema(section), source, [section])
    filled = {"model": "-", "dataset": "-", "output_dir": "-", **({"reward_model": "-"} if section == "ppo" else {})}
    try:
        load_config(cls, {**filled, **values}, where=f"{source}: {section}")
    except ConfigError as e:
        raise LoopError(str(e)) from None
    return dict(values)


def _check_method(data: dict, source: str) -> tuple[str, dict, dict, dict]:
    """(method, train, rm, ppo) with the seed default filled in; a section
    that the chosen method does not use is an error, not silently ignored."""
    method = data.get("method", "dpo")
    seed = {"seed": data.get("seed", 0)}
    unused = ("rm", "ppo", "rm_pairs") if method == "dpo" else ("train",)
    for k in unused:
        if k in data:
            use = "`train:` (DPO settings)" if method == "dpo" else "`rm:` and `ppo:`"
            raise LoopError(f"{source}: {k}: not used by method {method!r} (which reads {use}); remove it or set "
                            f"`method: {'rm_ppo' if method == 'dpo' else 'dpo'}`")
    if method == "dpo":
        return method, {**seed, **_check_trainer("train", data.get("train") or {}, source)}, {}, {}
    rm = {**seed, "margin_column": None, **_check_trainer("rm", data.get("rm") or {}, source)}
    ppo = {**seed, **_check_trainer("ppo", data.get("ppo") or {}, source)}
    return method, {}, rm, ppo


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
    _validate(data, LOOP_SCHEMA, source, [])
    _check_stages(data["pairs"]["stages"], base_dir, source)
    method, train, rm, ppo = _check_method(data, source)
    column = data.get("prompt_column", "prompt")
    prompts = _read_prompts(data["prompts"], column, data.get("limit"), base_dir, source, "prompts",
                           "prompt_column")
    ev = data["eval"]
    held = _read_prompts(ev["prompts"], ev.get("prompt_column", "prompt"), ev.get("limit"), base_dir, source,
                         "eval.prompts", "eval.prompt_column")
    overlap = sorted(set(held) & set(prompts))
    if overlap:
        raise LoopError(f"{source}: eval.prompts: {len(overlap)} held-out prompt(s) are also training prompts "
                        f"(e.g. {overlap[0][:60]!r}); held-out prompts must be unseen")
    from ..llm.types import SamplingParams
    from ..stages.templates import PromptTemplate

    sampling = {"temperature": 0.0, "max_tokens": 128, **(ev.get("sampling") or {}), "n": 1}
    try:
        SamplingParams.from_dict(sampling, where="eval.sampling")
    except ValueError as e:
        raise LoopError(f"{source}: {e}") from None
    try:
        tpl = PromptTemplate.load(ev.get("judge_prompt", "pairwise_judge.jinja"), base_dir)
    except (ValueError, FileNotFoundError) as e:
        raise LoopError(f"{source}: eval.judge_prompt: {e}") from None
    missing = {"prompt", "response_a", "response_b"} - tpl.variables
    if missing:
        raise LoopError(f"{source}: eval.judge_prompt: {tpl.source} must use {sorted(missing)}")
    options = ev.get("options", [" (A)", " (B)"])
    if options[0] == options[1]:
        raise LoopError(f"{source}: eval.options: the two option strings must differ")
    evc = EvalConfig(prompts=held, sampling=sampling, judge=ev.get("judge"),
                     judge_prompt=ev.get("judge_prompt", "pairwise_judge.jinja"),
                     judge_chat=ev.get("judge_chat", False), options=list(options))
    return LoopConfig(
        name=data["name"], policy=data["policy"], prompts=prompts, pairs_stages=data["pairs"]["stages"],
        train=train, eval=evc, judge=data.get("judge"), method=method, rm=rm, ppo=ppo,
        rm_pairs=data.get("rm_pairs", "round"), description=data.get("description", ""),
        license=data.get("license"), backend=data.get("backend", "vllm"),
        backend_options=dict(data.get("backend_options") or {}), models=dict(data.get("models") or {}),
        seed=data.get("seed", 0), rounds=data.get("rounds", 2), chunk_size=data["pairs"].get("chunk_size", 2048),
        keep_checkpoints=data.get("keep_checkpoints", False), source=source, base_dir=base_dir, raw=data,
    )
