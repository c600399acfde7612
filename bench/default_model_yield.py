"""Benchmark: does the default model work with the shipped prompts?

    python bench/default_model_yield.py [--rows 8] [--pipelines judge_pairs,backtranslation] [--out DIR]
                                        [--scoring text]

Runs every shipped pipeline (``pipelines/*.yaml`` that are pipelines, not
loop files) on the default model, SmolLM2-135M-Instruct, in float32 on the
vLLM backend (the CPU build here; one engine shared by all pipelines), on
small inputs: the load stage reads ``--rows`` rows (documents for
backtranslation, prompts for the feedback pipelines, ...), except that
pipelines with an iterative stage (``self_instruct_bootstrap``,
``alpaca_bootstrap``, ``kpdds_questions``; ``TARGETS``) keep their whole seed
pool (sampled for demos, or, for KPDDS, the topic co-occurrence matrix) and
stop at ``--rows`` new rows, ``--rows`` per step and at most 3 steps. Nothing else changes: the shipped prompts, sampling, filters and
thresholds are used as they are (paper filters are never loosened here;
their drops are reported). ``--scoring text`` runs the label-scoring stages
(judge_pairs, self_curate, realign_classify, self_instruct_classify) on the
parse-text path instead of log-probabilities, for comparison.

Prints per pipeline and model stage: rows in, model outputs read, how many
of them parsed (the rate), rows kept (rows out) and the drop reasons; then
the time per pipeline and in all. The last line is the worst parse rate over
all model stages.

Where the figures come from: a stage that reports ``outputs`` / ``parsed``
counts has them in its run record (``stages[i].parse``; judge_pairs,
self_curate, realign_classify, self_instruct_classify,
self_instruct_instances, alpaca_bootstrap, best_of_n (judge scorer),
rso_pairs, consistency and the four kpdds stages do). For the others they are derived here from the counts the
stage records (column "src" says which; the formulas are in ``DERIVED``):
an output is a completion (or a log-prob read) the stage asked for, and it
"parsed" when the stage could read what it needed from it (a filter that
then drops a readable output is a drop, not a parse failure).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")  # 2 cores: let the model use both
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
PIPELINES = REPO / "pipelines"
TARGETS = {"self_instruct_bootstrap": ("num_instructions", "prompts_per_step"),
           "alpaca_bootstrap": ("num_instructions", "prompts_per_step"),
           "kpdds_questions": ("num_questions", "questions_per_step")}
"""Iterative stages that grow their output to a target: (target field, per-step field)."""
BOOTSTRAP = tuple(TARGETS)
SCORED = ("judge_pairs", "self_curate", "realign_classify", "self_instruct_classify")
"""Stages with a ``scoring: auto|logprobs|text`` option."""


def _c(rec: dict[str, Any], key: str) -> int:
    return int(rec["counts"].get(key, 0))


def _failed(rec: dict[str, Any]) -> int:
    return len({f["row_id"] for f in rec.get("failures") or []})


def _asked(rec: dict[str, Any], *skips: str) -> int:
    return rec["rows_in"] - _failed(rec) - sum(_c(rec, k) for k in skips)


# kind -> (outputs, parsed) from a stage record without its own parse figure
DERIVED: dict[str, Callable[[dict[str, Any]], tuple[int, int]]] = {
    # completions (n per row); a JSON-schema output that fails validation did not parse (truncation is a filter)
    "generate": lambda r: ((_asked(r)) * int(r["config"].get("n") or 1),
                           _asked(r) * int(r["config"].get("n") or 1) - _c(r, "schema_invalid_outputs")),
    # one completion per segment; it parsed when an instruction could be read (length/truncation are filters)
    "backtranslate": lambda r: (_asked(r), _asked(r) - _c(r, "dropped_instruction_empty")),
    # responses per step; parsed when the numbered list gave at least one candidate instruction
    "self_instruct_bootstrap": lambda r: (_c(r, "prompts"), _c(r, "prompts") - _c(r, "responses_without_candidates")),
    # task blocks: well-formed ones parsed, malformed ones not
    "alpaca_bootstrap": lambda r: (_c(r, "candidates") + _c(r, "dropped_malformed_block"), _c(r, "candidates")),
    # one label per unlabelled task; parsed when it reads as yes/no
    "self_instruct_classify": lambda r: (_asked(r, "already_labelled"),
                                         _asked(r, "already_labelled") - _c(r, "unparseable_label")),
    # one completion per task; parsed when it gave at least one kept instance (filters included: a lower bound)
    "self_instruct_instances": lambda r: (_asked(r), _asked(r) - _c(r, "tasks_without_instances")),
    # one label per query; parsed when it names a known category
    "realign_classify": lambda r: (_asked(r, "already_classified"),
                                   _asked(r, "already_classified") - _c(r, "unknown_category")),
    # n candidates per rewritten query; parsed when a revised response could be read
    "realign_rewrite": lambda r: (_asked(r, "category_not_rewritten", "input_too_long") * int(r["config"].get("n") or 1),
                                  _asked(r, "category_not_rewritten", "input_too_long") * int(r["config"].get("n") or 1)
                                  - _c(r, "unparseable_candidates")),
    # a critique and a revision per round (helpfulness samples ask nothing); an empty revision did not parse
    "cai_revise": lambda r: (2 * int(r["config"].get("rounds") or 4) * _asked(r, "helpful_samples"),
                             2 * int(r["config"].get("rounds") or 4) * _asked(r, "helpful_samples")
                             - _c(r, "empty_revisions_kept_previous")),
    # records of runs whose stages did not report outputs/parsed yet (and stages that got no rows)
    "judge_pairs": lambda r: (_c(r, "judgements"), _c(r, "judgements") - sum(
        v for k, v in r["counts"].items() if k.startswith("unparseable_judgements_"))),
    "self_curate": lambda r: (_c(r, "ratings"), _c(r, "ratings") - _c(r, "unparseable_ratings")),
    # option log-probs per labelled pair: always read
    "cai_label": lambda r: (_asked(r, "dropped_fewer_than_two_responses", "dropped_identical_responses"),) * 2,
    # n samples and an A/B log-prob ranking per prompt: the ranking is always read
    "onpolicy_pairs": lambda r: (_asked(r),) * 2,
}


def shipped_pipelines() -> list[Path]:
    import yaml

    from synthfb.loop.config import looks_like_loop

    out = []
    for p in sorted(PIPELINES.glob("*.yaml")):
        if not looks_like_loop(yaml.safe_load(p.read_text())):
            out.append(p)
    return out


def small(path: Path, rows: int, scoring: str = ""):
    """The shipped pipeline on ``rows`` input rows (bootstrap stages: target
    ``rows``); ``scoring`` set on the stages that have the option."""
    import yaml

    from synthfb.engine import Pipeline

    d = yaml.safe_load(path.read_text())
    # humpback_iterate names checkpoints trained earlier in its sequence (M_yx, M_t); where they are not there
    # the default model stands in for each (untrained: its rows say how the parsers fare, not Humpback's yield)
    for holder in (d, *d["stages"]):
        m = holder.get("model")
        if isinstance(m, str) and m.startswith("runs/") and not Path(m).exists():
            print(f"{path.stem}: {m} not found, the default model stands in for it", flush=True)
            holder["model"] = "default"
    kinds = [s["stage"] for s in d["stages"]]
    if not any(k in BOOTSTRAP for k in kinds):
        d["stages"][0]["limit"] = rows
    for st in d["stages"]:
        if st["stage"] in TARGETS:
            target, per_step = TARGETS[st["stage"]]
            st.update({target: rows, per_step: rows, "max_steps": 3})
        if scoring and st["stage"] in SCORED:
            st["scoring"] = scoring
    return Pipeline.from_dict(d, PIPELINES, str(path))


def figures(rec: dict[str, Any]) -> tuple[int, int, str] | None:
    p = rec.get("parse")
    if isinstance(p, dict):
        return p["outputs"], p["parsed"], "stage"
    f = DERIVED.get(rec["kind"])
    if f is None:
        return None
    n, ok = f(rec)
    return n, ok, "derived"


HEADER = (f"{'pipeline':<18} {'stage':<24} {'rows in':>7} {'outputs':>7} {'parsed':>7} {'rate':>7} {'kept':>5}  "
          f"src      drops")


def drops_text(rec: dict[str, Any]) -> str:
    """A stage record's drop reasons (``dropped_*`` counts and failed rows), or '-'."""
    drops = {k.removeprefix("dropped_"): v for k, v in rec["counts"].items() if k.startswith("dropped_")}
    if _failed(rec):
        drops["failed"] = _failed(rec)
    return ", ".join(f"{k} {v}" for k, v in drops.items()) or "-"


def stage_line(name: str, rec: dict[str, Any]) -> tuple[str, float | None]:
    """One table line (``HEADER``) for a stage record and its parse rate
    (None: no model outputs, or a stage without figures: '?'; a stage that
    calls no model shows '-', a model stage that got no rows 0 outputs)."""
    fig = figures(rec) if rec.get("model") else None
    if fig is None and rec.get("model") and rec["rows_in"] == 0:
        fig = 0, 0, "-"
    if fig is None:
        mark = "?" if rec.get("model") else "-"
        return (f"{name:<18} {rec['kind']:<24} {rec['rows_in']:>7} {mark:>7} {mark:>7} {mark:>7} "
                f"{rec['rows_out']:>5}  -        {drops_text(rec)}"), None
    n, ok, src = fig
    rate = ok / n if n else None
    rate_txt = f"{100 * rate:.1f}%" if rate is not None else "n/a"
    return (f"{name:<18} {rec['kind']:<24} {rec['rows_in']:>7} {n:>7} {ok:>7} {rate_txt:>7} "
            f"{rec['rows_out']:>5}  {src:<8} {drops_text(rec)}"), rate


def context_for(paths: list[Path]) -> int:
    """The engine context the pipelines ask for: the largest `backend_options.max_model_len` among them (at least
    2048; e.g. cai_sft's few-shot transcripts need 4096)."""
    import yaml

    return max([2048] + [int((yaml.safe_load(p.read_text()).get("backend_options") or {}).get("max_model_len") or 0)
                         for p in paths])


def start_engine(max_model_len: int = 2048):
    """The default model (SmolLM2-135M-Instruct) in float32 on vLLM, one engine for every pipeline."""
    from synthfb.llm.models import prepare_default_model
    from synthfb.llm.vllm_backend import VLLMGenerator

    t0 = time.time()
    gen = VLLMGenerator(str(prepare_default_model()), seed=0, dtype="float32", max_model_len=max_model_len,
                        name="default", progress=False, max_num_batched_tokens=max(2048, max_model_len))
    print(f"engine: SmolLM2-135M-Instruct float32 on vllm ({time.time() - t0:.0f} s to start)", flush=True)
    return gen


def run_small(path: Path, rows: int, gen, out_root: Path, scoring: str = ""):
    """``small(path, rows, scoring)`` run on ``gen`` into ``out_root/<name>``:
    (the RunResult, or None when the run failed (reported), seconds)."""
    from synthfb.engine import run_pipeline

    t0 = time.time()
    try:
        res = run_pipeline(small(path, rows, scoring), out_root / path.stem, generators={"default": gen},
                           progress=False)
    except Exception as e:  # noqa: BLE001 - report and go on with the next pipeline
        print(f"{path.stem}: FAILED after {time.time() - t0:.0f} s: {type(e).__name__}: {e}", flush=True)
        return None, time.time() - t0
    return res, time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=8, help="input rows per pipeline (bootstrap: instructions)")
    ap.add_argument("--pipelines", default="", help="comma-separated names (default: every shipped pipeline)")
    ap.add_argument("--scoring", default="", choices=["", "logprobs", "text"],
                    help="override `scoring` of the label-scoring stages (default: as shipped, auto)")
    ap.add_argument("--out", default="", help="folder for the run folders (default: a temporary one)")
    args = ap.parse_args()

    paths = shipped_pipelines()
    if args.pipelines:
        want = {x.strip().removesuffix(".yaml") for x in args.pipelines.split(",") if x.strip()}
        paths = [p for p in paths if p.stem in want]
    out_root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="default_model_yield-"))
    t_all = time.time()
    gen = start_engine(context_for(paths))
    print(f"runs in {out_root}", flush=True)
    worst: tuple[float, str] | None = None
    lines = []
    for path in paths:
        res, secs = run_small(path, args.rows, gen, out_root, args.scoring)
        if res is None:
            lines.append(f"{path.stem}: FAILED")
            worst = (0.0, f"{path.stem} (failed)")
            continue
        print(f"\n== {path.stem}: {res.num_rows} rows out in {secs:.0f} s", flush=True)
        print(HEADER)
        for rec in res.manifest["stages"]:
            if not rec.get("model"):
                continue
            line, rate = stage_line(path.stem, rec)
            print(line, flush=True)
            if rate is not None and (worst is None or rate < worst[0]):
                worst = (rate, f"{path.stem}/{rec['kind']}")
        lines.append(f"{path.stem}: {res.num_rows} rows, {secs:.0f} s")
    gen.close()
    print("\n" + "; ".join(lines))
    print(f"total {time.time() - t_all:.0f} s for {len(paths)} pipelines, {args.rows} rows each")
    if worst is None:
        print("worst parse rate: n/a (no model stage reported outputs)")
    else:
        print(f"worst parse rate: {100 * worst[0]:.1f}% ({worst[1]})")


if __name__ == "__main__":
    main()
