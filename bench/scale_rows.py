"""Rows/s and peak memory of a model-free pipeline at 10k, 100k and 1M rows.

The pipeline is ``load`` (content-hash ids, exact duplicates dropped) ->
``backtranslation_segments`` (length and short-line filters, whitespace-
normalised dedupe; whole documents, no header split): the shipped model-free
stages, run by the local runner with its chunk files and the final
``save_to_disk``. Each size runs in a fresh subprocess so its peak resident
set size (``ru_maxrss``) is its own; ``growth`` is the peak minus the RSS
after imports, i.e. what the rows cost. Bounded memory means growth stays
near chunk size x row size plus the dedupe sets (two hashes per row), not
the whole dataset.

    python bench/scale_rows.py [--sizes 10000,100000,1000000] [--chunk-size 2048]

Input rows are synthetic sentences (~150 bytes), ~3% exact duplicates, ~5%
too short for the filter. The last line is the growth ratio of the largest
to the smallest size against their row-count ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the a of to and in river city history water good long short tips three five clear simple helpful "
         "write explain list give describe summarize bridge market garden winter summer light").split()


def make_data(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            k = rng.randrange(i) if i and rng.random() < 0.03 else i  # ~3%: an exact copy of an earlier row
            f.write(json.dumps({"text": _text(random.Random(seed * 1_000_003 + k), k), "n": k}) + "\n")


def _text(rng: random.Random, i: int) -> str:
    if rng.random() < 0.05:
        return f"short {i}"
    return f"Item {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(18, 26))) + "."


def child(data: str, chunk_size: int) -> dict:
    import datasets  # noqa: F401  (imports before the baseline: what the rows cost is measured)

    from synthfb.engine import Pipeline, run_pipeline
    import synthfb.stages  # noqa: F401

    base = _rss()
    work = Path(tempfile.mkdtemp(prefix="synthfb-scale-"))
    pipe = {
        "name": "scale_rows", "backend": "vllm", "model": "tiny", "chunk_size": chunk_size,
        "stages": [
            {"stage": "load", "path": data},
            {"stage": "backtranslation_segments", "split_on_headers": False, "min_chars": 40, "max_chars": 2200,
             "min_line_chars": 0},
        ],
    }
    t = time.perf_counter()
    res = run_pipeline(Pipeline.from_dict(pipe, work, "bench"), work / "run", progress=False)
    dt = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    st = res.manifest["stages"]
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return {"seconds": dt, "rows_out": res.num_rows, "rows_in": st[0]["rows_in"], "peak": peak, "base": base,
            "drops": {**st[0]["counts"], **st[1]["counts"]}}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--chunk-size", type=int, default=2048)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.chunk_size)))
        return 0
    sizes = [int(s) for s in a.sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="synthfb-scale-data-"))
    rows = []
    mib = 2 ** 20
    for n in sizes:
        data = work / f"rows-{n}.jsonl"
        make_data(data, n)
        p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(data),
                            "--chunk-size", str(a.chunk_size)], capture_output=True, text=True)
        data.unlink()
        if p.returncode != 0:
            print(p.stderr[-3000:], file=sys.stderr)
            return 1
        r = json.loads(p.stdout.strip().splitlines()[-1])
        r["n"] = n
        rows.append(r)
        print(f"{n:>9,d} rows  {r['seconds']:7.1f} s  {n / r['seconds']:9,.0f} rows/s  peak RSS {r['peak'] / mib:7.0f} MiB"
              f"  growth {(r['peak'] - r['base']) / mib:6.0f} MiB  kept {r['rows_out']:,d}  {r['drops']}", flush=True)
    work.rmdir()
    if len(rows) > 1:
        lo, hi = rows[0], rows[-1]
        g = (hi["peak"] - hi["base"]) / max(1, lo["peak"] - lo["base"])
        print(f"memory growth {lo['n']:,d} -> {hi['n']:,d} rows: x{g:.1f} for x{hi['n'] / lo['n']:.0f} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
