"""Step 1 of a round: on-policy preference pairs through the pipeline runner.

The loop's ``pairs.stages`` run after a ``load`` of the training prompts,
with the round's policy as the pipeline model and the judge filled into the
stages that judge. The runner does the rest (chunks on disk, fingerprints,
resume after a kill); :func:`pairs_metrics` reads what it recorded.

Round ``k``'s pipeline runs with seed ``seed + k``, so the stages' random
draws (e.g. the few-shot demos of a prompt writer) are fresh each round; the
engines keep the loop's ``seed``. A prompt-writing stage
(``self_instruct_bootstrap``, optionally with its own fixed ``model:``)
writes the round's prompts from the seed prompts; :func:`record_prompts`
copies them to ``round-NN/prompts.jsonl``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..data import ROW_ID
from ..data.io import atomic_write_bytes
from ..engine import Pipeline, Runner, RunResult
from ..llm.types import Generator
from .config import LoopConfig

# drop reasons of the ranking stages that mean "no preference between best and worst"
TIE_REASONS = ("tie",)


def write_prompts(path: Path, prompts: list[Any], extras: list[dict[str, Any]] | None = None) -> Path:
    """The prompts (strings or chat turns) as ``{"id", "prompt"}`` JSON lines
    (plus each prompt's ``extras``: the loop's ``carry_columns``),
    rewritten only when they changed (same bytes every time, so a stage's or
    a training's fingerprint of the file does not change on resume)."""
    extras = extras or [{} for _ in prompts]
    text = "".join(json.dumps({"id": f"p{i:05d}", "prompt": p, **e}, ensure_ascii=False) + "\n"
                   for i, (p, e) in enumerate(zip(prompts, extras)))
    path = Path(path)
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        atomic_write_bytes(path, text.encode("utf-8"))
    return path


def pairs_pipeline(cfg: LoopConfig, k: int, policy: str, prompts_file: Path) -> Pipeline:
    """The pairs pipeline of round ``k`` with ``policy`` generating. For a
    method with ``fixed_candidates`` (humpback) ``prompts_file`` is the
    candidates file (``synthfb/loop/candidates.py``) and the pipeline is
    its ``load`` plus the last pairs stage (the round's model rates them)."""
    fixed = cfg.training.fixed_candidates
    load = ({"stage": "load", "path": str(prompts_file), "id_column": "row_id"} if fixed else
            {"stage": "load", "path": str(prompts_file), "id_column": "id", "require": ["prompt"]})
    data = {
        "name": f"{cfg.name}-round-{k:02d}",
        "description": (cfg.description + "\n\n" if cfg.description else "")
        + (f"Humpback iteration {k + 1}: the fixed candidates rated by {policy}." if fixed
           else f"RLAIF round {k}: on-policy pairs from policy {policy}."),
        "backend": cfg.backend,
        "model": policy,
        "backend_options": cfg.backend_options,
        "models": cfg.models,
        "seed": cfg.seed + k,  # fresh random draws each round (engines keep cfg.seed)
        "chunk_size": cfg.chunk_size,
        "stages": [load] + cfg.stages_for(policy),
    }
    if cfg.license:
        data["license"] = cfg.license
    return Pipeline.from_dict(data, cfg.base_dir, source=f"{cfg.source}: pairs (round {k})")


def run_pairs(cfg: LoopConfig, k: int, policy: str, prompts_file: Path, out: Path,
              generators: dict[str, Generator], progress: bool) -> RunResult:
    """Run (or resume, or reuse) the round's pairs pipeline into ``out``."""
    pipe = pairs_pipeline(cfg, k, policy, prompts_file)
    return Runner(pipe, out, resume=True, generators=generators, progress=progress).run()


def record_prompts(cfg: LoopConfig, k: int, result: RunResult, rdir: Path) -> dict[str, Any] | None:
    """The prompts a prompt-writing stage wrote this round, as ``{"id",
    "prompt", "demo_ids"}`` JSON lines in ``rdir/prompts.jsonl``, and their
    record for the round's metrics: the stage, its model, the seed prompts,
    the prompts written, and how many equal a held-out prompt or an earlier
    round's (counted, not dropped). None without such a stage."""
    from ..data.io import read_tables

    writers = cfg.prompt_writers()
    if not writers:
        return None
    w = writers[0]
    rec = result.manifest["stages"][w["stage"] + 1]  # + 1: the loop's `load`
    sdir = result.out_dir / "stages" / f"{w['stage'] + 1:02d}-{w['kind']}"
    table = read_tables(sorted(sdir.glob("chunk-*.parquet")))
    rows = table.to_pylist() if table is not None else []
    text = "".join(json.dumps({"id": r[ROW_ID], "prompt": r[w["column"]], "demo_ids": r.get("demo_ids")},
                              ensure_ascii=False) + "\n" for r in rows)
    path = rdir / "prompts.jsonl"
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        atomic_write_bytes(path, text.encode("utf-8"))
    earlier: set[str] = set()
    for j in range(k):
        f = rdir.parent / f"round-{j:02d}" / "prompts.jsonl"
        if f.exists():
            earlier.update(json.loads(x)["prompt"] for x in f.read_text(encoding="utf-8").splitlines() if x)
    written = [r[w["column"]] for r in rows]
    model = rec.get("model") or {}
    return {"stage": w["stage"], "kind": w["kind"], "model": model.get("name"), "model_revision": model.get("revision"),
            "fixed_model": w["model"] is not None, "seed_prompts": len(cfg.prompts), "written": len(rows),
            "seed": result.manifest.get("seed"), "file": str(path),
            "in_heldout": sum(p in set(cfg.eval.prompts) for p in written),
            "in_earlier_rounds": sum(p in earlier for p in written)}


def _mean(xs: list[float]) -> float | None:
    xs = [float(x) for x in xs if x is not None and not math.isnan(float(x))]
    return sum(xs) / len(xs) if xs else None


def pairs_metrics(result: RunResult) -> dict[str, Any]:
    """Pairs built, prompts in, ties dropped, the stages' counters (drop
    reasons such as ``all_responses_identical``, truncations, failures), and
    the judge's position bias.

    ``position_bias_gap`` is the mean of the ``position_bias`` column that
    the pairwise rankers record per kept prompt (how much more often the
    response shown first wins; 0 for an order-blind judge), or None when the
    ranker records none (reward models, the additive judge).
    """
    import datasets

    stages = result.manifest["stages"]
    counts: dict[str, int] = {}
    for s in stages[1:]:
        for key, v in s["counts"].items():
            counts[key] = counts.get(key, 0) + v
    ds = datasets.load_from_disk(str(result.dataset_dir))
    cols = ds.column_names
    bias = ds["position_bias"] if "position_bias" in cols else []
    margin = ds["score_margin"] if "score_margin" in cols else []  # the ranker's score gap (its own unit)
    return {
        "prompts": stages[0]["rows_out"],
        "pairs_built": result.num_rows,
        "ties_dropped": sum(counts.get(r, 0) for r in TIE_REASONS),
        "counts": counts,
        "failed_rows": sum(len(s.get("failures", [])) for s in stages),
        "position_bias_gap": _mean(bias),
        "position_bias_prompts": sum(b is not None for b in bias),
        "mean_margin": _mean(margin),
        "fingerprint": stages[-1]["fingerprint"],
        "dataset": str(result.dataset_dir),
    }
