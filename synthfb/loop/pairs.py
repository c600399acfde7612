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
copies them to ``round-NN/prompts.jsonl``, and :func:`drop_repeated_prompts`
takes the pairs of a written prompt that repeats a held-out prompt or an
earlier round's out of the round's training data (texts compared casefolded,
whitespace collapsed).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..data import ROW_ID
from ..data.io import write_text_if_changed
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
    return write_text_if_changed(Path(path), text)


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


# why a written prompt is dropped, checked in this order: it repeats a held-out prompt, or a prompt an earlier
# round wrote
REPEAT_REASONS = ("in_heldout", "in_earlier_rounds")


def normalize_prompt(text: Any) -> str:
    """A prompt's text for repeat checks: casefolded, whitespace collapsed."""
    return " ".join(str(text).casefold().split())


def record_prompts(cfg: LoopConfig, k: int, result: RunResult, rdir: Path) -> dict[str, Any] | None:
    """The prompts a prompt-writing stage wrote this round, as ``{"id",
    "prompt", "demo_ids", "dropped"}`` JSON lines in ``rdir/prompts.jsonl``
    (``dropped``: null, or the reason of :data:`REPEAT_REASONS` when the
    prompt repeats a held-out prompt or one an earlier round wrote, compared
    by :func:`normalize_prompt`), and their record for the round's metrics:
    the stage, its model, the seed prompts, the prompts written, the drops
    by reason (``in_heldout``, ``in_earlier_rounds``, also under
    ``dropped``), ``kept`` and ``dropped_ids``. None without such a stage."""
    from ..data.io import read_tables

    writers = cfg.prompt_writers()
    if not writers:
        return None
    w = writers[0]
    rec = result.manifest["stages"][w["stage"] + 1]  # + 1: the loop's `load`
    sdir = result.out_dir / "stages" / f"{w['stage'] + 1:02d}-{w['kind']}"
    table = read_tables(sorted(sdir.glob("chunk-*.parquet")))
    rows = table.to_pylist() if table is not None else []
    heldout = {normalize_prompt(p) for p in cfg.eval.prompts}
    earlier: set[str] = set()
    for j in range(k):
        f = rdir.parent / f"round-{j:02d}" / "prompts.jsonl"
        if f.exists():
            earlier.update(normalize_prompt(json.loads(x)["prompt"])
                           for x in f.read_text(encoding="utf-8").splitlines() if x)
    dropped: dict[str, str] = {}  # row id -> reason
    for r in rows:
        norm = normalize_prompt(r[w["column"]])
        reason = "in_heldout" if norm in heldout else "in_earlier_rounds" if norm in earlier else None
        if reason:
            dropped[r[ROW_ID]] = reason
    text = "".join(json.dumps({"id": r[ROW_ID], "prompt": r[w["column"]], "demo_ids": r.get("demo_ids"),
                               "dropped": dropped.get(r[ROW_ID])}, ensure_ascii=False) + "\n" for r in rows)
    path = write_text_if_changed(rdir / "prompts.jsonl", text)
    by_reason = {why: sum(v == why for v in dropped.values()) for why in REPEAT_REASONS}
    model = rec.get("model") or {}
    return {"stage": w["stage"], "kind": w["kind"], "model": model.get("name"), "model_revision": model.get("revision"),
            "fixed_model": w["model"] is not None, "seed_prompts": len(cfg.prompts), "written": len(rows),
            "seed": result.manifest.get("seed"), "file": str(path), **by_reason, "dropped": by_reason,
            "kept": len(rows) - len(dropped), "dropped_ids": sorted(dropped)}


def drop_repeated_prompts(pm: dict[str, Any], written: dict[str, Any], rdir: Path) -> dict[str, Any]:
    """The round's pairs without those of the written prompts
    :func:`record_prompts` dropped (rows matched by row id, or ``id/k`` where a stage
    made several rows of one prompt): written to
    ``rdir/pairs_kept`` when any is dropped, with the metrics pointing at
    them (``pairs_built``, ``dataset``, ``fingerprint``) and the drops counted
    as ``dropped_prompt_<reason>`` (in prompts) and
    ``dropped_prompt_pairs`` (pairs removed). Unchanged when none is."""
    import shutil

    import datasets

    from .config import stable_hash

    ids = set(written["dropped_ids"])
    counts = {f"dropped_prompt_{why}": n for why, n in written["dropped"].items() if n}
    if not ids:
        return pm
    ds = datasets.load_from_disk(pm["dataset"]) if pm["pairs_built"] else None
    def written_by(rid: Any) -> bool:  # a pair of a dropped prompt: its id, or id/k where a stage made several
        rid = str(rid)
        return rid in ids or any(rid.startswith(f"{i}/") for i in ids)

    rows = [r for r in ds.to_list() if not written_by(r.get(ROW_ID))] if ds is not None else []
    out_dir, tmp = rdir / "pairs_kept", rdir / "pairs_kept.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    if rows:
        datasets.Dataset.from_list(rows, features=ds.features).save_to_disk(str(tmp))
        tmp.rename(out_dir)
    removed = pm["pairs_built"] - len(rows)
    return {**pm, "pairs_built": len(rows), "dataset": str(out_dir),
            "counts": {**pm["counts"], **counts, "dropped_prompt_pairs": removed},
            "fingerprint": stable_hash([pm["fingerprint"], "drop_repeated_prompts", sorted(ids)])}


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
