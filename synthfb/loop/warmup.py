"""The loop's optional warm-up (``sft:``): data pipeline -> SFT -> round-0 policy.

Before round 0 the loop

1. runs the warm-up's data pipeline once (e.g. seed tasks -> Self-Instruct)
   through the pipeline runner into ``OUT/sft/data`` (chunked, fingerprinted,
   resumable), with the loop's backend, engine options and seed and
   ``sft.model`` (default: the loop's ``policy``) as its model;
2. trains the loop's ``policy`` on its rows with the warm-up trainer of the
   method registry (SFT) into ``OUT/sft/checkpoint``, a resumable step with
   its marker ``OUT/sft/train.json`` (:func:`synthfb.loop.train.train_warmup`).

That checkpoint is the round-0 policy: round 0 samples with it and, with
DPO, uses it as the reference. The phase's record in ``loop.json`` (``sft``)
holds its fingerprint: the pipeline as run (with the hashes of its data files
and templates), the trainer settings and the revisions of the initial policy
and the data model. A finished phase with the same fingerprint and its
checkpoint on disk is reused untouched; otherwise the runner and the training
resume where they stopped.

Method ``humpback`` runs a second phase of the same shape, ``backward``
(``OUT/backward/``): its data pipeline (the reversed seed pairs) and SFT of
the loop's ``policy`` into the backward model M_yx; that checkpoint writes
the candidates' instructions (``synthfb/loop/candidates.py``), not the
round-0 policy.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..engine import Pipeline, Runner, RunResult
from ..llm.types import Generator
from .config import WARMUP_PHASE, LoopConfig, stable_hash
from .state import LoopFolder, now
from .train import train_warmup


def sft_dir(out: Path, phase: str = WARMUP_PHASE) -> Path:
    return Path(out) / phase


def data_pipeline(cfg: LoopConfig, phase: str = WARMUP_PHASE) -> Pipeline:
    """The warm-up's (or ``backward``'s) data pipeline as the loop runs it."""
    w = cfg.warmup(phase)
    return Pipeline.from_dict(cfg.sft_pipeline_data(phase), w.pipeline_dir, source=w.pipeline_source)


def data_metrics(result: RunResult) -> dict[str, Any]:
    """Rows written, each stage's rows and counters, and the fingerprint of
    the last stage (what the training's fingerprint builds on)."""
    stages = result.manifest["stages"]
    return {
        "rows": result.num_rows,
        "stages": [{"kind": s["kind"], "rows_in": s.get("rows_in"), "rows_out": s.get("rows_out"),
                    "counts": s.get("counts", {}), "failed_rows": len(s.get("failures", []))} for s in stages],
        "counts": {k: v for s in stages[1:] for k, v in s.get("counts", {}).items()},
        "fingerprint": stages[-1]["fingerprint"],
        "dataset": str(result.dataset_dir),
    }


def fingerprint(cfg: LoopConfig, pipe: Pipeline, initial: Generator, data_model: Generator,
                phase: str = WARMUP_PHASE) -> str:
    """Everything that shapes the warm-up's (or ``backward``'s) checkpoint."""
    w = cfg.warmup(phase)
    stages = [{"kind": st.kind,
               "data_files": {k: d for k, (_, d) in getattr(st, "data_files", {}).items()},
               "templates": {k: t.sha256 for k, t in getattr(st, "prompt_templates", {}).items()}}
              for st in pipe.stages]
    return stable_hash({"pipeline": cfg.sft_pipeline_data(phase), "stages": stages, "method": w.method,
                        "settings": w.settings, "initial": initial.info.revision,
                        "data_model": data_model.info.revision})


def run_warmup(cfg: LoopConfig, folder: LoopFolder, pool, initial: Generator, progress: bool,
               log, phase: str = WARMUP_PHASE) -> dict[str, Any]:
    """Run (or reuse, or resume) the warm-up (or the ``backward`` phase);
    returns its record (``checkpoint``, ``metrics``), kept in ``loop.json``
    under the phase's name."""
    w = cfg.warmup(phase)
    sdir = sft_dir(folder.out, phase)
    ckpt = (sdir / "checkpoint").resolve()
    pipe = data_pipeline(cfg, phase)
    data_name = cfg.data_model(phase)
    data_gen = pool.get(data_name)
    fp = fingerprint(cfg, pipe, initial, data_gen, phase)
    rec = folder.state.get(phase) or {}
    if (rec.get("status") == "finished" and rec.get("fingerprint") == fp and (ckpt / "config.json").exists()
            and (sdir / "train.json").exists()):
        log(f"{phase}: finished before with the same settings; reusing it")
        return rec
    folder.update(**{phase: {"status": "running", "fingerprint": fp, "started": now()}})
    t0 = time.time()
    log(f"{phase}: data pipeline {pipe.name} ({len(pipe.stages)} stages) with {data_name}")
    res = Runner(pipe, sdir / "data", resume=True, generators={data_name: data_gen}, progress=progress).run()
    dm = data_metrics(res)
    pool.release(data_name)  # free its memory for training (a pinned judge stays)
    t1 = time.time()
    tm = train_warmup(cfg, (initial.info.path, initial.info.revision), dm, sdir, log, w, phase)
    metrics = {"data": dm, "train": tm,
               "seconds": {"data": round(t1 - t0, 3), "train": round(time.time() - t1, 3)}}
    rec = {"status": "finished", "fingerprint": fp, "checkpoint": str(ckpt), "data_model": data_gen.info.to_dict(),
           "initial_policy": initial.info.to_dict(), "metrics": metrics, "finished": now()}
    folder.update(**{phase: rec})
    what = "round-0 policy" if phase == WARMUP_PHASE else "backward model M_yx"
    log(f"{phase}: {dm['rows']} rows, {tm['steps']} steps, final loss {tm.get('final_loss')}; {what} {ckpt}")
    return rec
