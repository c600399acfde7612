"""The stage seam: what a stage declares, and the context that does the rest.

A stage is a small class with a config dataclass, of one of four kinds:

- :class:`SourceStage` reads rows (``read``) and is always the first stage;
- :class:`MapStage` maps a chunk of rows to rows with plain code (``process``);
- :class:`ModelStage` asks a model about each row: ``requests(row)`` says what
  to ask, ``parse(row, results)`` how to read the answer, optional ``keep``
  filters drop rows with a reason code. Multi-call stages write ``run(row)``
  as a generator that yields requests and receives their results;
- :class:`IterativeStage` grows its output step by step (``step``), e.g.
  Self-Instruct's bootstrap loop.

The runner owns chunking, checkpoints, progress and model lifetimes; the
:class:`StageContext` owns the model call: every row's requests of a chunk go
to the engine in one batched call per step, failed requests and truncations
are counted under stable reason codes (``failed_requests``,
``truncated_<call>``), provenance is appended to every output row, and the
templates and data files a stage loads (``self.load_template(field)``,
``self.data_file(...)``) are hashed into its fingerprint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import random
from collections.abc import Generator as Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..data import PROVENANCE, ROW_ID
from ..data.config import StrictValidator, dataclass_schema  # noqa: F401 - re-exported
from ..llm.prompts import PromptTemplate, find_file, text_request
from ..llm.types import (
    GenerationRequest,
    GenerationResult,
    Generator,
    SamplingParams,
    ScoreRequest,
)

# Columns synthfb keeps for itself: no stage field may name them as a column
# (a stage writing `row_id` or `provenance` would overwrite the record of
# where each row came from).
RESERVED_COLUMNS = (ROW_ID, PROVENANCE)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@contextlib.contextmanager
def config_field(name: str):
    """Prefix a ValueError / FileNotFoundError raised inside with the config
    field it concerns (``formats: formats file 'x' not found ...``), so the
    pipeline loader can name ``stages[i].formats``."""
    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"{name}: {e}") from None


@dataclass
class StageStats:
    """Counters a stage fills while processing a chunk (drop reasons etc.)."""

    counts: dict[str, int] = field(default_factory=dict)

    def add(self, key: str, n: int = 1) -> None:
        if n:
            self.counts[key] = self.counts.get(key, 0) + n


# -- what stages return and yield ---------------------------------------------

@dataclass(frozen=True)
class Drop:
    """A row left out on purpose, with a reason code: counted as
    ``dropped_<reason>`` in the stage's counters (and the card)."""

    reason: str


@dataclass
class Ask:
    """Requests a :class:`ModelStage` yields from ``run``: one
    :class:`GenerationRequest` / :class:`ScoreRequest` or a list of one kind.

    ``model``: the model to ask (default: the stage's); ``call``: a name for
    this call in the counters (``truncated_<call>``); ``partial``: also hand
    back failed results (``result.error`` set) instead of failing the row."""

    requests: Any
    model: str | None = None
    call: str = "outputs"
    partial: bool = False


# -- the registry ---------------------------------------------------------------

STAGES: dict[str, type["Stage"]] = {}
"""Stage kinds by their ``stage:`` name. Stage classes register themselves
(a subclass with a ``kind``); built-in and third-party stage modules are
imported through the ``synthfb.stages`` entry-point group."""
_LOADED = False


def stage_kinds() -> dict[str, type["Stage"]]:
    """All registered stage kinds (imports the ``synthfb.stages`` entry points once)."""
    global _LOADED
    if not _LOADED:
        from importlib import import_module
        from importlib.metadata import entry_points

        _LOADED = True
        for ep in entry_points(group="synthfb.stages"):
            import_module(ep.value)
    return STAGES


# -- the context -------------------------------------------------------------------

class StageContext:
    """What a stage may use while processing a chunk: the model door
    (:meth:`call`), seeded randomness (:meth:`rng`), counters, failures and
    provenance records."""

    def __init__(self, runner: Any, stage_index: int, stage_name: str, stage: "Stage | None" = None):
        self._runner = runner
        self.stage = stage
        self.stage_index = stage_index
        self.stage_name = stage_name
        self.seed: int = runner.pipeline.seed
        self.stats = StageStats()
        self.failures: list[dict[str, str]] = []

    def record_failure(self, row_id: Any, reason: str) -> None:
        """A row that could not be completed; kept in the run record and
        retried by ``--resume``."""
        self.failures.append({"row_id": str(row_id), "reason": reason})

    def generator(self, model: str | None = None) -> Generator:
        """The run's Generator for ``model`` (default: the stage's, else the pipeline's)."""
        if model is None and self.stage is not None:
            model = self.stage.model_name()
        return self._runner.generator(model)

    def rng(self, *keys: Any) -> random.Random:
        """A random stream derived from the run seed, the stage kind and
        ``keys`` (e.g. a row id and a step): the same keys give the same
        draws whatever the chunking, row order or resume point."""
        kind = self.stage.kind if self.stage is not None else self.stage_name
        digest = hashlib.sha256(json.dumps([self.seed, kind, *keys], default=str).encode()).digest()
        return random.Random(int.from_bytes(digest[:8], "big"))

    def call(self, requests: list[Any], owners: list[Any] | None = None, model: str | None = None,
             call: str = "outputs") -> list[Any]:
        """The model door: all ``requests`` (generation or scoring, one kind)
        in one batched engine call. Failed generation requests are counted as
        ``failed_requests`` and recorded against their ``owners`` (row ids);
        completions that hit max_tokens are counted as ``truncated_<call>``."""
        if not requests:
            return []
        gen = self.generator(model)
        desc = self.stage_name if call == "outputs" else f"{self.stage_name} {call}"
        if isinstance(requests[0], ScoreRequest):
            return gen.score(requests)
        results = gen.generate(requests, desc=desc)
        for k, res in enumerate(results):
            if res.error:
                self.stats.add("failed_requests")
                self.record_failure(owners[k] if owners is not None else f"{call}/{k}", res.error)
                continue
            self.stats.add(f"truncated_{call}", sum(c.finish_reason == "length" for c in res.completions))
        return results

    def provenance(self, gen: Generator, params: SamplingParams | None, template_sha256: str | None = None,
                   finish_reason: str = "") -> dict[str, Any]:
        """The record appended to a row's ``provenance``: stage, model,
        sampling, template hash (default: the stage's), seed, finish reason."""
        from ..llm.models import public_model_name

        if template_sha256 is None:
            template_sha256 = self.stage.template_sha256 if self.stage is not None else ""
        return {
            "stage": self.stage_name,
            "stage_index": self.stage_index,
            "backend": gen.info.backend,
            "model": public_model_name(gen.info.name),  # rows get published: never a local path
            "model_revision": gen.info.revision,
            "sampling": (params or SCORING).to_json(),
            "template_sha256": template_sha256,
            "seed": self.seed,
            "finish_reason": finish_reason,
        }


SCORING = SamplingParams(n=1, temperature=0.0, max_tokens=1)
"""What provenance records as the sampling of a log-prob scoring call."""


# -- stages ----------------------------------------------------------------------------

@dataclass
class ModelConfig:
    """Fields every model stage has."""

    model: str | None = field(default=None, metadata={"help": "model for this stage (default: the pipeline's)"})
    sampling: dict = field(default_factory=dict, metadata={
        "help": "sampling settings: temperature, top_p, max_tokens, stop, seed, ... (the stage's defaults apply "
                "to keys not given)"})


class Stage:
    """Base of every stage: a ``kind`` (its ``stage:`` name in YAML), a
    ``Config`` dataclass, and the files it loads. Subclass one of
    SourceStage, MapStage, ModelStage or IterativeStage."""

    kind: ClassVar[str] = ""
    Config: ClassVar[type] = object
    # ``*_column`` fields allowed to name a reserved column (RESERVED_COLUMNS).
    reserved_column_fields: ClassVar[tuple[str, ...]] = ()
    uses_model: ClassVar[bool] = False
    sampling_defaults: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if cls.__dict__.get("kind"):
            other = STAGES.get(cls.kind)
            if other is not None and (other.__module__, other.__qualname__) != (cls.__module__, cls.__qualname__):
                raise TypeError(f"stage kind {cls.kind!r} is already registered by {other.__module__}.{other.__qualname__}")
            STAGES[cls.kind] = cls

    def __init__(self, config: Any, base_dir: Path):
        self.config = config
        self.base_dir = Path(base_dir)
        # field -> PromptTemplate / data file (path, sha256), filled by template() / data_file()
        self.prompt_templates: dict[str, PromptTemplate] = {}
        self.data_files: dict[str, tuple[Path, str]] = {}
        self._check_column_fields()

    # -- what a stage loads (hashed into its fingerprint) ---------------------------
    def load_template(self, field: str) -> PromptTemplate:
        """The prompt template named by config field ``field`` (relative to
        the pipeline's folder, or one of synthfb's prompts); errors name the
        field. Its text is part of the stage's fingerprint and its card."""
        try:
            tpl = PromptTemplate.load(getattr(self.config, field), self.base_dir)
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"{field}: {e}") from None
        self.prompt_templates[field] = tpl
        return tpl

    def data_file(self, field: str, what: str, name: str | None = None, shipped: tuple[Path, ...] = ()) -> Path:
        """A data file named by config field ``field`` (or ``name``), found
        like a template; its bytes are hashed into the fingerprint."""
        with config_field(field):
            path = find_file(name if name is not None else getattr(self.config, field), self.base_dir, what,
                             shipped=shipped, want="file")
            try:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            except OSError as e:
                raise ValueError(f"{path}: cannot read the {what} ({e.strerror or e})") from None
        self.data_files[field] = (path, digest)
        return path

    @property
    def template_sha256(self) -> str:
        """One hash of the templates this stage uses ('' for none)."""
        shas = [t.sha256 for t in self.prompt_templates.values()]
        if len(shas) <= 1:
            return shas[0] if shas else ""
        return sha256_text("".join(shas))

    def sampling(self, field: str = "sampling", defaults: dict[str, Any] | None = None,
                 **set_by: str) -> SamplingParams:
        """SamplingParams from ``defaults`` (default: the stage's
        ``sampling_defaults``) overridden by the config mapping ``field``.
        ``set_by`` names sampling keys that other config fields set
        (``n="num_ratings"``): writing them in the mapping as well is an
        error. Errors name the field (``sampling.temperature: ...``)."""
        user = getattr(self.config, field) or {}
        if not isinstance(user, dict):
            raise ValueError(f"{field}: expected a mapping, got {type(user).__name__} {user!r}")
        fixed = {}
        for key, other in set_by.items():
            if key in user:
                raise ValueError(f"{field}.{key}: set by the stage's `{other}` field; remove it from `{field}`")
            fixed[key] = getattr(self.config, other)
        base = self.sampling_defaults if defaults is None else defaults
        try:
            return SamplingParams.from_dict({**base, **user, **fixed}, where=field)
        except ValueError as e:
            msg = str(e)
            for key, other in set_by.items():
                if msg.startswith(f"{field}.{key}"):
                    msg = other + msg[len(f"{field}.{key}"):]
            raise ValueError(msg) from None

    sampling_params = sampling  # the former name

    def _check_column_fields(self) -> None:
        """Every ``*_column`` field names a real column: a non-empty string,
        and not one of RESERVED_COLUMNS (unless the stage allows it)."""
        if not dataclasses.is_dataclass(self.config):
            return
        for f in dataclasses.fields(self.config):
            if not f.name.endswith("_column"):
                continue
            v = getattr(self.config, f.name)
            if v is None:
                continue
            if not isinstance(v, str) or not v.strip():
                raise ValueError(f"{f.name}: expected a column name (a non-empty string), got {v!r}")
            if v in RESERVED_COLUMNS and f.name not in self.reserved_column_fields:
                raise ValueError(f"{f.name}: {v!r} is reserved (synthfb keeps the columns {list(RESERVED_COLUMNS)} "
                                 f"for row ids and provenance); choose another column name")

    @classmethod
    def from_dict(cls, d: dict[str, Any], base_dir: Path) -> "Stage":
        return cls(cls.Config(**d), base_dir)

    # -- overridable -----------------------------------------------------
    def check(self) -> None:
        """Validate files/templates before any work; raise ValueError."""

    def required_columns(self) -> set[str]:
        """Input columns this stage reads (checked before any model work)."""
        return set()

    def output_columns(self, input_columns: list[str]) -> list[str]:
        """Columns of this stage's output, given its input's."""
        return list(input_columns)

    def model_name(self) -> str | None:
        """The model this stage calls (None: the pipeline's default)."""
        return getattr(self.config, "model", None)

    def fingerprint(self) -> dict[str, Any]:
        """Everything that determines this stage's output besides its input
        and model: the config, and the content of the templates and data
        files it loaded."""
        fp: dict[str, Any] = {"kind": self.kind, "config": _jsonable(dataclasses.asdict(self.config))}
        if self.prompt_templates:
            fp["template_sha256"] = self.template_sha256
        if self.data_files:
            fp["files_sha256"] = {k: sha for k, (_, sha) in sorted(self.data_files.items())}
        return fp

    def templates_used(self) -> list[dict[str, str]]:
        """The templates this stage loaded, for the run record and the card
        (the file as the pipeline names it, never a local absolute path)."""
        return [{"field": k, "file": str(getattr(self.config, k, "")), "sha256": t.sha256}
                for k, t in self.prompt_templates.items()]


class SourceStage(Stage):
    """The first stage of a pipeline: reads its rows (``read``)."""

    def read(self, ctx: StageContext) -> list[dict[str, Any]]:
        raise NotImplementedError


class MapStage(Stage):
    """A chunk of rows in, rows out, with plain code (``process``)."""

    def prepare(self, done: list[dict[str, Any]]) -> None:
        """Called once per run before the first chunk, with the rows this
        stage already wrote in earlier runs (resume; empty otherwise). A
        stage that keeps state across chunks (e.g. a dedupe set) starts it
        here, never from what an earlier run left on the object."""

    def process(self, rows: list[dict[str, Any]], ctx: StageContext) -> list[dict[str, Any]]:
        raise NotImplementedError


class ModelStage(MapStage):
    """A stage that asks a model about each row.

    Implement ``requests(row, ctx)`` (what to ask: a request or a list;
    ``None`` passes the row through unchanged, a :class:`Drop` leaves it out)
    and ``parse(row, results, ctx)`` (the output row's new columns, a list of
    them for several output rows, or a :class:`Drop`), or, for several calls
    per row, ``run(row, ctx)``: a generator that yields requests (or an
    :class:`Ask`) and receives their results. ``keep(row)`` filters output
    rows. The context batches every row's requests into one engine call per
    step, counts failures and truncations, builds the output row (input
    columns minus ``consumes()``, plus the parsed ones) and appends
    provenance."""

    uses_model = True
    adds: ClassVar[tuple[str, ...]] = ()
    """Columns this stage adds (the default ``output_columns``)."""

    def output_columns(self, input_columns: list[str]) -> list[str]:
        drop = self.consumes() | set(self.adds) | {PROVENANCE}
        return [c for c in input_columns if c not in drop] + list(self.adds) + [PROVENANCE]

    def requests(self, row: dict[str, Any], ctx: StageContext) -> Any:
        raise NotImplementedError

    def parse(self, row: dict[str, Any], results: Any, ctx: StageContext) -> Any:
        raise NotImplementedError

    def keep(self, row: dict[str, Any]) -> "bool | Drop":
        return True

    def consumes(self) -> set[str]:
        """Input columns that the output rows do not carry over."""
        return set()

    def run(self, row: dict[str, Any], ctx: StageContext) -> Coroutine[Any, Any, Any]:
        asked = self.requests(row, ctx)
        if asked is None or isinstance(asked, Drop):
            return asked
        results = yield asked
        return self.parse(row, results, ctx)

    def chat(self, text: str, params: SamplingParams, system: str | None = None, chat: bool = True) -> GenerationRequest:
        """A rendered prompt as a request (a user turn after an optional system turn)."""
        return text_request(text, params, chat, system)

    def process(self, rows: list[dict[str, Any]], ctx: StageContext) -> list[dict[str, Any]]:
        return _drive(self, rows, ctx)


class IterativeStage(Stage):
    """Grows its output step by step: ``step(rows, produced, step, ctx)``
    returns the next step's new rows, or None when done. Each step is saved
    as one chunk; take randomness from ``ctx.rng(step)`` so a resumed run
    continues the same way."""

    uses_model = True
    max_steps: ClassVar[int] = 100_000

    def step(self, rows: list[dict[str, Any]], produced: list[dict[str, Any]], step: int,
             ctx: StageContext) -> list[dict[str, Any]] | None:
        raise NotImplementedError


# -- the driver of model stages ------------------------------------------------------

class _Row:
    __slots__ = ("row", "co", "index", "ask", "calls")

    def __init__(self, row: dict[str, Any], co: Any, index: int):
        self.row = row
        self.co = co
        self.index = index
        self.ask: Ask | None = None
        self.calls: list[tuple[Generator, SamplingParams | None, str]] = []


def _as_ask(x: Any) -> Ask:
    ask = x if isinstance(x, Ask) else Ask(x)
    reqs = ask.requests
    single = not isinstance(reqs, (list, tuple))
    items = [reqs] if single else list(reqs)
    if not items or not all(isinstance(r, (GenerationRequest, ScoreRequest)) for r in items) or \
            len({type(r) for r in items}) != 1:
        raise TypeError(f"a model stage must yield GenerationRequest(s) or ScoreRequest(s) of one kind, got {x!r}")
    return Ask(items if not single else reqs, ask.model, ask.call, ask.partial)


def _drive(stage: ModelStage, rows: list[dict[str, Any]], ctx: StageContext) -> list[dict[str, Any]]:
    """Run every row's ``run`` coroutine in lockstep: each round, all rows'
    pending requests for the same model, kind and call go to the engine in
    one call; results go back to each row in order."""
    outs: list[list[dict[str, Any]]] = [[] for _ in rows]  # per input row: output rows keep the input order
    live: list[_Row] = []

    def advance(st: _Row, value: Any, first: bool = False) -> None:
        try:
            asked = next(st.co) if first else st.co.send(value)
        except StopIteration as stop:
            _finish(stage, st, stop.value, ctx, outs[st.index])
            return
        st.ask = _as_ask(asked)
        live.append(st)

    for i, row in enumerate(rows):
        co = stage.run(row, ctx)
        if not hasattr(co, "send"):  # run() returned without asking (e.g. requests() -> None / Drop)
            _finish(stage, _Row(row, None, i), co, ctx, outs[i])
            continue
        advance(_Row(row, co, i), None, first=True)
    while live:
        pending, live = live, []
        groups: dict[tuple[Any, bool, str], list[tuple[_Row, int]]] = {}
        for st in pending:
            ask = st.ask
            items = ask.requests if isinstance(ask.requests, list) else [ask.requests]
            key = (ask.model or stage.model_name(), isinstance(items[0], ScoreRequest), ask.call)
            groups.setdefault(key, []).extend((st, k) for k in range(len(items)))
        answers: dict[int, list[Any]] = {id(st): [] for st in pending}
        for (model, _, call), members in groups.items():
            reqs = []
            for st, k in members:
                r = st.ask.requests
                reqs.append(r[k] if isinstance(r, list) else r)
            results = ctx.call(reqs, owners=[st.row.get(ROW_ID) for st, _ in members], model=model, call=call)
            gen = ctx.generator(model)
            for (st, _), req, res in zip(members, reqs, results):
                answers[id(st)].append(res)
                if isinstance(req, GenerationRequest) and not res.error:
                    st.calls.append((gen, req.params, ",".join(c.finish_reason or "" for c in res.completions)))
                elif isinstance(req, ScoreRequest):
                    st.calls.append((gen, None, "scored"))
        for st in pending:
            got = answers[id(st)]
            failed = [r for r in got if isinstance(r, GenerationResult) and r.error]
            if failed and not st.ask.partial:
                st.co.close()  # the failure is recorded; --resume retries the row
                continue
            advance(st, got if isinstance(st.ask.requests, list) else got[0])
    return [r for rs in outs for r in rs]


def _finish(stage: ModelStage, st: _Row, parsed: Any, ctx: StageContext, out: list[dict[str, Any]]) -> None:
    row = st.row
    if parsed is None:
        out.append(row)  # nothing asked or nothing to change: the row passes through
        return
    if isinstance(parsed, Drop):
        ctx.stats.add(f"dropped_{parsed.reason}")
        return
    items = parsed if isinstance(parsed, list) else [parsed]
    drop = stage.consumes() | {PROVENANCE}
    base = {k: v for k, v in row.items() if k not in drop}
    history = list(row.get(PROVENANCE) or [])
    for k, new in enumerate(items):
        if isinstance(new, Drop):
            ctx.stats.add(f"dropped_{new.reason}")
            continue
        new = dict(new)
        extra = new.pop(PROVENANCE, None)
        if ROW_ID not in new and len(items) > 1:
            new[ROW_ID] = f"{row.get(ROW_ID)}/{k}"
        full = {**base, **new}
        verdict = stage.keep(full)
        if isinstance(verdict, Drop):
            ctx.stats.add(f"dropped_{verdict.reason}")
            continue
        if not verdict:
            ctx.stats.add("dropped_filtered")
            continue
        full[PROVENANCE] = history + _records(st, ctx, extra)
        out.append(full)


def _records(st: _Row, ctx: StageContext, extra: Any) -> list[dict[str, Any]]:
    """One provenance record per model the row was asked with (the first
    sampling of each; finish reasons of its generation calls joined), with
    the stage's overrides (a dict, or a list of dicts, one per record)."""
    recs, seen = [], {}
    for gen, params, finish in st.calls:
        key = id(gen)
        if key not in seen:
            seen[key] = len(recs)
            recs.append([gen, params, []])
        rec = recs[seen[key]]
        if rec[1] is None and params is not None:
            rec[1] = params
        rec[2].append(finish)
    made = [ctx.provenance(gen, params, None, finish[-1] if finish else "") for gen, params, finish in recs]
    if isinstance(extra, dict):
        for m in made:
            m.update(extra)
    elif isinstance(extra, list):
        made = [{**m, **e} for m, e in zip(made, extra)] + made[len(extra):]
    return made


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, sort_keys=True, default=str))
