"""Benchmark: exact ROUGE-L novelty filter vs per-pair rouge_score scoring.

    python bench/rouge_filter.py [--n 20000] [--samples 150] [--seed 0]

Generates ``n`` instruction-like strings (seeded: Zipf-distributed words from
a 400-word vocabulary, 5-25 words each, ~25% near-duplicates of an earlier
string made by word swaps/deletions/insertions/replacements). The first 175
are the seed pool, the rest the candidates, as in Self-Instruct.

Ours: ``rougel_novel(candidates, seeds)``, timed end to end.

Reference: the plain Self-Instruct approach, ``scorer.score(candidate, text)``
for every text of the pool (strings, nothing pre-tokenised), stopping at the
first pair over the threshold (early exit, which only helps the reference).
Running it on all candidates is O(n^2) pairs (hours), so it is run for every
k-th candidate against the exact pool that candidate meets (seeds + the
candidates accepted before it by our run); its decision must equal ours on
every sampled candidate, and its total time is extrapolated as
``k * (sum of sampled times)``.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from rouge_score import rouge_scorer  # noqa: E402

from synthfb.stages.filters import rougel_novel  # noqa: E402

N_SEEDS = 175
THRESHOLD = 0.7

FUNCTION_WORDS = (
    "the a an of to and in for on with that this is are be by as from it your "
    "write give list explain describe create generate find make what how why "
    "which who when can you please short given following each into about"
).split()


def make_vocab(rng: random.Random, size: int = 400) -> list[str]:
    """Function words plus pronounceable pseudo-words, deterministic."""
    syll = [c + v for c in "bcdfghklmnprstvz" for v in "aeiou"]
    words = list(FUNCTION_WORDS)
    seen = set(words)
    while len(words) < size:
        w = "".join(rng.choice(syll) for _ in range(rng.randint(1, 3)))
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words


def perturb(rng: random.Random, words: list[str], vocab, weights) -> list[str]:
    """1-3 random word edits: swap, delete, insert or replace."""
    words = list(words)
    for _ in range(rng.randint(1, 3)):
        op = rng.choice("sdir")
        i = rng.randrange(len(words))
        if op == "s" and len(words) > 1:
            j = min(i + 1, len(words) - 1)
            words[i], words[j] = words[j], words[i]
        elif op == "d" and len(words) > 5:
            del words[i]
        elif op == "i":
            words.insert(i, rng.choices(vocab, weights)[0])
        else:
            words[i] = rng.choices(vocab, weights)[0]
    return words


def make_instructions(n: int, seed: int = 0, dup_share: float = 0.25) -> list[str]:
    """``n`` instruction-like strings, ~``dup_share`` near-duplicates."""
    rng = random.Random(seed)
    vocab = make_vocab(rng)
    weights = [1.0 / (r + 1) ** 0.9 for r in range(len(vocab))]
    docs: list[list[str]] = []
    out = []
    for _ in range(n):
        if docs and rng.random() < dup_share:
            words = perturb(rng, rng.choice(docs), vocab, weights)
        else:
            words = rng.choices(vocab, weights, k=rng.randint(5, 25))
        docs.append(words)
        text = " ".join(words)
        text = text[0].upper() + text[1:] + rng.choice([".", "?", ":", ""])
        out.append(text)
    return out


def reference_rejects(scorer, candidate: str, pool: list[str]) -> bool:
    """Per-pair rouge_score, early exit at the first pair over the threshold."""
    for text in pool:
        if scorer.score(candidate, text)["rougeL"].fmeasure > THRESHOLD:
            return True
    return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--samples", type=int, default=150, help="reference samples")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    texts = make_instructions(args.n, args.seed)
    seeds, candidates = texts[:N_SEEDS], texts[N_SEEDS:]
    print(f"{len(texts)} strings: {len(seeds)} seeds + {len(candidates)} candidates, "
          f"threshold {THRESHOLD}")

    t0 = time.perf_counter()
    keep = rougel_novel(candidates, seeds, THRESHOLD)
    ours = time.perf_counter() - t0
    print(f"ours: {ours:.2f} s, accepted {sum(keep)}, rejected {len(keep) - sum(keep)}")

    # Pool each sampled candidate meets: seeds + candidates accepted before it.
    step = max(1, len(candidates) // args.samples)
    sampled = list(range(step - 1, len(candidates), step))
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    pool = list(seeds)
    ref_time, agree, next_i = 0.0, 0, 0
    for j in sampled:
        pool.extend(c for c, k in zip(candidates[next_i:j], keep[next_i:j]) if k)
        next_i = j
        t0 = time.perf_counter()
        rejected = reference_rejects(scorer, candidates[j], pool)
        ref_time += time.perf_counter() - t0
        agree += rejected == (not keep[j])
    if agree != len(sampled):
        sys.exit(f"MISMATCH: decisions differ on {len(sampled) - agree} of {len(sampled)}")
    ref_total = ref_time * step
    n_rej = sum(not keep[j] for j in sampled)
    print(f"reference (rouge_score per pair, early exit): {ref_time:.2f} s measured on "
          f"{len(sampled)} candidates ({n_rej} rejected; every {step}th), extrapolated x{step} -> "
          f"{ref_total:.0f} s for all {len(candidates)}")
    print(f"speedup_vs_rouge_score: {ref_total / ours:.1f}x "
          f"(decisions identical on {len(sampled)} sampled candidates)")


if __name__ == "__main__":
    main()
