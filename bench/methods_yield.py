"""Benchmark: rows kept per stage by the issue-14 methods on the default model.

    python bench/methods_yield.py [--rows 3] [--pipelines best_of_n,kpdds] [--out DIR]

Runs the shipped pipelines of the methods added in issue 14 (``METHODS``:
best-of-N, KPDDS, consistency-checked answers, RSO pairs, Humpback with
trained models (backward rows, seed rows, one curation iteration) and ReAlign
with BM25 retrieval) on the default model, SmolLM2-135M-Instruct, in float32
on vLLM (one engine for all), on ``--rows`` input rows each, made small the
way ``bench/default_model_yield.py`` does (``small``: the load stage's
``limit``; KPDDS keeps its 10 seeds and asks for ``--rows`` new questions).
Shipped prompts, sampling, filters and thresholds are used as they are.
``humpback_iterate`` names checkpoints (M_yx, M_0) that an earlier training
sequence writes; where they are missing the untrained default model stands
in for both, so its yield says how the parsers and the A_5 filter fare on an
untrained model, not what Humpback yields.

Prints, per pipeline, every stage (model stages and model-free ones): rows
in -> rows out (``kept``), the drop reasons and, for model stages, the model
outputs read and how many parsed (column ``src``: ``stage`` when the stage
records the figure, ``derived`` when ``default_model_yield.DERIVED`` derives
it from the stage's counts); then one line per pipeline with its rows and
time, and last how many of the pipelines ended with rows.

Not run here: the loop files of SPIN, self-rewarding and RFT
(``pipelines/*_smol.yaml``): each trains a model between generation rounds
(minutes to hours on this CPU), which is not a per-stage yield figure;
``synthfb loop`` runs them.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from default_model_yield import HEADER, PIPELINES, context_for, run_small, stage_line, start_engine

METHODS = ("humpback_backward", "humpback_seed", "consistency", "realign", "humpback_iterate", "best_of_n", "kpdds",
           "rso_pairs")
"""The shipped pipelines of the issue-14 methods, in the order they run (model-free first, RSO's 65 samples
per prompt last)."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=3, help="input rows per pipeline (KPDDS: new questions)")
    ap.add_argument("--pipelines", default=",".join(METHODS), help="comma-separated pipeline names")
    ap.add_argument("--out", default="", help="folder for the run folders (default: a temporary one)")
    args = ap.parse_args()

    names = [x.strip().removesuffix(".yaml") for x in args.pipelines.split(",") if x.strip()]
    missing = [n for n in names if not (PIPELINES / f"{n}.yaml").is_file()]
    if missing:
        ap.error(f"--pipelines: no pipelines/{missing[0]}.yaml")
    out_root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="methods_yield-"))
    t_all = time.time()
    gen = start_engine(context_for([PIPELINES / f"{n}.yaml" for n in names]))
    print(f"runs in {out_root}", flush=True)
    summary, with_rows = [], 0
    for name in names:
        res, secs = run_small(PIPELINES / f"{name}.yaml", args.rows, gen, out_root)
        if res is None:
            summary.append(f"{name:<18} FAILED after {secs:.0f} s")
            continue
        print(f"\n== {name}: {res.num_rows} rows out in {secs:.0f} s", flush=True)
        print(HEADER)
        for rec in res.manifest["stages"]:
            print(stage_line(name, rec)[0], flush=True)
        with_rows += res.num_rows > 0
        summary.append(f"{name:<18} {res.num_rows:>4} rows kept  {secs:>6.0f} s")
    gen.close()
    print(f"\n{'pipeline':<18} {'rows':>4}             time")
    print("\n".join(summary))
    print(f"total {time.time() - t_all:.0f} s, {args.rows} input rows each")
    print(f"pipelines with rows: {with_rows}/{len(names)}")


if __name__ == "__main__":
    main()
