"""The fast ROUGE-L novelty filter must agree exactly with rouge_score."""

from __future__ import annotations

import random

import pytest
from rouge_score import rouge_scorer

from synthfb.stages.filters import (
    RougeLIndex,
    _f1,
    _need_row,
    rouge_tokenize,
    rougel_novel,
    rougel_score,
)

SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)

WORDS = (
    "write a short poem about the sea give three tips for staying healthy "
    "explain how to bake bread list five uses of python describe your favourite "
    "book translate this sentence into french classify the following email as "
    "spam or not summarize article in one paragraph 2 10 42"
).split()

ODD = [
    "",
    "   ",
    "!!! ... ???",
    "-- * --",
    "HeLLo WoRLD hello world",
    "Hello, World! HELLO... world?",
    "abc123 4.5 x2 2x 007",
    "snake_case and kebab-case and CamelCase",
    "tabs\tand\nnewlines\r\nhere",
    "你好世界",
    "请写一首关于大海的诗",
    "Привет мир",
    "Напиши короткое стихотворение",
    "café crème brûlée",
    "naïve façade café",
    "café au lait",
    "ÉCOLE élève",
    "\u212a kelvin \u212a",  # KELVIN SIGN lower-cases to ASCII "k"
    "İstanbul",  # lower-cases to "i" + combining dot
    "ß straße STRASSE",
    "mixed 你好 hello мир world 42",
]


def ref_f1(a: str, b: str) -> float:
    return SCORER.score(a, b)["rougeL"].fmeasure


def perturb(rng: random.Random, words: list[str]) -> list[str]:
    words = list(words)
    for _ in range(rng.randint(1, 3)):
        op = rng.choice("sdir")
        i = rng.randrange(len(words)) if words else 0
        if op == "s" and len(words) > 1:
            j = min(i + 1, len(words) - 1)
            words[i], words[j] = words[j], words[i]
        elif op == "d" and words:
            del words[i]
        elif op == "i":
            words.insert(i, rng.choice(WORDS))
        elif words:
            words[i] = rng.choice(WORDS)
    return words


def dress(rng: random.Random, words: list[str]) -> str:
    """Join words with random case, punctuation and odd snippets."""
    out = []
    for w in words:
        r = rng.random()
        if r < 0.1:
            w = w.upper()
        elif r < 0.2:
            w = w.capitalize()
        out.append(w + rng.choice(["", "", "", ",", ".", "!", "?", "'s", " -"]))
    if rng.random() < 0.15:
        out.insert(rng.randint(0, len(out)), rng.choice(ODD))
    return " ".join(out)


def sentences(rng: random.Random, n: int, dup_share: float = 0.5) -> list[str]:
    """Random sentences, about ``dup_share`` of them near-duplicates."""
    bases: list[list[str]] = []
    out = []
    for _ in range(n):
        if bases and rng.random() < dup_share:
            words = perturb(rng, rng.choice(bases))
        else:
            words = rng.choices(WORDS, k=rng.randint(1, 14))
        bases.append(words)
        out.append(dress(rng, words))
    return out


def test_tokenize_matches_rouge_score():
    rng = random.Random(0)
    tok = SCORER._tokenizer
    for text in ODD + sentences(rng, 500):
        assert rouge_tokenize(text) == tok.tokenize(text), text


def test_pair_scores_match_rouge_score():
    """>= 10,000 pairs: near-duplicates, identical, empty and odd strings."""
    rng = random.Random(1)
    texts = sentences(rng, 1500)
    pairs = []
    for _ in range(4000):  # near-duplicate pairs
        base = rng.choices(WORDS, k=rng.randint(1, 16))
        pairs.append((dress(rng, base), dress(rng, perturb(rng, base))))
    for _ in range(3000):  # unrelated or loosely related pairs
        pairs.append((rng.choice(texts), rng.choice(texts)))
    for _ in range(1500):  # identical (up to case/punctuation)
        t = rng.choice(texts)
        pairs.append((t, t))
        pairs.append((t, dress(rng, rouge_tokenize(t))))
    for a in ODD:  # odd strings against everything odd and some sentences
        for b in ODD + rng.sample(texts, 20):
            pairs.append((a, b))
            pairs.append((b, a))
    assert len(pairs) >= 10_000
    n_equal = 0
    for a, b in pairs:
        ref = ref_f1(a, b)
        ours = rougel_score(a, b)
        assert ours == ref, (a, b, ours, ref)
        assert (ours > 0.7) == (ref > 0.7)
        n_equal += ours == 0.7
    assert n_equal > 0  # the equality edge case was exercised


@pytest.mark.parametrize("threshold", [0.0, 0.1, 1 / 3, 0.5, 2 / 3, 0.7, 0.75, 0.9, 0.95, 1.0])
def test_need_row_matches_brute_force(threshold):
    """The pruning table is the smallest LCS whose float F1 exceeds threshold."""
    for len_a in range(1, 61):
        row = _need_row(len_a, 60, threshold)
        for len_b in range(1, 61):
            cap = min(len_a, len_b) + 1
            brute = next(
                (L for L in range(1, cap) if _f1(L, len_a, len_b) > threshold), cap
            )
            assert row[len_b] == brute, (len_a, len_b)


def reference_novel(candidates, pool, threshold):
    """Straightforward Self-Instruct loop on rouge_score."""
    pool = list(pool)
    keep = []
    for c in candidates:
        novel = all(ref_f1(c, p) <= threshold for p in pool)
        if novel:
            pool.append(c)
        keep.append(novel)
    return keep


@pytest.mark.parametrize("threshold", [0.7, 0.5, 2 / 3])
def test_rougel_novel_matches_reference_loop(threshold):
    rng = random.Random(2)
    texts = sentences(rng, 330, dup_share=0.6) + ["", "!!!", "你好", "café"]
    rng.shuffle(texts)
    pool, candidates = texts[:30], texts[30:]
    keep = rougel_novel(candidates, pool, threshold)
    assert keep == reference_novel(candidates, pool, threshold)
    assert 0 < sum(keep) < len(keep)


def test_index_across_chunks_equals_one_call():
    rng = random.Random(3)
    texts = sentences(rng, 300, dup_share=0.6)
    index = RougeLIndex(texts[:20])
    keep = index.filter(texts[20:150]) + index.filter(texts[150:])
    assert keep == rougel_novel(texts[20:], texts[:20])
    assert len(index) == 20 + sum(keep)


def test_top_k_and_max_score_match_reference():
    rng = random.Random(4)
    texts = sentences(rng, 260, dup_share=0.6)
    pool, queries = texts[:200] + ["", "你好"], texts[200:] + ["", "你好", "zzz"]
    index = RougeLIndex(pool)
    for q in queries:
        scores = [ref_f1(q, p) for p in pool]
        ranked = sorted(((s, i) for i, s in enumerate(scores)), key=lambda x: (-x[0], x[1]))
        assert index.top_k(q, 10) == ranked[:10]
        best = max(scores)
        assert index.max_score(q) == (best, scores.index(best))
        assert index.exceeds(q, 0.7) == (best > 0.7)
    assert RougeLIndex().max_score("hello") == (0.0, -1)
    assert RougeLIndex().top_k("hello") == []


def test_hand_made_cases():
    ten = "a b c d e f g h i j"
    # Exact duplicate (up to case and punctuation) is rejected.
    assert rougel_novel(["A, B; c d E f g h i J!"], [ten]) == [False]
    # F1 exactly 0.7 (LCS 7 of 10 and 10 tokens) is kept: Self-Instruct rejects > 0.7.
    seven_of_ten = "a b c d e f g x y z"
    assert ref_f1(seven_of_ten, ten) == 0.7
    assert rougel_novel([seven_of_ten], [ten]) == [True]
    # 7 of 7 and 13 tokens is 0.7 mathematically but 0.7000000000000001 in
    # rouge_score's floats, so it is rejected, as rouge_score would.
    thirteen = "a b c d e f g u v w x y z"
    assert ref_f1("a b c d e f g", thirteen) > 0.7
    assert rougel_novel(["a b c d e f g"], [thirteen]) == [False]
    # Rejected because of a candidate accepted earlier in the same call.
    assert rougel_novel(["write a poem about the sea", "write a poem about the sea!"], ["hello"]) == [
        True,
        False,
    ]
    # Rejected candidates do not join the pool.
    assert rougel_novel([ten, "a b c d e f g h i", "a b c d e f g h"], [ten]) == [False, False, False]
    # Empty and non-Latin strings tokenize to nothing and score 0 with everything.
    assert rougel_novel(["", "你好世界", "!!!", "Привет"], [""]) == [True, True, True, True]
    assert rougel_novel(["x"], [], threshold=0.0) == [True]
    assert rougel_novel(["x", "y", "x"], [], threshold=0.0) == [True, True, False]
    assert rougel_novel(["", "x"], [], threshold=-0.1) == [True, False]
    assert rougel_novel([ten, ten], [], threshold=1.0) == [True, True]
