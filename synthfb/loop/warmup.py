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
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..engine import Pipeline, Runner, RunResult
from ..llm.types import Generator
from .config import LoopConfig, stable_hash
from .state import LoopFolder, now
from .train import train_warmup


def sft_dir(out: Path) -> Path:
    return Path(out) / "sft"


def data_pipeline(cfg: LoopConfig) -> Pipeline:
    """The warm-up's data pipeline as the loop runs it."""
    assert cfg.sft is not None
    return Pipeline.from_dict(cfg.sft_pipeline_data(), cfg.sft.pipeline_dir, source=cfg.sft.pipeline_source)


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


def fingerprint(cfg: LoopConfig, pipe: Pipeline, initial: Generator, data_model: Generator) -> str:
    """Everything that shapes the warm-up's checkpoint."""
    assert cfg.sft is not None
    stages = [{"kind": st.kind,
               "data_files": {k: d for k, (_, d) in getattr(st, "data_files", {}).items()},
               "templates": {k: t.sha256 for k, t in getattr(st, "prompt_templates", {}).items()}}
              for st in pipe.stages]
    return stable_hash({"pipeline": cfg.sft_pipeline_data(), "stages": stages, "method": cfg.sft.method,
                        "settings": cfg.sft.settings, "initial": initial.info.revision,
                        "data_model": data_model.info.revision})


def run_warmup(cfg: LoopConfig, folder: LoopFolder, pool, initial: Generator, progress: bool,
               log) -> dict[str, Any]:
    """Run (or reuse, or resume) the warm-up; returns its record
    (``checkpoint``, ``metrics``)."""
    assert cfg.sft is not None
    sdir = sft_dir(folder.out)
    ckpt = (sdir / "checkpoint").resolve()
    pipe = data_pipeline(cfg)
    data_name = cfg.data_model()
    data_gen = pool.get(data_name)
    fp = fingerprint(cfg, pipe, initial, data_gen)
    rec = folder.state.get("sft") or {}
    if (rec.get("status") == "finished" and rec.get("fingerprint") == fp and (ckpt / "config.json").exists()
            and (sdir / "train.json").exists()):
        log("sft: finished before with the same settings; reusing it")
        return rec
    folder.update(sft={"status": "running", "fingerprint": fp, "started": now()})
    t0 = time.time()
    log(f"sft: data pipeline {pipe.name} ({len(pipe.stages)} stages) with {data_name}")
    res = Runner(pipe, sdir / "data", resume=True, generators={data_name: data_gen}, progress=progress).run()
    dm = data_metrics(res)
    pool.release(data_name)  # free its memory for training (a pinned judge stays)
    t1 = time.time()
    tm = train_warmup(cfg, (initial.info.path, initial.info.revision), dm, sdir, log)
    metrics = {"data": dm, "train": tm,
               "seconds": {"data": round(t1 - t0, 3), "train": round(time.time() - t1, 3)}}
    rec = {"status": "finished", "fingerprint": fp, "checkpoint": str(ckpt), "data_model": data_gen.info.to_dict(),
           "initial_policy": initial.info.to_dict(), "metrics": metrics, "finished": now()}
    folder.update(sft=rec)
    log(f"sft: {dm['rows']} rows, {tm['steps']} steps, final loss {tm.get('final_loss')}; round-0 policy {ckpt}")
    return rec
