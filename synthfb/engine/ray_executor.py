"""Run model stages' chunks on a Ray cluster: ``synthfb run ... --executor ray``.

The pipeline stays a list of steps and the :class:`~synthfb.engine.runner.Runner`
stays in charge of the run folder; an executor only decides *where* chunks are
processed (the split datatrove makes between a pipeline and its executor).
:class:`RayExecutor` keeps a pool of Ray actors, each holding its own engine
(a :func:`synthfb.llm.load_generator` Generator for the pipeline's backend,
e.g. one vLLM engine per GPU), and hands every unfinished chunk of a model
stage to the next free actor.

What stays exactly as in a local run:

* Each actor processes a chunk with a worker-side ``Runner`` (never run, only
  used for its generators) and :meth:`Runner.process_chunk`, the same code the
  local path runs: same ``StageContext``, seed, provenance, drop counts,
  failures and token usage.
* Output rows and stats come back to the driver, which writes each finished
  chunk with the runner's own atomic helpers as soon as it arrives. Chunk
  files, ``stats.json`` files, fingerprints and ``run.json`` have the same
  form, so a run started locally resumes under Ray and vice versa; finished
  chunks are never recomputed and no row is written twice. Workers need no
  shared filesystem for the output (only for the model and the input files
  the stages read, which are shipped inside the pickled stage objects).
* Source stages, iterative stages (e.g. the Self-Instruct bootstrap) and
  stages that call no model run on the driver, as before.

A worker that dies (node lost, process killed) is dropped from the pool and its
chunk goes to another worker; when no worker is left the run stops with a
clear error and ``--resume`` continues it. An exception raised by a stage on a
worker is re-raised on the driver as the same exception.

Determinism: with greedy decoding (``temperature: 0``) the output is the same
row for row as the local executor's with any number of workers. With sampling,
each engine is seeded with the pipeline's ``seed`` (the vLLM CPU build has no
per-request seeds), so the rows depend on which chunks each engine saw.

Ray is an optional extra (``pip install 'synthfb[ray]'``); this module is the
only one that imports it, and only when an executor is created.
"""

from __future__ import annotations

import copyreg
import dataclasses
import hashlib
import io
import json
import os
import pickle
import socket
import uuid
from collections import ChainMap, Counter, deque
from typing import Any, Iterator

from .runner import RunError, Runner
from .stage import Stage

INSTALL_HINT = "pip install 'synthfb[ray]'"

# Environment variables that shape how a worker loads its engine; forwarded to
# the workers when set on the driver (never credentials: a backend's API key
# must be set in the workers' own environment).
FORWARDED_ENV = (
    "VLLM_CPU_KVCACHE_SPACE",
    "VLLM_CPU_OMP_THREADS_BIND",
    "VLLM_CPU_NUM_OF_RESERVED_CPU",
    "VLLM_LOGGING_LEVEL",
    "HF_HOME",
    "HF_HUB_OFFLINE",
    "SYNTHFB_HOME",
    "TOKENIZERS_PARALLELISM",
)


def import_ray():
    """``import ray``, or a RunError that says how to install it."""
    try:
        import ray
    except ImportError as e:
        raise RunError(f"--executor ray needs Ray, which is not installed here: {INSTALL_HINT}") from e
    return ray


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """Fail fast on a ``host:port`` address nothing listens on (``ray.init``
    itself retries for minutes before it gives up)."""
    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return  # e.g. "auto": left to Ray
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise RunError(f"no Ray cluster reachable at {address!r} ({e}); start one with `ray start --head` "
                       f"or check --ray-address / RAY_ADDRESS") from e


# -- shipping stages ---------------------------------------------------------

def _reduce_template(t: Any) -> tuple:
    # a compiled Jinja template holds generated code; rebuild it from its text
    return (type(t), (t.text, t.source))


def dumps(obj: Any) -> bytes:
    """Pickle a stage (or a pipeline's settings) for a worker.

    Uses Ray's cloudpickle (so stage classes defined in a script travel by
    value) plus one rule: a ``PromptTemplate`` is sent as its text and source
    and compiled again on the worker (its compiled Jinja code does not pickle;
    its ``sha256`` is a hash of the text, so provenance is unchanged).
    """
    from ray import cloudpickle

    from ..llm.prompts import PromptTemplate

    class _Pickler(cloudpickle.CloudPickler):
        dispatch_table = ChainMap({PromptTemplate: _reduce_template}, copyreg.dispatch_table)

    buf = io.BytesIO()
    _Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()


def _engine_settings(runner: Runner) -> tuple[str, bytes]:
    """The part of the pipeline a worker needs to load the same engines the
    driver would (backend, models, options, seed), without the stages; and a
    key for it, so workers reuse their engines across stages and runs."""
    p = runner.pipeline
    settings = dataclasses.replace(p, stages=[], raw={})
    key = hashlib.sha256(json.dumps(
        {"backend": p.backend, "model": p.model, "backend_options": p.backend_options, "models": p.models,
         "seed": p.seed}, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return key, dumps(settings)


# -- the worker --------------------------------------------------------------

class ChunkWorker:
    """The body of one Ray actor: engines for one set of pipeline settings
    and the stage currently being run, both unpickled once and cached.

    Engines are loaded lazily by a worker-side :class:`Runner` (the same
    ``load_generator`` call with the same options and seed as a local run) and
    kept until the settings change or :meth:`close` is called.
    """

    def __init__(self) -> None:
        self._runners: dict[str, Runner] = {}
        self._stage_key: str | None = None
        self._stage: Stage | None = None

    def where(self) -> str:
        """``host:pid`` of this worker (also a liveness check)."""
        return f"{socket.gethostname()}:{os.getpid()}"

    def _runner(self, settings_key: str, settings_blob: bytes) -> Runner:
        if settings_key not in self._runners:
            self.close()  # other settings: free their engines first
            pipeline = pickle.loads(settings_blob)
            self._runners[settings_key] = Runner(pipeline, os.getcwd(), progress=False)
        return self._runners[settings_key]

    def process(self, settings_key: str, settings_blob: bytes, stage_key: str, stage_blob: bytes,
                stage_index: int, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """One chunk through the stage: ``(rows_out, stats)`` exactly as
        :meth:`Runner.process_chunk` makes them in a local run."""
        runner = self._runner(settings_key, settings_blob)
        if stage_key != self._stage_key:
            self._stage = pickle.loads(stage_blob)
            self._stage_key = stage_key
        return runner.process_chunk(self._stage, stage_index, rows)

    def close(self) -> None:
        """Shut down this worker's engines."""
        for r in self._runners.values():
            r.close()
        self._runners.clear()


# -- the executor ------------------------------------------------------------

class RayExecutor:
    """Runs the chunks of model stages on a pool of Ray actors, one engine each.

    ``address``: a Ray cluster to join (``HEAD_IP:6379``, passed to
    ``ray.init``; also read from ``RAY_ADDRESS``). Without one, and when Ray
    is not already initialised in this process, a local single-node cluster
    is started on 127.0.0.1 and shut down by :meth:`close`. When Ray is
    already initialised in this process, that connection is used as it is.

    ``workers``: number of actors (engines). Default: one per GPU of the
    cluster, or 1 on a cluster without GPUs. Each actor asks Ray for
    ``num_cpus`` CPUs and ``num_gpus`` GPUs (default: 1 GPU when the cluster
    has GPUs and the backend runs a local model, else 0).

    ``runtime_env``: passed to the actors (``FORWARDED_ENV`` variables set on
    the driver are added to its ``env_vars``). The workers must be able to
    import ``synthfb`` and read the model folder and the pipeline's input
    files; the output goes through the driver.

    Create one, pass it to ``run_pipeline(..., executor=ex)`` (as many runs as
    you like: the actors and their engines are reused while the pipeline's
    backend, models and seed stay the same), then :meth:`close` it.
    """

    def __init__(
        self,
        address: str | None = None,
        workers: int | None = None,
        *,
        num_cpus: float = 1.0,
        num_gpus: float | None = None,
        runtime_env: dict[str, Any] | None = None,
        log_to_driver: bool = True,
        init_kwargs: dict[str, Any] | None = None,
    ):
        if workers is not None and workers < 1:
            raise RunError(f"--ray-workers must be >= 1, got {workers}")
        ray = import_ray()
        self._ray = ray
        self.requested_workers = workers
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self._owns_ray = False
        if not ray.is_initialized():
            kw: dict[str, Any] = dict(include_dashboard=False, log_to_driver=log_to_driver)
            target = address or os.environ.get("RAY_ADDRESS")
            if target:
                _check_reachable(target)
                kw["address"] = target
            else:  # a private local cluster, reachable from this machine only
                kw["_node_ip_address"] = "127.0.0.1"
            kw.update(init_kwargs or {})
            try:
                ray.init(**kw)
            except (ConnectionError, RuntimeError, ValueError) as e:
                where = f"the Ray cluster at {target!r}" if target else "a local Ray cluster"
                raise RunError(f"could not connect to {where}: {e}") from e
            self._owns_ray = True
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        self.runtime_env = dict(runtime_env or {})
        if env:
            self.runtime_env["env_vars"] = {**env, **self.runtime_env.get("env_vars", {})}
        self._actors: list[Any] = []
        self._where: dict[Any, str] = {}
        self._remote_cls = None
        self.chunks_done: Counter[str] = Counter()  # chunks finished per worker (host:pid)

    # -- pool ----------------------------------------------------------------
    def _gpus_per_worker(self, backend: str) -> float:
        if self.num_gpus is not None:
            return self.num_gpus
        has_gpu = self._ray.cluster_resources().get("GPU", 0) >= 1
        return 1.0 if has_gpu and backend != "openai" else 0.0

    def _target_workers(self, gpus: float) -> int:
        if self.requested_workers is not None:
            return self.requested_workers
        if gpus > 0:
            return max(1, int(self._ray.cluster_resources().get("GPU", 0) // gpus))
        return 1

    def _ensure_workers(self, runner: Runner) -> None:
        """Start actors until the pool has the requested size.

        Starting an empty pool is strict: a cluster too small for the
        requested workers, or workers that do not come up, stop the run with a
        clear error before any chunk is sent. Replacing workers that died is
        not: only as many as the cluster has free room for are started, and if
        they do not come up the run goes on with the workers it has.
        """
        ray = self._ray
        gpus = self._gpus_per_worker(runner.pipeline.backend)
        n = self._target_workers(gpus)
        missing = n - len(self._actors)
        if missing <= 0:
            return
        first = not self._actors
        if first:
            res = ray.cluster_resources()
            need_cpu, need_gpu = n * self.num_cpus, n * gpus
            if need_cpu > res.get("CPU", 0) or need_gpu > res.get("GPU", 0):
                raise RunError(
                    f"{n} Ray worker(s) need {need_cpu:g} CPU and {need_gpu:g} GPU, but the cluster has "
                    f"{res.get('CPU', 0):g} CPU and {res.get('GPU', 0):g} GPU; lower --ray-workers or add nodes")
        else:
            free = ray.available_resources()
            fit = missing
            if self.num_cpus:
                fit = min(fit, int(free.get("CPU", 0) // self.num_cpus))
            if gpus:
                fit = min(fit, int(free.get("GPU", 0) // gpus))
            if fit < missing:
                runner._log(f"ray: room for {fit} of {missing} replacement worker(s) only")
            missing = fit
            if missing <= 0:
                return
        if self._remote_cls is None:
            self._remote_cls = ray.remote(ChunkWorker)
        opts: dict[str, Any] = dict(num_cpus=self.num_cpus, num_gpus=gpus)
        if self.runtime_env:
            opts["runtime_env"] = self.runtime_env
        new = [self._remote_cls.options(**opts).remote() for _ in range(missing)]
        try:
            where = ray.get([a.where.remote() for a in new], timeout=600 if first else 120)
        except Exception as e:  # noqa: BLE001 - any start failure gets the same clear message
            for a in new:
                ray.kill(a)
            if first:
                raise RunError(f"could not start {missing} Ray worker(s): {type(e).__name__}: {e}") from e
            runner._log(f"ray: replacement worker(s) did not start ({type(e).__name__}); "
                        f"going on with {len(self._actors)}")
            return
        for a, w in zip(new, where):
            self._actors.append(a)
            self._where[a] = w
        runner._log(f"ray: {len(self._actors)} worker(s): {', '.join(self._where[a] for a in self._actors)}")

    def resize(self, workers: int) -> None:
        """Change the pool size: surplus workers are closed now, missing ones
        are started when the next model stage begins (the others keep their
        engines)."""
        if workers < 1:
            raise RunError(f"--ray-workers must be >= 1, got {workers}")
        self.requested_workers = workers
        while len(self._actors) > workers:
            self._stop(self._actors.pop())

    def _stop(self, actor: Any) -> None:
        try:
            self._ray.get(actor.close.remote(), timeout=120)
        except Exception:  # noqa: BLE001 - it is killed next anyway
            pass
        try:
            self._ray.kill(actor)
        except Exception:  # noqa: BLE001
            pass
        self._where.pop(actor, None)

    @property
    def workers(self) -> list[str]:
        """``host:pid`` of each live worker in the pool."""
        return [self._where[a] for a in self._actors]

    # -- the executor interface ------------------------------------------------
    def map_chunks(self, runner: Runner, stage: Stage, stage_index: int, table: Any,
                   chunks: list[int]) -> Iterator[tuple[int, int, list[dict[str, Any]], dict[str, Any]]]:
        """Process the given chunk indices of ``table`` on the workers; yield
        ``(chunk, rows_in, rows_out, stats)`` as each finishes (in completion
        order). A freed worker gets its next chunk before the result is
        yielded, so workers do not wait for the driver's writes."""
        ray = self._ray
        model = runner._model_name(stage.model_name())
        if model in runner._given:
            raise RunError(
                f"{stage.kind}: the run was handed an in-process engine for model {model!r} (generators=...), "
                f"but with the Ray executor each worker loads its own; pass no generators for it")
        self._ensure_workers(runner)
        settings_key, settings = _engine_settings(runner)
        settings_ref = ray.put(settings)
        stage_ref = ray.put(dumps(stage))
        stage_key = uuid.uuid4().hex
        size = runner.pipeline.chunk_size
        queue = deque(chunks)
        free = list(self._actors)
        pending: dict[Any, tuple[int, Any, int]] = {}

        def fill() -> None:
            while queue and free:
                c, actor = queue.popleft(), free.pop(0)
                rows = table.slice(c * size, size).to_pylist()
                ref = actor.process.remote(settings_key, settings_ref, stage_key, stage_ref, stage_index, rows)
                pending[ref] = (c, actor, len(rows))

        while queue or pending:
            fill()
            if not pending:
                raise RunError(f"{stage.kind}: every Ray worker has died; finished chunks are on disk, "
                               f"continue with --resume")
            [ref], _ = ray.wait(list(pending), num_returns=1)
            c, actor, n_in = pending.pop(ref)
            try:
                out, stats = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                cause = getattr(e, "cause", None)
                if isinstance(cause, BaseException):
                    raise cause from e
                raise
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                where = self._where.pop(actor, "?")
                if actor in self._actors:
                    self._actors.remove(actor)
                runner._log(f"ray: worker {where} died on chunk {c} of {stage.kind} ({type(e).__name__}); "
                            f"giving the chunk to another worker")
                queue.appendleft(c)
                continue
            self.chunks_done[self._where[actor]] += 1
            free.append(actor)
            fill()
            yield c, n_in, out, stats

    def close(self) -> None:
        """Shut down the workers' engines and the actors; stop the local Ray
        cluster if this executor started it."""
        ray = self._ray
        if self._actors:
            try:  # all engines shut down in parallel, then the actors go
                ray.get([a.close.remote() for a in self._actors], timeout=120)
            except Exception:  # noqa: BLE001 - the actors are killed next anyway
                pass
            for a in self._actors:
                try:
                    ray.kill(a)
                except Exception:  # noqa: BLE001
                    pass
        self._actors.clear()
        self._where.clear()
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
        self._owns_ray = False

    def __enter__(self) -> "RayExecutor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["RayExecutor", "ChunkWorker", "dumps", "import_ray", "INSTALL_HINT"]
