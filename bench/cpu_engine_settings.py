"""Which vLLM-CPU engine settings are fastest here: raw ``LLM.generate`` tokens/s.

Each configuration runs in a fresh process (vLLM reads its CPU variables when
its worker starts), on SmolLM2-135M-Instruct (the embedded default model):
``--prompts`` chat prompts x exactly ``--max-tokens`` new tokens
(``ignore_eos``), after a short warm-up. Configurations alternate for
``--reps`` rounds so a noisy shared machine hits all of them alike; the last
lines print each configuration's runs and median.

    python bench/cpu_engine_settings.py [--prompts 32] [--max-tokens 64] [--reps 2] [--only A,B]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# name -> (dtype, environment, engine keyword arguments); "<unset>" removes a variable
CONFIGS: dict[str, tuple[str, dict[str, str], dict]] = {
    "fp32-vllm-default": ("float32", {"VLLM_CPU_NUM_OF_RESERVED_CPU": "<unset>"}, {}),
    "fp32-reserved0": ("float32", {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}, {}),
    "bf16-reserved0": ("bfloat16", {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}, {}),
    "fp32-reserved0-mnbt1024": ("float32", {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}, {"max_num_batched_tokens": 1024}),
    "fp32-reserved0-jemalloc": ("float32", {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "LD_PRELOAD": "<jemalloc>"}, {}),
    "fp32-reserved0-kv4": ("float32", {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_KVCACHE_SPACE": "4"}, {}),
}


def _jemalloc() -> str | None:
    import glob
    import sysconfig

    hits = glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "ray", "core", "libjemalloc.so"))
    return hits[0] if hits else None


def child(name: str, prompts: int, max_tokens: int) -> None:
    from vllm import LLM, SamplingParams

    from synthfb.llm.models import prepare_default_model

    dtype, _, kwargs = CONFIGS[name]
    path = str(prepare_default_model(quiet=True))
    t0 = time.time()
    llm = LLM(model=path, dtype=dtype, enforce_eager=True, max_model_len=2048, seed=0, **kwargs)
    start = time.time() - t0
    tok = llm.get_tokenizer()
    topics = ["rivers", "bread", "the moon", "chess", "bicycles", "tea", "volcanoes", "libraries"]
    msgs = [[{"role": "user", "content": f"Write a short paragraph about {topics[i % len(topics)]} (note {i})."}]
            for i in range(prompts)]
    texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in msgs]
    sp = SamplingParams(temperature=0.7, top_p=0.9, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(texts[:4], SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)  # warm-up
    t0 = time.time()
    outs = llm.generate(texts, sp, use_tqdm=False)
    dt = time.time() - t0
    n = sum(len(c.token_ids) for o in outs for c in o.outputs)
    print("RESULT " + json.dumps({"config": name, "tokens": n, "seconds": round(dt, 2),
                                  "tokens_per_s": round(n / dt, 1), "engine_start_s": round(start, 1)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated configuration names (default: all)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.prompts, args.max_tokens)
        return
    names = [n for n in (args.only.split(",") if args.only else CONFIGS) if n]
    results: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(args.reps):
        for name in names:
            env = dict(os.environ, TOKENIZERS_PARALLELISM="false", VLLM_CPU_KVCACHE_SPACE="1")
            for k, v in CONFIGS[name][1].items():
                if v == "<unset>":
                    env.pop(k, None)
                elif v == "<jemalloc>":
                    lib = _jemalloc()
                    if lib is None:
                        print(f"{name}: no libjemalloc found (ray not installed); skipped", flush=True)
                        break
                    env[k] = lib
                else:
                    env[k] = v
            else:
                proc = subprocess.run([sys.executable, __file__, "--child", name, "--prompts", str(args.prompts),
                                       "--max-tokens", str(args.max_tokens)], env=env, capture_output=True, text=True)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    print(f"{name}: failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}",
                          flush=True)
                    continue
                r = json.loads(line[len("RESULT "):])
                results[name].append(r["tokens_per_s"])
                print(f"rep {rep + 1} {name}: {r['tokens_per_s']} tokens/s ({r['tokens']} tokens in {r['seconds']} s; "
                      f"engine start {r['engine_start_s']} s)", flush=True)
    print(f"\n{args.prompts} chat prompts x {args.max_tokens} tokens, SmolLM2-135M-Instruct, os.cpu_count()="
          f"{os.cpu_count()}")
    for name, xs in results.items():
        med = f"{statistics.median(xs):.1f}" if xs else "n/a"
        print(f"{name:28s} median {med:>7s} tokens/s  runs {xs}")


if __name__ == "__main__":
    main()
