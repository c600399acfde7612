"""Reward vs KL(pi || pi_ref) frontier of DPO and PPO on a controlled task.

    python bench/frontier.py [--quick] [--model tiny|PATH] [--device cpu|cuda] [--out DIR]

The shape of Figure 2 (left) of Rafailov et al. 2023, "Direct Preference
Optimization: Your Language Model is Secretly a Reward Model" (arXiv
2305.18290): controlled sentiment generation, where each trained policy is one
point (KL to the reference, expected true reward) and DPO's points lie above
PPO's. Here, on a task a tiny model can learn in minutes on a CPU:

- Texts are sequences of words from a fixed list (``NEUTRAL`` + ``POSITIVE``);
  a prompt is the opening of a text, a completion its continuation.
- The ground-truth reward of a completion is its **positive-word rate**: the
  fraction of its words that are in ``POSITIVE`` (:func:`true_reward`; 0 for a
  completion without words). A sentiment lexicon in place of the paper's
  sentiment classifier: exact, so no learned reward sits between a policy and
  its score.

Steps (all trainers through their public entry points):

1. base model: ``--model tiny`` writes a tiny random Llama
   (:func:`synthfb.llm.tiny.make_tiny_model`); or an HF checkpoint path
   (SmolLM2, a GPU model).
2. SFT start: :func:`synthfb.train.sft.train_sft` on texts whose positive
   rate is drawn per text from ``RATES`` (so the SFT policy's completions vary
   in reward). pi_sft is the start and the reference of every run.
3. preference pairs: two completions per training prompt sampled from pi_sft,
   the one with the higher true reward chosen, ties and unfinished samples
   dropped (the paper's IMDb setup: pairs from the SFT model labelled by the
   reward).
4. DPO (:func:`synthfb.train.dpo.train_dpo`, sigmoid loss) at each beta, and
   PPO (:func:`synthfb.train.ppo.train_ppo`, :func:`true_reward` as its
   ``reward_fn``, rollouts on the transformers backend) at each KL
   coefficient, all from pi_sft.
5. measurement (:func:`measure`), the same for every policy and for pi_sft
   itself: ``eval_samples`` completions per held-out prompt sampled from the
   policy's full distribution (temperature 1, no top-k / top-p), as token ids
   (never re-tokenized); KL = mean over samples of the sequence log-ratio
   sum_t [log pi(y_t) - log pi_ref(y_t)] (EOS included), an unbiased estimate of
   KL(pi || pi_ref) per prompt; reward = mean true reward; +- one standard error.

Frontier rule (:func:`dpo_dominates`): a method's frontier at a KL budget k is
the best reward among its points with KL <= k, pi_sft (KL 0) included for both
methods. DPO dominates PPO when, for every PPO point, DPO's frontier at that
point's KL is >= its reward (i.e. some DPO point, or the start, has <= KL and
>= reward). Also printed: the area under each method's frontier with its
Pareto points joined by straight lines (:func:`frontier_area`), up to the
smaller of the two methods' largest KLs.

Fairness notes, printed with the table: DPO sees ``2 * pairs`` reward labels
of pi_sft samples; PPO sees ``ppo_steps * ppo_prompts * ppo_samples`` labels of
its own samples. Learning rates are per method (``Settings``), fixed across
its hyperparameter sweep.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:  # `python bench/frontier.py` from a checkout
    sys.path.insert(0, str(REPO))

# words of the tiny model's tokenizer corpus (synthfb.llm.tiny), so each is one or two tokens there
POSITIVE = ("good", "better", "best", "helpful", "honest", "clear", "simple", "harmless")
NEUTRAL = tuple(
    "the a of to and in is it for on with as at by from this that water sleep food science history math "
    "music art city river question story poem email code data model task example answer language health "
    "exercise list short long three five why how what when where".split())
RATES = (0.0, 0.1, 0.2, 0.3)  # a text's positive-word rate is one of these (uniformly)
_WORD = re.compile(r"[a-z]+")
_POS = frozenset(POSITIVE)


def positive_rate(text: str) -> float:
    """Fraction of the words of ``text`` (runs of letters, lower-cased) that are in ``POSITIVE``; 0 without words."""
    words = _WORD.findall(text.lower())
    return sum(w in _POS for w in words) / len(words) if words else 0.0


def true_reward(prompts, completions: list[str]) -> list[float]:
    """The ground-truth reward, as PPO's ``reward_fn(prompts, completions)``: :func:`positive_rate` of each completion."""
    return [positive_rate(c) for c in completions]


@dataclass
class Settings:
    """Sizes of one bench run (``FULL`` or ``QUICK``; tests shrink them further)."""

    sft_texts: int = 4000        # SFT rows
    sft_epochs: float = 2.0
    sft_lr: float = 1e-3
    pair_prompts: int = 1500     # training prompts sampled twice from pi_sft for DPO pairs
    dpo_betas: tuple = (0.03, 0.1, 0.3, 1.0)
    dpo_lr: float = 5e-4
    dpo_epochs: float = 2.0
    dpo_batch: int = 32
    ppo_kl_coefs: tuple = (0.01, 0.03, 0.1, 0.3)
    ppo_lr: float = 1e-4
    ppo_steps: int = 30          # PPO iterations (rollouts)
    ppo_prompts: int = 32        # prompts per rollout
    ppo_samples: int = 2         # completions per prompt per rollout
    ppo_minibatch: int = 16      # 4 minibatches per rollout, each one optimizer step per PPO epoch
    ppo_epochs: int = 4
    max_new_tokens: int = 24     # the SFT texts' continuations are 6-10 words (+ EOS)
    eval_prompts: int = 128      # held-out prompts
    eval_samples: int = 4        # completions per held-out prompt
    seed: int = 0


FULL = Settings()
QUICK = Settings(sft_texts=1500, sft_epochs=2.0, pair_prompts=400, dpo_betas=(0.1, 1.0), ppo_kl_coefs=(0.03, 0.3),
                 ppo_steps=8, eval_prompts=48, eval_samples=2)


# --- data ---------------------------------------------------------------------

def make_texts(n: int, seed: int) -> list[dict]:
    """``n`` rows {prompt, completion}: 3-5 opening words, then 6-10 more; each word positive
    with the row's rate (from ``RATES``), else a uniform neutral word."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        rate = rng.choice(RATES)

        def words(k):
            return [rng.choice(POSITIVE) if rng.random() < rate else rng.choice(NEUTRAL) for _ in range(k)]

        rows.append({"prompt": " ".join(words(rng.randint(3, 5))), "completion": " " + " ".join(words(rng.randint(6, 10)))})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- sampling and log-probs -----------------------------------------------------

def load_policy(path: str, device: str):
    from transformers import AutoModelForCausalLM

    import torch

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()


def sample_completions(model, tok, prompt_ids: list[list[int]], n: int, max_new_tokens: int, seed: int,
                       batch_size: int = 64) -> list[list[int]]:
    """``n`` completions per prompt (prompt i's at ``i*n .. i*n+n-1``) sampled from the model's full
    distribution: temperature 1, no top-k, top-p or repetition penalty. Token ids as sampled, cut
    after the first EOS (kept); ``max_new_tokens`` ids when the model did not stop."""
    import torch

    from synthfb.train.collate import pad

    torch.manual_seed(seed)
    dev = next(model.parameters()).device
    eos, pad_id = tok.eos_token_id, tok.pad_token_id
    out: list[list[int]] = []
    for s in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[s:s + batch_size]
        ids = pad(chunk, pad_id, "left").to(dev)
        mask = pad([[1] * len(p) for p in chunk], 0, "left").to(dev)
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                                 top_p=1.0, repetition_penalty=1.0, max_new_tokens=max_new_tokens,
                                 num_return_sequences=n, eos_token_id=eos, pad_token_id=pad_id)
        for row in gen[:, ids.shape[1]:].tolist():
            out.append(row[: row.index(eos) + 1] if eos in row else row)
    return out


def completion_logps(model, prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int,
                     batch_size: int = 64):
    """(N,) summed log-probs of each completion given its prompt (right-padded batches, the DPO trainer's path)."""
    import torch

    from synthfb.train.collate import collate_sequences
    from synthfb.train.logprobs import sequence_logps

    dev = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for s in range(0, len(prompt_ids), batch_size):
            b = collate_sequences(prompt_ids[s:s + batch_size], completion_ids[s:s + batch_size], pad_id, "right")
            lp, _ = sequence_logps(model, b["input_ids"].to(dev), b["attention_mask"].to(dev), b["loss_mask"].to(dev))
            out.append(lp.float().cpu())
    return torch.cat(out)


def decode(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=True)


def measure(policy, ref, tok, prompts: list[str], *, samples: int, max_new_tokens: int, seed: int) -> dict:
    """Sample ``samples`` completions per prompt from ``policy``; return the mean sequence KL to
    ``ref`` (mean of log pi(y|x) - log pi_ref(y|x)), the mean true reward, their standard errors,
    the mean completion length in tokens and the fraction that ended with EOS."""
    from synthfb.train.collate import Tokenizer

    T = Tokenizer(tok)
    p_ids = [T.prompt_ids(p) for p in prompts]
    comps = sample_completions(policy, tok, p_ids, samples, max_new_tokens, seed)
    rep = [p for p in p_ids for _ in range(samples)]
    kl = completion_logps(policy, rep, comps, tok.pad_token_id) - completion_logps(ref, rep, comps, tok.pad_token_id)
    import torch

    r = torch.tensor(true_reward(None, [decode(tok, c) for c in comps]))
    N = len(comps)
    return {"kl": float(kl.mean()), "kl_se": float(kl.std() / math.sqrt(N)) if N > 1 else 0.0,
            "reward": float(r.mean()), "reward_se": float(r.std() / math.sqrt(N)) if N > 1 else 0.0,
            "length": sum(map(len, comps)) / N, "stopped": sum(bool(c) and c[-1] == tok.eos_token_id for c in comps) / N}


def preference_pairs(model, tok, prompts: list[str], *, max_new_tokens: int, seed: int) -> tuple[list[dict], dict]:
    """Two samples per prompt from ``model``; rows {prompt, chosen, rejected, score_chosen,
    score_rejected} with chosen the higher true reward. Ties and samples without EOS (the DPO
    trainer would append one) are dropped; the counts come back too."""
    from synthfb.train.collate import Tokenizer

    T = Tokenizer(tok)
    comps = sample_completions(model, tok, [T.prompt_ids(p) for p in prompts], 2, max_new_tokens, seed)
    rows, ties, unfinished = [], 0, 0
    for i, p in enumerate(prompts):
        a, b = comps[2 * i], comps[2 * i + 1]
        if not (a and a[-1] == tok.eos_token_id and b and b[-1] == tok.eos_token_id):
            unfinished += 1
            continue
        ta, tb = decode(tok, a), decode(tok, b)
        ra, rb = positive_rate(ta), positive_rate(tb)
        if ra == rb:
            ties += 1
            continue
        (c, rc), (r, rr) = sorted([(ta, ra), (tb, rb)], key=lambda x: -x[1])
        rows.append({"prompt": p, "chosen": c, "rejected": r, "score_chosen": rc, "score_rejected": rr})
    return rows, {"prompts": len(prompts), "pairs": len(rows), "ties": ties, "unfinished": unfinished}


# --- training -----------------------------------------------------------------

def train_sft_start(base: str, work: Path, s: Settings, device: str) -> Path:
    from synthfb.train.sft import SFTConfig, train_sft

    data = write_jsonl(work / "sft.jsonl", make_texts(s.sft_texts, s.seed))
    out = work / "sft"
    train_sft(SFTConfig(model=base, dataset=str(data), output_dir=str(out), learning_rate=s.sft_lr, batch_size=32,
                        num_epochs=s.sft_epochs, warmup_steps=10, lr_scheduler="cosine", max_length=64, seed=s.seed,
                        device=device, logging_steps=50))
    return out


def run_dpo(sft: Path, pairs: Path, beta: float, out: Path, s: Settings, device: str) -> dict:
    from synthfb.train.dpo import DPOConfig, train_dpo

    t0 = time.perf_counter()
    res = train_dpo(DPOConfig(model=str(sft), dataset=str(pairs), output_dir=str(out), beta=beta, loss_type="sigmoid",
                              learning_rate=s.dpo_lr, batch_size=s.dpo_batch, num_epochs=s.dpo_epochs, warmup_steps=5,
                              max_length=64, seed=s.seed, device=device, logging_steps=10))
    return {"train_s": time.perf_counter() - t0, "steps": res["steps"], "reward_labels": None}


def run_ppo(sft: Path, prompts: Path, kl_coef: float, out: Path, s: Settings, device: str) -> dict:
    from synthfb.train.ppo import PPOConfig, train_ppo

    t0 = time.perf_counter()
    cfg = PPOConfig(model=str(sft), dataset=str(prompts), output_dir=str(out),
                    reward_function=f"{Path(__file__).resolve()}:true_reward", rollout_backend="transformers",
                    rollout_options={"batch_size": 64, "device": device}, rollout_batch_size=s.ppo_prompts,
                    samples_per_prompt=s.ppo_samples, max_new_tokens=s.max_new_tokens, ppo_epochs=s.ppo_epochs,
                    kl_coef=kl_coef, learning_rate=s.ppo_lr, batch_size=s.ppo_minibatch, max_steps=s.ppo_steps,
                    seed=s.seed, device=device, logging_steps=5)
    res = train_ppo(cfg, reward_fn=true_reward)
    return {"train_s": time.perf_counter() - t0, "steps": res["steps"],
            "reward_labels": s.ppo_steps * s.ppo_prompts * s.ppo_samples}


# --- frontier -----------------------------------------------------------------

RULE = ("DPO dominates PPO: for every PPO point, some DPO point or the SFT start (KL 0) has KL <= "
        "its KL and reward >= its reward")


def best_within(points: list[tuple[float, float]], kl: float) -> float:
    """A frontier at KL budget ``kl``: the best reward among (kl, reward) points with KL <= ``kl`` (-inf if none)."""
    return max((r for k, r in points if k <= kl), default=-math.inf)


def dpo_dominates(dpo: list[tuple[float, float]], ppo: list[tuple[float, float]],
                  start: tuple[float, float]) -> tuple[bool, int]:
    """(whether every PPO point is matched, how many are) under :data:`RULE`; points are (kl, reward)."""
    ok = [best_within(dpo + [start], k) >= r for k, r in ppo]
    return all(ok), sum(ok)


def frontier_area(points: list[tuple[float, float]], start: tuple[float, float], upto: float) -> float:
    """Area under a method's frontier over KL in [0, ``upto``]: its Pareto points (plus the start)
    joined by straight lines, flat after the last. A chord is attainable: mixing the two policies
    per prompt gives the mixed reward at no more than the mixed KL (KL is convex in pi)."""
    pareto, best = [], -math.inf
    for k, r in sorted([(max(k, 0.0), r) for k, r in points] + [start]):
        if r > best:
            pareto.append((k, r))
            best = r
    area = 0.0
    for (k0, r0), (k1, r1) in zip(pareto, pareto[1:] + [(math.inf, pareto[-1][1])]):
        if k0 >= upto:
            break
        k1c = min(k1, upto)
        r1c = r0 if k1 == math.inf else r0 + (r1 - r0) * (k1c - k0) / (k1 - k0)
        area += (r0 + r1c) / 2 * (k1c - k0)
    return area


# --- the bench ------------------------------------------------------------------

def run_bench(model: str, work: Path, s: Settings, device: str = "cpu", log=print) -> dict:
    """Everything above; returns {"rows": [...], "dominates", "matched", "areas", "pairs", "seconds"}.

    ``rows``: one dict per measured policy (method ``sft`` / ``dpo`` / ``ppo``, ``param`` beta or
    kl_coef, and :func:`measure`'s fields), the SFT start first.
    """
    from synthfb.train.loop import load_tokenizer

    t_start = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    if model == "tiny":
        from synthfb.llm.tiny import make_tiny_model

        model = str(make_tiny_model(work / "base-tiny"))
    t0 = time.perf_counter()
    sft = train_sft_start(model, work, s, device)
    log(f"SFT start {sft} ({time.perf_counter() - t0:.0f} s)")
    tok = load_tokenizer(str(sft))
    ref = load_policy(str(sft), device)
    train_prompts = [r["prompt"] for r in make_texts(max(s.pair_prompts, s.ppo_prompts), s.seed + 1)]
    eval_prompts = [r["prompt"] for r in make_texts(s.eval_prompts, s.seed + 2)]
    prompts_path = write_jsonl(work / "prompts.jsonl", [{"prompt": p} for p in train_prompts])
    pairs, pstats = preference_pairs(ref, tok, train_prompts[: s.pair_prompts], max_new_tokens=s.max_new_tokens,
                                     seed=s.seed + 3)
    if not pairs:
        raise RuntimeError(f"no preference pairs from {s.pair_prompts} prompts ({pstats}): the SFT start "
                           "produced only ties or unfinished samples")
    pairs_path = write_jsonl(work / "pairs.jsonl", pairs)
    log(f"preference pairs: {pstats}")

    def point(method: str, param, path: Path | None, info: dict) -> dict:
        pol = ref if path is None else load_policy(str(path), device)
        m = measure(pol, ref, tok, eval_prompts, samples=s.eval_samples, max_new_tokens=s.max_new_tokens,
                    seed=s.seed + 4)
        row = {"method": method, "param": param, **m, **info}
        log(format_row(row))
        return row

    rows = [point("sft", None, work / "sft", {"train_s": 0.0, "steps": 0, "reward_labels": 0})]
    for beta in s.dpo_betas:
        out = work / f"dpo-beta{beta:g}"
        info = run_dpo(sft, pairs_path, beta, out, s, device)
        info["reward_labels"] = 2 * len(pairs)
        rows.append(point("dpo", beta, out, info))
    for c in s.ppo_kl_coefs:
        out = work / f"ppo-kl{c:g}"
        info = run_ppo(sft, prompts_path, c, out, s, device)
        rows.append(point("ppo", c, out, info))
    start = (0.0, rows[0]["reward"])  # the start is the reference: KL 0 by definition
    dpo = [(r["kl"], r["reward"]) for r in rows if r["method"] == "dpo"]
    ppo = [(r["kl"], r["reward"]) for r in rows if r["method"] == "ppo"]
    dom, matched = dpo_dominates(dpo, ppo, start)
    upto = max(0.0, min(max(k for k, _ in dpo), max(k for k, _ in ppo)))
    areas = {"upto": upto, "dpo": frontier_area(dpo, start, upto), "ppo": frontier_area(ppo, start, upto)}
    return {"rows": rows, "dominates": dom, "matched": matched, "areas": areas, "pairs": pstats,
            "seconds": time.perf_counter() - t_start}


HEADER = f"{'method':6s} {'param':>8s} {'KL':>8s} {'+-':>6s} {'reward':>7s} {'+-':>6s} {'len':>5s} {'eos':>5s} {'labels':>7s} {'train_s':>8s}"


def format_row(r: dict) -> str:
    param = "-" if r["param"] is None else f"{r['param']:g}"
    return (f"{r['method']:6s} {param:>8s} {r['kl']:8.3f} {r['kl_se']:6.3f} {r['reward']:7.4f} {r['reward_se']:6.4f} "
            f"{r['length']:5.1f} {r['stopped']:5.2f} {r['reward_labels']:7d} {r['train_s']:8.1f}")


def report(res: dict, s: Settings) -> str:
    lines = ["param: DPO beta / PPO kl_coef; KL: mean sequence log-ratio to the SFT start on held-out prompts; "
             "reward: mean positive-word rate; +-: one standard error; len: tokens; eos: fraction stopped; "
             "labels: true-reward evaluations used in training",
             HEADER] + [format_row(r) for r in res["rows"]]
    a = res["areas"]
    lines.append(f"area under the frontier (Pareto points joined by lines, KL in [0, {a['upto']:.3f}]): "
                 f"DPO {a['dpo']:.4f}, PPO {a['ppo']:.4f}")
    n = sum(r["method"] == "ppo" for r in res["rows"])
    lines.append(f"rule: {RULE}")
    lines.append(f"DPO dominates PPO: {'yes' if res['dominates'] else 'no'} ({res['matched']} of {n} PPO points matched)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help="`tiny` (a tiny random Llama, built here) or an HF checkpoint path")
    ap.add_argument("--quick", action="store_true", help="a few-minute smoke run: fewer points, steps and samples")
    ap.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    ap.add_argument("--out", default=str(HERE / "out" / "frontier"), help="work folder (models, data, metrics)")
    ap.add_argument("--json", default=None, help="also write the rows and verdict to this JSON file")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: 1 for the tiny model on CPU, whose steps are too small to "
                         "share; on a busy machine more threads than free cores make each step many times slower)")
    a = ap.parse_args(argv)
    import os

    import torch

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    threads = a.threads or (1 if device == "cpu" and a.model == "tiny" else None)
    if threads:
        torch.set_num_threads(threads)
    s = QUICK if a.quick else FULL
    tag = "tiny" if a.model == "tiny" else Path(a.model).name
    work = Path(a.out) / f"{tag}-{'quick' if a.quick else 'full'}"
    print(f"model {a.model} | device {device} | threads {torch.get_num_threads()} | {'quick' if a.quick else 'full'} settings: {dataclasses.asdict(s)}",
          flush=True)
    res = run_bench(a.model, work, s, device, log=lambda m: print(m, flush=True))
    print(report(res, s))
    print(f"wall time {res['seconds']:.0f} s")
    if a.json:
        Path(a.json).write_text(json.dumps({k: v for k, v in res.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
