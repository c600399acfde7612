"""Round data of the loop methods that do not train on a ranker's pairs as
they come (issue #14): a small loop-layer step between a round's pairs
pipeline and its trainer, named by the method's ``round_data`` in the method
registry (:mod:`synthfb.train.methods`) and set up by the loop-file section
of the same name.

- ``spin_pairs`` (SPIN, Chen et al. 2024, arXiv 2401.01335, Eq. 4.7 / Alg. 1):
  each prompt's gold SFT response is ``chosen``, the round's policy's own
  sample for it (from a ``generate`` stage) is ``rejected``; a sample equal
  to the gold response is dropped (specs/methods-2.md 3.3).
- ``best_of_n`` (RAFT, Dong et al. 2023, arXiv 2304.06767; Llama 2 rejection
  sampling, Touvron et al. 2023 section 3.2.3): each prompt's candidates and
  their scores (from ``judge_pairs`` or ``onpolicy_pairs``) -> the highest
  scored one(s) as SFT rows (``prompt``/``completion`` via
  :func:`synthfb.data.trl.sft_row`, all scores kept as metadata). Per-prompt
  argmax by default; ``selection: global_top_frac`` is LMFlow's variant (the
  top fraction of all candidates of the round, one row each).

  The per-prompt ordering is the ``best_of_n`` stage's own
  (:func:`synthfb.stages.best_of_n.select_best`), so a pipeline stage and an
  ``rft`` round pick the same winners.

- ``humpback_union`` (instruction backtranslation, Li et al. 2023, arXiv
  2308.06259, section 2.2 and Algorithm 1): the rows the round's model kept
  (``self_curate``, A_5^(t): tagged S_w) together with the seed rows of the
  loop's ``sft:`` warm-up (tagged S_a), one SFT dataset: the next model
  M_(t+1) is fine-tuned from the base model on seed + A_5^(t) mixed.

Each builder is a pure function of the pipeline's rows and the round number:
``(rows, counts)``; :func:`build_round_data` writes the rows next to the
pairs run (``round-NN/round_data``) and points the round's metrics at them.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from ..data import PROVENANCE, ROW_ID
from ..data.config import option
from ..data.trl import sft_row, trl_pair
from ..stages.best_of_n import select_best
from .config import LoopConfig, stable_hash

# -- what a prompt column holds ---------------------------------------------------------------------------------


def user_turn(prompt: Any) -> tuple[str | None, str]:
    """(system message, user text) of a prompt that is a string or a TRL
    conversational message list (its system turn and last user turn)."""
    if isinstance(prompt, str):
        return None, prompt
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        system = next((m.get("content") for m in prompt if m.get("role") == "system"), None)
        user = [m.get("content") for m in prompt if m.get("role") == "user"]
        if user and isinstance(user[-1], str):
            return system, user[-1]
    raise ValueError(f"a prompt must be a string or a list of chat messages with a user turn, got {prompt!r:.80}")


def _text(value: Any) -> str:
    """A response column's text: a string, or a one-message assistant list."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        value = value[0].get("content")
    if not isinstance(value, str):
        raise ValueError(f"expected a response text, got {value!r:.80}")
    return value


# -- SPIN --------------------------------------------------------------------------------------------------------

@dataclass
class SpinPairsConfig:
    """``spin_pairs:`` (method ``spin``): how a round's samples become SPIN pairs."""

    prompt_column: str = option("prompt", "column of the prompt (a string or chat messages)")
    gold_column: str = option("completion", "column of the gold SFT response (carried from the prompts file: "
                                            "list it in the loop's `carry_columns`)")
    response_column: str = option("response", "column of the round's policy's own sample (a `generate` stage with "
                                              "n: 1, sft_columns: false)")
    format: Literal["conversational", "standard"] = option("conversational", "TRL preference format of the pairs")


def spin_pairs(rows: list[dict[str, Any]], cfg: SpinPairsConfig, k: int) -> tuple[list[dict[str, Any]], dict]:
    """SPIN pairs of round ``k``: chosen = the gold response, rejected = the
    policy's sample (the opponent p_theta_t). A sample identical to the gold
    response (after stripping whitespace) carries no signal and is dropped
    (``dropped_identical_to_gold``)."""
    out, counts = [], {}
    for r in rows:
        gold, own = _text(r[cfg.gold_column]), _text(r[cfg.response_column])
        if gold.strip() == own.strip():
            counts["dropped_identical_to_gold"] = counts.get("dropped_identical_to_gold", 0) + 1
            continue
        system, user = user_turn(r[cfg.prompt_column])
        pair = trl_pair(user, gold, own, cfg.format, system)
        meta = {c: v for c, v in r.items() if c not in (cfg.prompt_column, cfg.gold_column, cfg.response_column,
                                                        "chosen", "rejected")}
        out.append({**meta, **pair, "iteration": k, "selection_rule": "spin: gold response vs own sample"})
    return out, counts


# -- best-of-N (RAFT / Llama 2 rejection sampling) -----------------------------------------------------------------

@dataclass
class BestOfNConfig:
    """``best_of_n:`` (method ``rft``): which of a round's scored samples become its SFT targets."""

    prompt_column: str = option("prompt", "column of the prompt (a string or chat messages)")
    responses_column: str = option("responses", "list column of the N candidates (`responses` after generate + "
                                                "judge_pairs, `all_responses` after onpolicy_pairs)")
    scores_column: str = option("all_scores", "list column of their scores (None: unscored), in the same order")
    selection: Literal["per_prompt", "global_top_frac"] = option(
        "per_prompt", "per_prompt: each prompt's top_k highest scored candidates (RAFT paper, Llama 2); "
                      "global_top_frac: the top `top_frac` of all the round's candidates (LMFlow's code; scores "
                      "of different prompts are then compared, which a reward model does not promise)")
    top_k: int = option(1, "per_prompt: winners kept per prompt", ge=1)
    top_frac: float = option(0.125, "global_top_frac: share of all candidates kept (LMFlow: 1/8)", gt=0, le=1)
    min_score: float | None = option(None, "keep a winner only if its score is >= this (None: no threshold)")
    min_gap: float = option(0.0, "per_prompt: skip a prompt whose best and runner-up scores differ by less than "
                                 "this (0: keep ties; the winner is then the first of the tied)", ge=0)
    format: Literal["conversational", "standard"] = option("conversational", "TRL format of the SFT rows")


def best_indices(scores: list[float | None], top_k: int = 1) -> list[int]:
    """Indices of the ``top_k`` highest scores, best first (None/NaN never
    win; ties go to the earlier candidate): the ``best_of_n`` stage's
    :func:`~synthfb.stages.best_of_n.select_best`."""
    picked, _ = select_best([math.nan if s is None else float(s) for s in scores], top_k)
    return picked


def best_of_n(rows: list[dict[str, Any]], cfg: BestOfNConfig, k: int) -> tuple[list[dict[str, Any]], dict]:
    """The round's winners as SFT rows, with ``score`` (the winner's),
    ``all_scores``, ``rank`` (0 = best), ``winner_gap`` (best minus
    runner-up, None with one scored candidate) and ``iteration``; drops are
    counted by reason (``dropped_no_scored_candidate``,
    ``dropped_gap_below_min``, ``dropped_below_min_score``)."""
    counts: dict[str, int] = {}

    def add(key: str, n: int = 1) -> None:
        counts[key] = counts.get(key, 0) + n

    picked: list[tuple[int, int, float]] = []  # (row, candidate, score)
    if cfg.selection == "per_prompt":
        for ri, r in enumerate(rows):
            scores = r[cfg.scores_column]
            best = best_indices(scores, len(scores))
            if not best:
                add("dropped_no_scored_candidate")
                continue
            if len(best) > 1 and float(scores[best[0]]) - float(scores[best[1]]) < cfg.min_gap:
                add("dropped_gap_below_min")
                continue
            picked += [(ri, i, float(scores[i])) for i in best[:cfg.top_k]]
    else:
        pool = [(ri, i, float(s)) for ri, r in enumerate(rows) for i, s in enumerate(r[cfg.scores_column])
                if s is not None and not math.isnan(float(s))]
        n_keep = math.ceil(cfg.top_frac * len(pool))
        picked = sorted(pool, key=lambda t: (-t[2], t[0], t[1]))[:n_keep]
        picked.sort(key=lambda t: (t[0], -t[2], t[1]))
    out = []
    for ri, i, score in picked:
        if cfg.min_score is not None and score < cfg.min_score:
            add("dropped_below_min_score")
            continue
        r = rows[ri]
        cands, scores = r[cfg.responses_column], r[cfg.scores_column]
        order = best_indices(scores, len(scores))
        gap = float(scores[order[0]]) - float(scores[order[1]]) if len(order) > 1 else None
        system, user = user_turn(r[cfg.prompt_column])
        meta = {c: v for c, v in r.items() if c not in (cfg.prompt_column, "chosen", "rejected", "completion",
                                                        PROVENANCE)}
        out.append({**meta, ROW_ID: f"{r.get(ROW_ID)}/best{order.index(i)}", **sft_row(user, cands[i], system,
                                                                                     cfg.format),
                    "score": score, "rank": order.index(i), "winner_gap": gap, "iteration": k,
                    "selection_rule": f"best_of_n: {cfg.selection}",
                    PROVENANCE: list(r.get(PROVENANCE) or [])})
    return out, counts


# -- Humpback: seed + A_5 ---------------------------------------------------------------------------------------

@dataclass
class HumpbackUnionConfig:
    """``humpback_union:`` (method ``humpback``): the next model's SFT rows, seed + the round's kept candidates."""

    with_seed: bool = option(True, "mix the seed rows (the `sft:` warm-up's rows, tagged S_a) into every round's rows, "
                                   "as the paper does (false: train on A_5 only)")
    prompt_column: str = option("prompt", "SFT prompt column of the curated rows and the seed rows")
    completion_column: str = option("completion", "SFT completion column of the curated rows and the seed rows")


# the columns a training row keeps besides prompt/completion (None where a side lacks them)
HUMPBACK_KEEP = ("instruction", "output", "source", "system_tag", "curation_score")


def humpback_union(rows: list[dict[str, Any]], cfg: HumpbackUnionConfig, k: int,
                   seed_rows: list[dict[str, Any]] | None = None) -> tuple[list[dict[str, Any]], dict]:
    """Iteration ``k + 1``'s training rows: the seed rows (``source: seed``)
    then the round's curated rows A_5^(k+1) (``source: augmented``), each
    with the prompt/completion columns, the Humpback columns of
    :data:`HUMPBACK_KEEP` and ``iteration``; counted as ``seed_rows`` and
    ``curated_rows``."""
    seed_rows = list(seed_rows or []) if cfg.with_seed else []
    out = []
    for r in seed_rows + rows:
        missing = [c for c in (cfg.prompt_column, cfg.completion_column) if r.get(c) is None]
        if missing:
            where = "seed row" if r in seed_rows else "curated row"
            raise ValueError(f"humpback_union: {where} {r.get(ROW_ID)!r} has no {missing} (columns {sorted(r)})")
        out.append({ROW_ID: str(r.get(ROW_ID)), "prompt": r[cfg.prompt_column], "completion": r[cfg.completion_column],
                    **{c: r.get(c) for c in HUMPBACK_KEEP}, "iteration": k,
                    PROVENANCE: list(r.get(PROVENANCE) or [])})
    return out, {"seed_rows": len(seed_rows), "curated_rows": len(rows)}


# -- the registry of round-data builders ---------------------------------------------------------------------------

@dataclass(frozen=True)
class RoundData:
    """A round-data builder: its settings class and function, and the
    columns (config fields) it reads from the pairs pipeline's output."""

    config: type
    build: Callable[[list[dict[str, Any]], Any, int], tuple[list[dict[str, Any]], dict]]
    reads: tuple[str, ...]  # config fields naming the input columns it needs
    uses_seed: bool = False  # also reads the rows of the loop's `sft:` warm-up (``seed_rows=``)


BUILDERS: dict[str, RoundData] = {
    "spin_pairs": RoundData(SpinPairsConfig, spin_pairs, ("prompt_column", "gold_column", "response_column")),
    "best_of_n": RoundData(BestOfNConfig, best_of_n, ("prompt_column", "responses_column", "scores_column")),
    "humpback_union": RoundData(HumpbackUnionConfig, humpback_union, ("prompt_column", "completion_column"),
                                uses_seed=True),
}


def needed_columns(name: str, settings: dict[str, Any]) -> list[str]:
    """The pipeline-output columns the builder ``name`` reads with ``settings``."""
    b = BUILDERS[name]
    cfg = b.config(**settings)
    return [getattr(cfg, f) for f in b.reads]


def build_round_data(cfg: LoopConfig, k: int, pairs: dict[str, Any], rdir: Path,
                     seed: dict[str, Any] | None = None) -> dict[str, Any]:
    """Apply the method's round-data builder (if any) to the round's pairs
    run (``seed``: the warm-up's data record, ``dataset`` and ``fingerprint``,
    for a builder that mixes in the seed rows); returns the round's data metrics with ``dataset`` and
    ``fingerprint`` pointing at the built rows and ``pairs_built`` their
    number (the pipeline's rows stay in ``pipeline_rows``). Deterministic,
    so a resumed round rebuilds the same rows."""
    name = cfg.training.round_data
    if not name:
        return pairs
    import datasets

    b = BUILDERS[name]
    settings = cfg.sections.get(name, {})
    rows = datasets.load_from_disk(pairs["dataset"]).to_list() if pairs["pairs_built"] else []
    if b.uses_seed:
        if seed is None:
            raise ValueError(f"round data {name!r} mixes in the seed rows of the loop's `sft:` warm-up; it has none")
        seed_rows = datasets.load_from_disk(seed["dataset"]).to_list() if seed.get("rows", 1) else []
        built, counts = b.build(rows, b.config(**settings), k, seed_rows=seed_rows)
    else:
        built, counts = b.build(rows, b.config(**settings), k)
    out_dir = rdir / "round_data"
    tmp = rdir / "round_data.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if built:
        datasets.Dataset.from_list(built).save_to_disk(str(tmp))
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)
    else:
        shutil.rmtree(out_dir, ignore_errors=True)
    return {**pairs, "pipeline_rows": pairs["pairs_built"], "pairs_built": len(built),
            "counts": {**pairs["counts"], **{f"{name}_{c}": v for c, v in counts.items()}},
            "round_data": {"builder": name, "settings": asdict(b.config(**settings)), "rows": len(built),
                           "counts": counts},
            "dataset": str(out_dir),
            "fingerprint": stable_hash([pairs["fingerprint"], name, settings, k]
                                       + ([seed["fingerprint"]] if b.uses_seed and seed else []))}
