"""The model-free parts of KPDDS (Huang et al., "Key-Point-Driven Data
Synthesis with its Enhancement on Mathematical Reasoning", arXiv 2403.02333,
AAAI 2025; specs/methods-2.md section 1): topic names, the Topic
Co-occurrence Probability Matrix (TCPM, Algorithm 1), topic sampling from
it, answer extraction and equivalence, the arithmetic re-check, and the
Consensus Score Vector vote.

Pure functions of their inputs (randomness comes in as a ``random.Random``),
so the stages in :mod:`synthfb.stages.kpdds` stay small and the numbers can
be checked against hand counts (tests/test_kpdds.py).
"""

from __future__ import annotations

import ast
import math
import operator
import random
import re
from collections.abc import Callable, Sequence
from fractions import Fraction

# -- topics --------------------------------------------------------------------------------------------------------


def topic_key(name: str) -> str:
    """A topic's identity: case-folded, whitespace collapsed, the
    "Subject - Subcategory" dash spaced one way ("Geometry-Circles" and
    "geometry  -  circles" are one topic).

    Deviation: the paper merges topics by the cosine similarity of their
    mean key-point embeddings (threshold not given); we merge only names
    that normalise to the same key (no embedding model in the loop)."""
    s = re.sub(r"\s*[-\u2013\u2014]\s*", " - ", name.strip())
    return re.sub(r"\s+", " ", s).casefold()


def build_tcpm(problems: Sequence[dict[str, Sequence[str]]], topics: Sequence[str],
               diagonal_min_kps: int = 5) -> list[list[float]]:
    """Algorithm 1: an N x N zero matrix over ``topics``; for every problem
    (topic -> its key points), add 1 to [i][j] for every ordered pair of
    distinct topics i, j in it, and 1 to [i][i] when topic i has more than
    ``diagonal_min_kps`` key points in that problem; finally log10(x + 1)."""
    index = {t: i for i, t in enumerate(topics)}
    n = len(topics)
    m = [[0.0] * n for _ in range(n)]
    for prob in problems:
        ids = sorted({index[t] for t in prob})
        for i in ids:
            for j in ids:
                if i != j:
                    m[i][j] += 1
        for t, kps in prob.items():
            if len(kps) > diagonal_min_kps:
                m[index[t]][index[t]] += 1
    return [[math.log10(x + 1) for x in row] for row in m]


def _draw(weights: Sequence[float], rng: random.Random) -> int | None:
    """An index drawn with probability proportional to ``weights`` (None if all are 0)."""
    total = sum(weights)
    if total <= 0:
        return None
    x = rng.random() * total
    acc = 0.0
    last = None
    for i, w in enumerate(weights):
        if w > 0:
            acc += w
            last = i
            if x < acc:
                return i
    return last


def sample_topics(tcpm: Sequence[Sequence[float]], k: int, rng: random.Random) -> list[int]:
    """``k`` (2 or 3) topic indices: the first proportional to the TCPM's
    row sums, the second proportional to the first's row, the third to the
    element-wise product of the two chosen rows (section 3.1). Without
    replacement, except that a topic whose row is non-zero only on its
    diagonal may be drawn twice (two practice sets of one topic); when the
    weights are all zero the combination stops early (fewer topics)."""
    n = len(tcpm)
    first = _draw([sum(row) for row in tcpm], rng)
    if first is None:
        return []
    chosen = [first]
    weights = list(tcpm[first])
    while len(chosen) < k:
        w = [0.0 if i in chosen else weights[i] for i in range(n)]
        if not any(w) and len(chosen) == 1 and tcpm[first][first] > 0:
            w = [tcpm[first][first] if i == first else 0.0 for i in range(n)]  # only the diagonal: same topic again
        nxt = _draw(w, rng)
        if nxt is None:
            break
        chosen.append(nxt)
        weights = [a * b for a, b in zip(weights, tcpm[nxt])]
    return chosen


def practice_distribution(tcpm: Sequence[Sequence[float]]) -> list[float]:
    """P(first topic = i): the TCPM's row sums, normalised."""
    sums = [sum(row) for row in tcpm]
    total = sum(sums)
    return [s / total for s in sums] if total else [0.0] * len(sums)


# -- answers -------------------------------------------------------------------------------------------------------

def _boxed(text: str) -> list[str]:
    """Contents of every ``\\boxed{...}`` (balanced braces), in order."""
    out, i = [], 0
    while True:
        i = text.find("\\boxed{", i)
        if i < 0:
            return out
        j, depth = i + len("\\boxed{"), 1
        start = j
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        if depth == 0:
            out.append(text[start:j - 1])
        i = j


_ANSWER_IS = re.compile(r"answer is[:\s]*\$?([^\n$]+?)\$?\s*(?:\.\s*)?$", re.IGNORECASE | re.MULTILINE)


def extract_answers(text: str) -> list[str]:
    """A solution's final answers, one per sub-question: every ``\\boxed{}``,
    else the last "The answer is X"; [] when there is none."""
    boxed = _boxed(text)
    if boxed:
        return [b.strip() for b in boxed]
    m = _ANSWER_IS.findall(text)
    return [m[-1].strip()] if m else []


def normalize_answer(ans: str) -> str:
    """Strip LaTeX wrappers, units words after a number, thousands commas,
    a trailing period, dollar signs and spaces."""
    s = ans.strip().strip("$").strip()
    s = re.sub(r"\\text\{([^}]*)\}", r"\1", s)
    s = re.sub(r"\\(?:left|right|,|!|;|:)", "", s)
    s = s.replace("\\%", "%").replace("\\$", "").replace("dfrac", "frac").replace("tfrac", "frac")
    s = re.sub(r"(?<=\d),(?=\d{3}\b)", "", s)
    s = re.sub(r"^(-?[\d.]+(?:/[\d.]+)?)\s*[a-zA-Z°]+\.?$", r"\1", s)  # "12 cm" -> "12" (a percent sign stays)
    s = s.rstrip(".").replace(" ", "")
    return s


def _number(s: str) -> Fraction | None:
    """A normalised answer as an exact number: integers, decimals, a/b,
    \\frac{a}{b}, percentages (as a/100); None otherwise."""
    m = re.fullmatch(r"\\frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}", s)
    if m:
        s = f"{m.group(1)}/{m.group(2)}"
    pct = s.endswith("%")
    if pct:
        s = s[:-1]
    try:
        if "/" in s:
            a, b = s.split("/", 1)
            v = Fraction(a) / Fraction(b)
        else:
            v = Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None
    return v / 100 if pct else v


def answers_equal(a: str, b: str, rel_tol: float = 1e-6) -> bool:
    """Whether two final answers are the same: numerically (exact
    fractions, else within ``rel_tol``) when both parse as numbers, else
    as normalised strings. (The spec's shared sympy-based module is not in
    the tree yet; numbers and exact strings cover the vote here.)"""
    na, nb = normalize_answer(a), normalize_answer(b)
    if na == nb:
        return True
    x, y = _number(na), _number(nb)
    if x is None or y is None:
        return False
    return x == y or math.isclose(float(x), float(y), rel_tol=rel_tol, abs_tol=1e-12)


# -- arithmetic re-check -----------------------------------------------------------------------------------------------

_OPS: dict[type, Callable[[float, float], float]] = {ast.Add: operator.add, ast.Sub: operator.sub,
                                                      ast.Mult: operator.mul, ast.Div: operator.truediv}
_EQUATION = re.compile(r"([\d\s.,()+\-*/×÷]*\d[\d\s.,()+\-*/×÷]*)=\s*(-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?)")


def _eval(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return float(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval(node.left), _eval(node.right))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_eval(node.operand)
    raise ValueError("not arithmetic")


def arithmetic_errors(text: str, rel_tol: float = 1e-4) -> list[str]:
    """The equations ``<arithmetic> = <number>`` in ``text`` whose left side,
    evaluated in Python, differs from the right (section 3.2: solutions with
    a computational error are dropped). Only lines with at least one
    operator are checked; anything that does not parse is ignored."""
    bad = []
    clean = text.replace("$", "").replace("\\times", "*").replace("\\cdot", "*")
    for m in _EQUATION.finditer(clean):
        lhs, rhs = m.groups()
        k = m.start() + len(lhs) - len(lhs.lstrip())
        if k > 0 and (clean[k - 1].isalnum() or clean[k - 1] in "^_{}\\"):
            continue  # part of a longer expression (2^3 + 1, x + 1, \\frac{..}): not plain arithmetic
        expr = lhs.replace(",", "").replace("×", "*").replace("÷", "/").strip()
        if not re.search(r"[\d)]\s*[+\-*/]\s*[\d(]", expr):
            continue
        try:
            got = _eval(ast.parse(expr, mode="eval"))
        except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
            continue
        want = float(rhs.replace(",", ""))
        if not math.isclose(got, want, rel_tol=rel_tol, abs_tol=1e-9):
            bad.append(f"{expr} = {rhs}")
    return bad


# -- the Consensus Score Vector vote ---------------------------------------------------------------------------------

def consensus_scores(answers: Sequence[Sequence[str]], reduce: str = "max",
                     equal: Callable[[str, str], bool] = answers_equal) -> list[float]:
    """CS(s_i) for m solutions (section 3.2): c_ij = the share of the m
    solutions whose answer to sub-question j is equivalent to s_i's (range
    [1/m, 1]); CS(s_i) = max over j of c_ij (``reduce="min"``: the
    stricter spec option). A solution lacking sub-question j is counted as
    disagreeing there."""
    m = len(answers)
    out = []
    for a in answers:
        cs = []
        for j, x in enumerate(a):
            agree = sum(1 for b in answers if j < len(b) and equal(x, b[j]))
            cs.append(agree / m)
        out.append((max if reduce == "max" else min)(cs) if cs else 0.0)
    return out


def vote(answers: Sequence[Sequence[str]], reduce: str = "max",
         equal: Callable[[str, str], bool] = answers_equal) -> tuple[list[int], list[float]]:
    """(indices kept, CS per solution): every s_i with CS(s_i) = CS_max and
    CS(s_i) > 1/m (all tied winners are kept; nothing when no two agree)."""
    cs = consensus_scores(answers, reduce, equal)
    if not cs:
        return [], cs
    best = max(cs)
    m = len(answers)
    if best <= 1 / m + 1e-12:
        return [], cs
    return [i for i, c in enumerate(cs) if abs(c - best) < 1e-12], cs
