"""Overhead of the synthfb runner over raw ``vllm.LLM.generate``.

The same N prompts (default 2000) on the same tiny random Llama and the same
engine, in one run:

* raw:     ``llm.generate(prompts, SamplingParams(...))`` on prompt strings;
* synthfb: a pipeline ``load -> generate`` (raw prompts, same sampling) run by
           the runner: reading the seed file, template rendering, provenance,
           atomic Parquet chunk writes and the final ``save_to_disk``.

Each side runs ``--reps`` times, alternating, after one warm-up each; the
best time of each side is compared (completion tokens per second, since
sampling makes lengths differ slightly). The last line is the ratio
synthfb/raw (target >= 0.95).

    python bench/overhead.py [--n 2000] [--max-tokens 32] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--chunk-size", type=int, default=2048)
    args = ap.parse_args()

    from vllm import SamplingParams as VSP

    from synthfb.engine import Pipeline, run_pipeline
    from synthfb.llm.tiny import make_tiny_model
    from synthfb.llm.vllm_backend import VLLMGenerator

    work = Path(tempfile.mkdtemp(prefix="synthfb-bench-"))
    model = make_tiny_model(work / "tiny")
    prompts = [f"Write item {i} about the history of the city river and give three tips." for i in range(args.n)]
    (work / "seeds.jsonl").write_text("".join(json.dumps({"instruction": p}) + "\n" for p in prompts))
    pipe = {
        "name": "overhead",
        "backend": "vllm",
        "model": "tiny",
        "chunk_size": args.chunk_size,
        "stages": [
            {"stage": "load", "path": str(work / "seeds.jsonl")},
            {"stage": "generate", "input_column": "instruction", "chat": False,
             "sampling": {"temperature": 0.8, "top_p": 1.0, "max_tokens": args.max_tokens}},
        ],
    }
    gen = VLLMGenerator(str(model), seed=0, dtype="float32", max_model_len=2048, progress=False, name="tiny")
    llm = gen.llm
    sp = VSP(temperature=0.8, top_p=1.0, max_tokens=args.max_tokens)

    def raw() -> tuple[float, int]:
        t = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        dt = time.perf_counter() - t
        return dt, sum(len(o.outputs[0].token_ids) for o in outs)

    def ours() -> tuple[float, int]:
        out = work / "run"
        shutil.rmtree(out, ignore_errors=True)
        before = gen.usage.completion_tokens
        t = time.perf_counter()
        pipeline = Pipeline.from_dict(pipe, work, "bench")
        res = run_pipeline(pipeline, out, generators={"tiny": gen}, progress=False)
        dt = time.perf_counter() - t
        assert res.num_rows == args.n, res.num_rows
        return dt, gen.usage.completion_tokens - before

    raw(), ours()  # warm-up
    best_raw, best_ours = None, None
    for rep in range(args.reps):
        for name, fn in (("raw", raw), ("synthfb", ours)):
            dt, toks = fn()
            tps = toks / dt
            print(f"rep {rep} {name:8s} {dt:7.3f} s  {toks} tokens  {tps:9.0f} tok/s  {args.n / dt:7.1f} req/s",
                  flush=True)
            if name == "raw":
                best_raw = max(best_raw or 0, tps)
            else:
                best_ours = max(best_ours or 0, tps)
    gen.close()
    shutil.rmtree(work, ignore_errors=True)
    print(f"best raw {best_raw:.0f} tok/s, best synthfb {best_ours:.0f} tok/s ({args.n} prompts x {args.max_tokens} tokens)")
    print(f"throughput ratio synthfb/raw: {best_ours / best_raw:.3f}")


if __name__ == "__main__":
    main()
