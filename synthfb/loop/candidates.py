"""Method ``humpback``'s fixed candidates: written once, re-rated every round.

Instruction backtranslation (Li et al. 2023, arXiv 2308.06259, section 2)
has the backward model M_yx write an instruction for every unlabelled
segment once, the candidate set A; iteration t's model M_(t-1) rates *all*
of A again. So before round 0 the loop runs the pairs stages before the last
(e.g. ``backtranslation_segments`` -> ``backtranslate``) on the training
prompts (the documents) with M_yx as the pipeline's model, through the
pipeline runner into ``OUT/candidates/`` (chunked, fingerprinted, resumable),
and writes its rows to ``OUT/data/candidates.jsonl``. Every round's pairs
pipeline is then a ``load`` of that file plus the last stage
(``self_curate``) with the round's model as the curator; M_yx is never asked
again.

The file is rewritten only when its bytes change, so a resumed loop's rounds
see the same fingerprint and are reused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..data.io import write_text_if_changed
from ..engine import Pipeline, Runner
from .config import LoopConfig, LoopError
from .state import LoopFolder, now


def candidates_file(out: Path) -> Path:
    return Path(out) / "data" / "candidates.jsonl"


def backward_model(cfg: LoopConfig, folder: LoopFolder) -> str:
    """M_yx: the checkpoint of the ``backward:`` phase, else the model the backward stage names."""
    if cfg.backward is not None:
        return str((folder.out / "backward" / "checkpoint").resolve())
    named = cfg.given_backward_model()
    if not named:  # load_loop refuses such a file
        raise LoopError(f"{cfg.source}: method {cfg.method!r} needs a backward model (`backward:` or the stage's "
                        f"`model:`)")
    return named


def candidates_pipeline(cfg: LoopConfig, myx: str, prompts_file: Path) -> Pipeline:
    """The training prompts (documents) -> the candidate stages, with M_yx as the model."""
    data = {
        "name": f"{cfg.name}-candidates",
        "description": (cfg.description + "\n\n" if cfg.description else "")
        + f"Candidates written once by the backward model {myx}; every round re-rates all of them.",
        "backend": cfg.backend,
        "model": myx,
        "backend_options": cfg.backend_options,
        "models": cfg.models,
        "seed": cfg.seed,
        "chunk_size": cfg.chunk_size,
        "stages": [{"stage": "load", "path": str(prompts_file), "id_column": "id", "require": ["prompt"]}]
        + cfg.candidate_stages(),
    }
    if cfg.license:
        data["license"] = cfg.license
    return Pipeline.from_dict(data, cfg.base_dir, source=f"{cfg.source}: pairs (candidates)")


def write_candidates(path: Path, rows: list[dict[str, Any]]) -> Path:
    """The candidates as JSON lines, rewritten only when they changed."""
    text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True, default=str) + "\n" for r in rows)
    return write_text_if_changed(path, text)


def run_candidates(cfg: LoopConfig, folder: LoopFolder, pool, myx: str, prompts_file: Path, progress: bool,
                   log) -> dict[str, Any]:
    """Run (or resume, or reuse) the candidates pipeline; returns its record
    (kept in ``loop.json`` as ``candidates``): the backward model, rows,
    the stages' counts, the file and its fingerprint."""
    import datasets

    from .warmup import data_metrics

    pipe = candidates_pipeline(cfg, myx, prompts_file)
    gen = pool.get(myx)
    log(f"candidates: {' -> '.join(st.kind for st in pipe.stages)} with the backward model {myx}")
    res = Runner(pipe, folder.out / "candidates", resume=True, generators={myx: gen}, progress=progress).run()
    dm = data_metrics(res)
    rows = datasets.load_from_disk(str(res.dataset_dir)).to_list() if res.num_rows else []
    if not rows:
        raise LoopError(f"candidates: the pipeline wrote no candidates (stage counts: {dm['counts']}); see "
                        f"{folder.out / 'candidates' / 'run.json'}")
    path = write_candidates(candidates_file(folder.out), rows)
    pool.release(myx)
    rec = {"status": "finished", "backward_model": gen.info.to_dict(), "rows": len(rows), "stages": dm["stages"],
           "counts": dm["counts"], "fingerprint": dm["fingerprint"], "file": str(path), "finished": now()}
    folder.update(candidates=rec)
    log(f"candidates: {len(rows)} written by {myx}")
    return rec
