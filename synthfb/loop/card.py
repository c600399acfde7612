"""The loop's summary (``loop.json`` ``summary``) and card (``OUT/README.md``).

The card says what was trained (initial policy, the warm-up's data pipeline
and SFT, each round's pairs and training), the held-out win rates with their
95% bootstrap intervals, and what judged them: the frozen held-out judge
(model, revision, template, options, orders) next to the training rankers it
is distinct from. It is rewritten after every round from ``loop.json``, so
an unfinished loop has a card of the rounds it finished.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..data.io import atomic_write_bytes
from ..data.redact import redact_text


def _rate(e: dict[str, Any] | None) -> dict[str, Any] | None:
    if not e:
        return None
    return {k: e.get(k) for k in ("win_rate", "win_rate_ci95", "wins", "ties", "losses", "judged",
                                  "position_bias_gap")}


def loop_summary(state: dict[str, Any], rounds: list[dict[str, Any]], final: dict[str, Any] | None) -> dict:
    """The headline numbers of a finished loop: the warm-up (rows, steps,
    loss, win rate vs the initial policy), each round (pairs, the training
    headline, win rate vs the round-0 policy with its interval) and, with a
    warm-up, the final policy vs the initial policy."""
    from .train import headline

    sft = state.get("sft")
    out: dict[str, Any] = {"sft": None, "rounds": [], "final_vs_initial": _rate(final),
                           "eval_judge": state.get("eval_judge"), "training_rankers": state.get("training_rankers")}
    if sft and sft.get("metrics"):
        t = sft["metrics"]["train"]
        out["sft"] = {"rows": sft["metrics"]["data"]["rows"], "steps": t.get("steps"),
                      "final_loss": t.get("final_loss"), "checkpoint": sft.get("checkpoint"),
                      "vs_initial": _rate(sft.get("eval"))}
    for m in rounds:
        out["rounds"].append({"round": m["round"], "pairs": m["pairs"]["pairs_built"], **headline(m["train"]),
                              "vs_round_0": _rate(m["eval"])})
    return out


# the drop reasons of written prompts (synthfb.loop.pairs.REPEAT_REASONS), as the card says them
_REPEATS = {"in_heldout": "repeating a held-out prompt", "in_earlier_rounds": "repeating an earlier round's"}


def _fmt(x: Any, nd: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _row(what: str, e: dict[str, Any] | None, extra: str = "") -> str:
    if not e:
        return f"| {what} | {extra} | - | - | - |"
    ci = e.get("win_rate_ci95")
    ci_s = f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "-"
    wtl = f"{e.get('wins')}/{e.get('ties')}/{e.get('losses')}"
    return f"| {what} | {extra} | {_fmt(e.get('win_rate'))} | {ci_s} | {wtl} |"


def render_card(state: dict[str, Any]) -> str:
    from .train import headline

    cfg = state.get("config") or {}
    ev_cfg = cfg.get("eval") or {}
    judge = state.get("eval_judge") or {}
    init = state.get("initial_policy") or {}
    rounds = [r for r in state.get("rounds", []) if r.get("status") == "finished" and r.get("metrics")]
    sft = state.get("sft") or {}
    summary = state.get("summary") or {}
    lines = [f"# {state.get('name', 'loop')}: RLAIF loop card", ""]
    if state.get("description"):
        lines += [state["description"].strip(), ""]
    lines += [f"Status: {state.get('status')}; {len(rounds)} of {state.get('rounds_planned')} round(s) finished; "
              f"method `{cfg.get('method', 'dpo')}`.", "", "## What was trained", "",
              f"- Initial policy: `{init.get('name')}` (revision `{init.get('revision')}`)."]
    if sft.get("metrics"):
        d, t = sft["metrics"]["data"], sft["metrics"]["train"]
        kinds = " -> ".join(s["kind"] for s in d["stages"])
        lines.append(f"- Warm-up: data pipeline {kinds} written by `{(sft.get('data_model') or {}).get('name')}`: "
                     f"{d['rows']} SFT rows; {t.get('method', 'sft').upper()} {t.get('steps')} steps (loss "
                     f"{_fmt(t.get('first_loss'))} -> {_fmt(t.get('final_loss'))}); its checkpoint is the round-0 "
                     + ("policy: the seed model M_0, round 0's curator (its rows are every round's seed share)."
                        if state.get("candidates") else "policy (and round 0's reference)."))
    bw, cands = state.get("backward") or {}, state.get("candidates") or {}
    if bw.get("metrics"):
        d, t = bw["metrics"]["data"], bw["metrics"]["train"]
        lines.append(f"- Backward model M_yx: data pipeline {' -> '.join(s['kind'] for s in d['stages'])}: "
                     f"{d['rows']} SFT rows (output -> instruction); {t.get('method', 'sft').upper()} "
                     f"{t.get('steps')} steps of the initial policy (loss {_fmt(t.get('first_loss'))} -> "
                     f"{_fmt(t.get('final_loss'))}) into `backward/checkpoint`.")
    if cands.get("rows") is not None:
        bm = cands.get("backward_model") or {}
        lines.append(f"- Candidates: {cands['rows']} (instruction, segment) candidates written once by M_yx "
                     f"`{bm.get('name')}` (revision `{bm.get('revision')}`) through "
                     f"{' -> '.join(s['kind'] for s in cands.get('stages') or [])}; every round re-rates all of "
                     f"them (`data/candidates.jsonl`).")
    for w in state.get("prompt_writers") or []:
        model = w["model"] if isinstance(w["model"], str) else f"`{w['model'].get('name')}` (revision " \
            f"`{w['model'].get('revision')}`; fixed across rounds, not the policy)"
        lines.append(f"- Prompts: written afresh each round by {model}, few-shot from the seed prompts "
                     f"(pairs.stages[{w['stage']}] `{w['kind']}`, demos drawn with seed `seed + round`); in "
                     f"`round-NN/prompts.jsonl`.")
    for r in rounds:
        m = r["metrics"]
        trained = ", ".join(f"{k} {_fmt(v)}" for k, v in headline(m["train"]).items())
        rd = m["pairs"].get("round_data")
        what = (f"{rd['rows']} `{rd['builder']}` rows (from {m['pairs'].get('pipeline_rows')} pipeline rows)"
                if rd else f"{m['pairs']['pairs_built']} pairs")
        cur = m.get("curation")
        if cur:  # humpback
            base = (cur.get("trained_from") or {}).get("path")
            lines.append(f"- Round {m['round']} (iteration {cur['iteration']}): {cur['curator']} "
                         f"`{cur['curator_model'].get('name')}` rated the {cur['candidates']} candidates and kept "
                         f"{cur['kept']} ({cur['kept_name']}); {cur['trained']} = SFT of `{base}` on "
                         f"{cur['seed_rows']} seed + {cur['kept']} kept rows: {trained}.")
            continue
        wp = m["pairs"].get("written_prompts")
        drops = ", ".join(f"{n} {_REPEATS.get(why, why)}" for why, n in ((wp or {}).get("dropped") or {}).items() if n)
        prompts = (f"{wp['written']} prompts (written by `{wp['model']}` from {wp['seed_prompts']} seed prompts"
                   + (f"; dropped: {drops}" if drops else "") + ")" if wp else f"{m['pairs']['prompts']} prompts")
        lines.append(f"- Round {m['round']}: {what} from {prompts} sampled by `{m['policy'].get('name')}`; "
                     f"{m['train'].get('method')}: {trained}.")
    lines += ["", "## Held-out win rates", "",
              f"{len(ev_cfg.get('prompts') or []) or (state.get('heldout_base') or {}).get('prompts')} held-out "
              "prompts (never training prompts), answered with the same decoding by both sides. Win rate = "
              "(wins + ties / 2) / judged prompts.", "",
              "| comparison | policy | win rate | 95% CI | wins/ties/losses |", "|---|---|---|---|---|"]
    if sft.get("eval"):
        lines.append(_row("SFT checkpoint vs initial policy", sft["eval"], "sft/checkpoint"))
    for r in rounds:
        m = r["metrics"]
        lines.append(_row(f"round {m['round']} vs round-0 policy", m["eval"], f"round-{m['round']:02d}/checkpoint"))
    if summary.get("final_vs_initial"):
        lines.append(_row("final policy vs initial policy", summary["final_vs_initial"],
                          f"round-{rounds[-1]['metrics']['round']:02d}/checkpoint" if rounds else ""))
    ci = next((r["metrics"]["eval"].get("ci") for r in rounds if r["metrics"]["eval"].get("ci")), None) or \
        (sft.get("eval") or {}).get("ci")
    if ci:
        lines += ["", f"95% CI: {ci['method']}, {ci['resamples']} resamples, fixed seed {ci['seed']}; it covers "
                      "the choice of held-out prompts, not the judge's own errors."]
    lines += ["", "## What judged", "",
              f"- Held-out judge, frozen across rounds: `{judge.get('name')}` (revision "
              f"`{judge.get('revision')}`), template `{judge.get('template')}` (sha256 "
              f"`{str(judge.get('template_sha256'))[:12]}`), options {judge.get('options')}, "
              f"{'chat turn' if judge.get('chat') else 'raw prompt'}; orders: {judge.get('orders')}."]
    for r in state.get("training_rankers") or []:
        lines.append(f"- Training ranker (the pairs' preferences), distinct from the held-out judge: "
                     f"pairs.stages[{r['stage']}] `{r['kind']}`, model `{r['model']}`, template `{r['template']}` "
                     f"(sha256 `{str(r['template_sha256'])[:12]}`).")
    if not state.get("training_rankers"):
        lines.append("- Training ranker: no LLM judge (a reward model or PairRM ranks the pairs).")
    cites = _method_citations(cfg.get("method") or "dpo")
    if cites:
        lines += ["", "## References", ""] + [f"- {c}" for c in cites]
    lines += ["", "Files: `loop.json` (state, per-round metrics), `round-NN/metrics.json`, `round-NN/eval.json` "
                  "(per-prompt judge log-odds)" + (", `sft/` (warm-up data run, SFT checkpoint, eval)"
                                                   if sft else "")
              + (", `backward/` (M_yx: data run, checkpoint), `candidates/` (the candidates' run), "
                 "`round-NN/round_data` (seed + kept rows)" if state.get("candidates") else "") + ".", ""]
    return redact_text("\n".join(lines))


def _method_citations(name: str) -> tuple[str, ...]:
    """The papers the method registry cites for a loop method (none for an unknown name)."""
    from ..train.methods import METHODS

    m = METHODS.get(name)
    return m.cite if m is not None else ()


def write_card(out: Path, state: dict[str, Any]) -> Path:
    path = Path(out) / "README.md"
    atomic_write_bytes(path, render_card(state).encode("utf-8"))
    return path
