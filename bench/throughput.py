"""Throughput of synthfb vs raw vLLM vs Hugging Face ``generate``, and of the judge path.

The quickstart-shaped workload (``pipelines/quickstart.yaml``: seed
instructions -> ``respond.jinja`` as a chat turn -> one response each,
temperature 0.7, top_p 0.9, up to 200 new tokens), ``--rows`` rows (the
quickstart's seed instructions, numbered so each row is distinct), on one
model, in one run:

* synthfb: the pipeline ``load -> generate`` run by the runner (template
  rendering, chat template, tokenization, provenance, chunk files, the final
  dataset);
* raw:     ``vllm.LLM.generate`` on the same engine object (same dtype and
  engine settings by construction) with the prompts already rendered by the
  chat template (rendering outside the timed window);
* HF:      ``transformers`` ``model.generate`` (same dtype, sampling, left
  padding, batches of ``--hf-batch``).

Tokens/s counts completion tokens (sampling makes lengths differ a little).
The judge path: pairwise A/B contexts (``pairwise_judge.jinja`` on the
generated responses, both options " (A)" and " (B)") scored by log-prob:
synthfb's ``OptionScorer.logprobs`` (one ``Generator.score`` call: chat
template, tokenization, ``prompt_logprobs``) vs the raw caller's same work:
the contexts and the two options tokenized with the same Hugging Face
tokenizer (each context once), joined, and one
``llm.generate(..., SamplingParams(max_tokens=1, prompt_logprobs=0))``; both
sides score the same token ids (checked); tokens/s counts scored prompt
tokens. Each side runs ``--reps`` times, alternating, after a
warm-up; the best of each is compared. The ratios are printed last:
synthfb/raw (goal >= 0.97) and synthfb/HF (goal >= 2.0) for generation,
synthfb/raw for the judge.

    python bench/throughput.py [--model tiny|smollm2|PATH] [--rows 256] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent


def load_quickstart() -> tuple[dict, list[str]]:
    from synthfb.data import yamlio

    pipe = yamlio.load_file(REPO / "pipelines" / "quickstart.yaml")
    seeds = [json.loads(x)["instruction"] for x in (REPO / "pipelines" / "seeds" / "quickstart.jsonl").read_text().splitlines()
             if x.strip()]
    return pipe, seeds


def resolve(model: str, work: Path) -> tuple[str, str]:
    """(path, name) of ``tiny`` (made here), ``smollm2`` (the embedded default) or a path."""
    if model == "tiny":
        from synthfb.llm.tiny import make_tiny_model

        return str(make_tiny_model(work / "tiny")), "tiny"
    from synthfb.llm.models import resolve_model

    return resolve_model("default" if model == "smollm2" else model), model


def best(xs: list[float]) -> float:
    return max(xs) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="tiny | smollm2 | a model folder")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=None, help="default: the quickstart's (200); --quick: 48")
    ap.add_argument("--reps", type=int, default=None, help="timed runs per side (default 2; --quick: 1)")
    ap.add_argument("--hf-batch", type=int, default=32)
    ap.add_argument("--dtype", default="auto", help="auto: bfloat16 on a GPU, else float32")
    ap.add_argument("--no-hf", action="store_true", help="skip the Hugging Face side")
    ap.add_argument("--quick", action="store_true", help="small sizes: 32 rows, 48 tokens, 1 rep")
    a = ap.parse_args()
    if a.quick:
        a.rows = min(a.rows, 32)
    reps = a.reps or (1 if a.quick else 2)

    import torch
    from vllm import SamplingParams as VSP
    from vllm.inputs import TokensPrompt

    from synthfb.engine import Pipeline, run_pipeline
    from synthfb.llm.prompts import PromptTemplate
    from synthfb.llm.vllm_backend import VLLMGenerator
    from synthfb.rank.llm_judge import OptionScorer

    cuda = torch.cuda.is_available()
    dtype = a.dtype if a.dtype != "auto" else ("bfloat16" if cuda else "float32")
    qs, seeds = load_quickstart()
    gen_stage = next(s for s in qs["stages"] if s["stage"] == "generate")
    sampling = dict(gen_stage["sampling"])
    if a.max_tokens or a.quick:
        sampling["max_tokens"] = a.max_tokens or 48
    work = Path(tempfile.mkdtemp(prefix="synthfb-throughput-"))
    path, name = resolve(a.model, work)
    rows = [{"instruction": f"{seeds[i % len(seeds)]} ({i + 1})"} for i in range(a.rows)]
    (work / "seeds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    engine = {k: v for k, v in (qs.get("backend_options") or {}).items() if k != "dtype"}
    pipe = {**{k: v for k, v in qs.items() if k not in ("stages", "backend_options")}, "model": name,
            "stages": [{"stage": "load", "path": str(work / "seeds.jsonl")},
                       {**gen_stage, "prompt": str(REPO / "prompts" / gen_stage["prompt"]), "sampling": sampling}]}
    print(f"model {name} ({path}) | dtype {dtype} | {'cuda' if cuda else 'cpu'} | {a.rows} rows x up to "
          f"{sampling['max_tokens']} tokens | engine {engine} | {reps} rep(s)", flush=True)

    gen = VLLMGenerator(path, seed=0, dtype=dtype, progress=False, name=name, **engine)
    llm = gen.llm
    tok = llm.get_tokenizer()
    template = PromptTemplate.load(str(REPO / "prompts" / gen_stage["prompt"]), REPO)
    texts = [tok.apply_chat_template([{"role": "user", "content": template.render(r)}], tokenize=False,
                                     add_generation_prompt=True) for r in rows]
    sp = VSP(temperature=sampling["temperature"], top_p=sampling["top_p"], max_tokens=sampling["max_tokens"])

    def raw_gen():
        t = time.perf_counter()
        outs = llm.generate(texts, sp, use_tqdm=False)
        dt = time.perf_counter() - t
        return dt, sum(len(o.outputs[0].token_ids) for o in outs), [o.outputs[0].text for o in outs]

    def ours_gen():
        out = work / "run"
        shutil.rmtree(out, ignore_errors=True)
        before = gen.usage.completion_tokens
        t = time.perf_counter()
        res = run_pipeline(Pipeline.from_dict(pipe, work, "bench"), out, generators={name: gen}, progress=False)
        dt = time.perf_counter() - t
        assert res.num_rows == a.rows, res.num_rows
        return dt, gen.usage.completion_tokens - before, None

    # judge contexts from the generated responses: (row i's instruction, response i, response i+1)
    _, _, responses = raw_gen()  # also the warm-up of the raw side
    judge_t = PromptTemplate.load("pairwise_judge.jinja", REPO / "prompts")
    contexts = [judge_t.render({"prompt": rows[i]["instruction"], "response_a": responses[i],
                                "response_b": responses[(i + 1) % len(rows)]}) for i in range(len(rows))]
    scorer = OptionScorer(chat=False)
    items = gen.tokenizer.score_ids([r for c in contexts for r in scorer.requests(c)])
    items = [(ids[-gen.max_model_len:], max(0, start - max(0, len(ids) - gen.max_model_len))) for ids, start in items]
    keep = [i for i in range(0, len(items), 2) if len(items[i][0]) < gen.max_model_len and
            len(items[i + 1][0]) < gen.max_model_len]
    contexts = [contexts[i // 2] for i in keep]
    items = [items[j] for i in keep for j in (i, i + 1)]
    jsp = VSP(max_tokens=1, temperature=0.0, prompt_logprobs=0)

    htok = gen.tokenizer.tok  # the same Hugging Face tokenizer object vLLM was given

    def raw_judge():
        # the raw caller's own work: tokenize each context once and the two options, join them, know where the
        # option starts, one prompt-logprobs call, sum the option's log-probs
        t = time.perf_counter()
        ctx_ids = htok(contexts)["input_ids"]
        opt_ids = htok(list(scorer.options), add_special_tokens=False)["input_ids"]
        joined = [(c + o, len(c)) for c in ctx_ids for o in opt_ids]
        outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids, _ in joined], jsp, use_tqdm=False)
        lps = [sum(o.prompt_logprobs[k][ids[k]].logprob for k in range(s, len(ids))) for (ids, s), o in zip(joined, outs)]
        dt = time.perf_counter() - t
        assert [ids for ids, _ in joined] == [ids for ids, _ in items]  # the same token ids as synthfb scores
        return dt, sum(len(ids) for ids, _ in joined), lps

    def ours_judge():
        before = gen.usage.prompt_tokens
        t = time.perf_counter()
        lp = scorer.logprobs(gen, contexts)
        dt = time.perf_counter() - t
        return dt, gen.usage.prompt_tokens - before, lp.reshape(-1).tolist()

    ours_gen()
    r_lp, o_lp = raw_judge()[2], ours_judge()[2]  # warm-up; both read the same log-probs
    worst = max(abs(x - y) for x, y in zip(r_lp, o_lp)) if r_lp else 0.0
    tps = {k: [] for k in ("raw", "synthfb", "raw judge", "synthfb judge")}
    for rep in range(reps):
        for label, fn in (("raw", raw_gen), ("synthfb", ours_gen), ("raw judge", raw_judge), ("synthfb judge", ours_judge)):
            dt, toks, _ = fn()
            tps[label].append(toks / dt)
            print(f"rep {rep} {label:14s} {dt:8.2f} s  {toks:8d} tokens  {toks / dt:9.1f} tok/s", flush=True)
    gen.close()  # frees the engine before HF loads the model
    import gc

    gc.collect()

    hf = None
    if not a.no_hf:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dev = "cuda" if cuda else "cpu"
        htok = AutoTokenizer.from_pretrained(path)
        htok.padding_side = "left"
        if htok.pad_token_id is None:
            htok.pad_token = htok.eos_token
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(dev).eval()
        torch.manual_seed(0)
        t = time.perf_counter()
        n_tok = 0
        with torch.no_grad():
            for s in range(0, len(texts), a.hf_batch):
                enc = htok(texts[s:s + a.hf_batch], return_tensors="pt", padding=True, add_special_tokens=False).to(dev)
                out = model.generate(**enc, do_sample=True, temperature=sampling["temperature"], top_p=sampling["top_p"],
                                     max_new_tokens=sampling["max_tokens"], pad_token_id=htok.pad_token_id)
                new = out[:, enc["input_ids"].shape[1]:]
                eos = model.generation_config.eos_token_id
                eos = set(eos if isinstance(eos, list) else [eos])
                for row in new.tolist():
                    n = len(row)
                    for k, x in enumerate(row):
                        if x in eos:
                            n = k + 1
                            break
                    n_tok += n
        dt = time.perf_counter() - t
        hf = n_tok / dt
        print(f"hf     {dt:8.2f} s  {n_tok:8d} tokens  {hf:9.1f} tok/s (batch {a.hf_batch})", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    raw, ours, rj, oj = (best(tps[k]) for k in ("raw", "synthfb", "raw judge", "synthfb judge"))
    print(f"judge log-probs: synthfb and raw differ by at most {worst:.2e} nats over {len(r_lp)} options")
    print(f"generate tok/s: synthfb {ours:.1f} | raw vLLM {raw:.1f} | HF {hf if hf is None else round(hf, 1)}")
    print(f"judge scored tok/s: synthfb {oj:.1f} | raw vLLM {rj:.1f}")
    print(f"generate synthfb/raw: {ours / raw:.3f} (goal >= 0.97)")
    if hf is not None:
        print(f"generate synthfb/HF: {ours / hf:.2f} (goal >= 2.0)")
    print(f"judge synthfb/raw: {oj / rj:.3f} (goal >= 0.97)")


if __name__ == "__main__":
    main()
