"""The loop folder and its state file ``loop.json``.

Layout::

    OUT/loop.json                  state: config, status, the warm-up's record, one record per round
                                   (policy, checkpoint, metrics), the held-out judge, the summary
    OUT/README.md                  the loop card: what was trained, win rates with 95% intervals, what judged
    OUT/data/prompts.jsonl         the training prompts (id, prompt), the same every round
    OUT/sft/data/                  warm-up (`sft:`): its data pipeline's run folder (run.json, stages/, dataset/)
    OUT/sft/train.json, checkpoint/  warm-up: SFT fingerprint and metrics; the SFT checkpoint = round-0 policy
    OUT/sft/heldout-initial.json   warm-up: the initial `policy`'s held-out answers
    OUT/sft/eval.json              warm-up: the SFT checkpoint vs the initial `policy` (held-out win rate)
    OUT/final-eval.json            warm-up: the last round's policy vs the initial `policy`
    OUT/backward/                  method humpback: the backward model M_yx's phase (data/, train.json, checkpoint/)
    OUT/candidates/, OUT/data/candidates.jsonl  method humpback: the candidates M_yx wrote once (run folder, rows)
    OUT/heldout-base.json          round-0 policy responses to the held-out prompts (generated once)
    OUT/round-00/pairs/            the round's pairs run (a synthfb run folder: run.json, stages/, dataset/)
    OUT/round-00/prompts.jsonl     with a prompt-writing pairs stage: the prompts it wrote this round
    OUT/round-00/train.json        training fingerprint, status and metrics
    OUT/round-00/checkpoint/       the trained policy (HF folder; checkpoint-N/ while training)
    OUT/round-00/eval.json         held-out responses, judge matrices, win rate
    OUT/round-00/metrics.json      the round's metrics (also in loop.json)

Every file is written atomically (temporary name, fsync, rename), so a
``kill -9`` leaves either the old or the new version.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..data.io import atomic_write_json
from ..data.redact import redact_obj
from ..data.owned import FolderError, OwnedFolder, check_folder
from .config import LoopError


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file written by the loop, or None when absent."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:  # only a non-atomic writer could cause this
        raise LoopError(f"{path}: corrupt state file ({e}); remove it to redo that step") from None


def round_dir(out: Path, k: int) -> Path:
    return Path(out) / f"round-{k:02d}"


class LoopFolder:
    """Owns ``OUT`` (see :mod:`synthfb.data.owned`): a new or empty folder, or
    synthfb's own loop with resume/overwrite; holds its lock while running
    (taken before anything in it changes) and keeps ``loop.json`` current.
    ``overwrite`` deletes only what the loop wrote there."""

    def __init__(self, out: Path, *, resume: bool, overwrite: bool):
        self.out = Path(out).resolve()
        self.path = self.out / "loop.json"
        if resume and overwrite:
            raise LoopError("--resume and --overwrite exclude each other")
        self._mode = "overwrite" if overwrite else "resume" if resume else "new"
        hint = ("pass --resume to continue it (finished rounds and steps are reused) or --overwrite to start "
                "afresh")
        try:  # refuse at once (reads only); the lock is taken in __enter__
            check_folder(self.out, "loop", self._mode, hint)
        except FolderError as e:
            raise LoopError(str(e)) from None
        self._folder = OwnedFolder(self.out, "loop", self._mode, flag_hint=hint)

    def __enter__(self) -> "LoopFolder":
        try:
            self._folder.acquire()
        except FolderError as e:
            raise LoopError(str(e)) from None
        self.state = read_json(self.path) or {}
        return self

    def __exit__(self, *exc) -> None:
        self._folder.release()

    def start(self, header: dict[str, Any]) -> None:
        """(Re)open the state for a run: header fields replaced, the records
        of the warm-up and the rounds kept."""
        rounds = self.state.get("rounds", [])
        kept = {k: self.state[k] for k in ("sft", "backward", "candidates") if k in self.state}
        self.state = {**header, **kept, "rounds": rounds, "status": "running",
                      "started": self.state.get("started", now())}
        self.save()

    def round(self, k: int) -> dict[str, Any] | None:
        for r in self.state.get("rounds", []):
            if r.get("round") == k:
                return r
        return None

    def set_round(self, k: int, record: dict[str, Any]) -> None:
        rounds = [r for r in self.state.get("rounds", []) if r.get("round") != k] + [{"round": k, **record}]
        self.state["rounds"] = sorted(rounds, key=lambda r: r["round"])
        self.save()

    def update(self, **fields: Any) -> None:
        self.state.update(fields)
        self.save()

    def save(self) -> None:
        atomic_write_json(self.path, redact_obj(self.state))
