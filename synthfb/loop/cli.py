"""``synthfb loop LOOP.yaml [--out DIR] [--resume] [--overwrite]``.

Hooked into the main parser with ``add_loop_parser(subparsers)``. Errors in
the loop file or folder are printed as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys


def _trained(t: dict) -> dict:
    """The headline training figures of a round (the method registry's)."""
    from .train import headline

    return headline(t)


def _cmd_loop(args: argparse.Namespace) -> int:
    from ..data.config import ConfigError
    from ..data.owned import FolderError
    from ..data.redact import redact_text
    from ..engine import RunError, StageFailed

    try:
        from ..data.shipped import config_path
        from .runner import run_loop

        result = run_loop(config_path(args.loop), args.out, resume=args.resume, overwrite=args.overwrite,
                          progress=not args.quiet, overrides={"policy": args.policy, "rounds": args.rounds},
                          verbose=args.verbose)
    except (ConfigError, FolderError, RunError) as e:
        print(f"synthfb: error: {redact_text(str(e))}", file=sys.stderr)
        return 2
    except StageFailed as e:
        print(f"synthfb: error: {redact_text(str(e))}", file=sys.stderr)
        return 1
    summary = result.state.get("summary") or {}
    sft = summary.get("sft")
    print(json.dumps({
        "out": str(result.out),
        "policy": result.policy,
        **({"sft": {"rows": sft["rows"], "steps": sft["steps"], "final_loss": sft["final_loss"],
                    "win_rate": (sft.get("vs_initial") or {}).get("win_rate"),
                    "win_rate_ci95": (sft.get("vs_initial") or {}).get("win_rate_ci95")}} if sft else {}),
        "rounds": [{"round": m["round"], "pairs": m["pairs"]["pairs_built"], **_trained(m["train"]),
                    "win_rate": m["eval"]["win_rate"], "win_rate_ci95": m["eval"].get("win_rate_ci95")}
                   for m in result.rounds],
        **({"final_vs_initial": {k: summary["final_vs_initial"].get(k) for k in ("win_rate", "win_rate_ci95")}}
           if summary.get("final_vs_initial") else {}),
        "card": str(result.out / "README.md"),
    }))
    return 0


def add_loop_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``loop`` subcommand to ``subparsers``."""
    from ..train.methods import loop_methods

    methods = "; ".join(f"{k}: {m.help}" + (f" (steps: {' -> '.join(m.steps)})" if m.steps else "")
                        for k, m in loop_methods().items())
    p = subparsers.add_parser(
        "loop", help="run an RLAIF loop: generate -> judge -> DPO (or RM + PPO) -> regenerate, round after round",
        description="Run LOOP.yaml: each round samples on-policy responses with the current policy, has the judge "
                    "rank them into preference pairs, trains the policy with DPO (or, with `method: rm_ppo`, trains "
                    "a reward model on the pairs and the policy with PPO against it), and measures the new policy's "
                    "held-out win rate (with a 95% bootstrap interval, judged by a frozen judge distinct from the "
                    "training ranker) against the round-0 policy. The next round generates with the new "
                    "checkpoint. An `sft:` section first runs a data pipeline (e.g. seeds -> Self-Instruct) and "
                    "SFT on its rows; that checkpoint is the round-0 policy. Rounds and the steps inside them "
                    "resume after a kill (--resume); the loop card is OUT/README.md. "
                    f"Methods (`method:`, the training-method registry shared with `synthfb train`): {methods}. "
                    "`synthfb validate LOOP.yaml` checks a loop file without running it.")
    p.add_argument("loop", help="loop YAML file, or the name of a shipped one (e.g. rlaif_tiny)")
    p.add_argument("--out", help="loop folder (default runs/NAME)")
    p.add_argument("--resume", action="store_true",
                   help="continue the loop in --out: finished rounds, pairs chunks and training checkpoints are reused")
    p.add_argument("--overwrite", action="store_true", help="delete the loop in --out and start afresh")
    p.add_argument("--policy", help="override the round-0 policy (alias, local folder or hub id)")
    p.add_argument("--rounds", type=int, help="override the number of rounds")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also show the engine and library logs on the terminal (they are always written to "
                        "OUT/logs/engine.log, the loop's pipeline runs included)")
    p.set_defaults(func=_cmd_loop)
    return p
