"""What synthfb may delete: only what it can prove it wrote.

Every folder synthfb writes as a whole (a pipeline run, a published dataset,
a training output, a loop) holds a marker file ``.synthfb.json``::

    {"synthfb": "run", "id": "<uuid4>", "entries": ["run.json", "stages", ...]}

``entries`` lists the names (or glob patterns of names) synthfb writes in
that folder. The one rule, used by ``run``, ``--overwrite``, ``--resume``,
``publish``, ``card``, ``loop`` and ``train``:

- a folder that does not exist or is empty is created and claimed;
- a folder whose marker names the same kind is synthfb's: it may be resumed,
  or cleared -- and clearing removes only the listed entries, never other
  files a user put there, and never follows a symbolic link;
- any other non-empty folder (no marker, another kind, a file) is refused
  with a one-line :class:`FolderError`; no flag deletes foreign files.

The folder's lock (``.synthfb.lock``, ``flock``) is taken before anything in
the folder is changed, and the ownership check is repeated under it, so a
second process on a locked folder changes nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterable

MARKER = ".synthfb.json"
LOCK = ".synthfb.lock"
# half-written files of a killed writer: atomic_write_* / replace_dir_atomic / publish temporaries
TEMPORARIES = (".*.tmp-*", ".*.partial-*", ".*.old-*")

# what each kind of folder holds (names or fnmatch patterns, first level only)
ENTRIES: dict[str, tuple[str, ...]] = {
    "run": ("run.json", "stages", "dataset", "README.md", "plots", "publish", "logs"),
    "publish": ("README.md", "data", "plots"),
    "loop": ("loop.json", "data", "heldout-base.json", "round-[0-9][0-9]", "round-[0-9][0-9][0-9]", "sft",
             "README.md", "final-eval.json", "backward", "candidates", "logs"),
    "train": ("metrics.jsonl", "train_config.yaml", "ref_logps-*.pt", "rollout-policy", "value_head.pt"),
}

LOG_DIR, LOG_FILES = "logs", ("engine.log",)
"""A run's or loop's log folder: ``--overwrite`` deletes synthfb's files in it, not the folder with a user's."""

WHAT = {"run": "pipeline run", "publish": "published dataset", "loop": "loop", "train": "training output"}

_HELD: dict[Path, "OwnedFolder"] = {}  # folders this process holds the lock of


class FolderError(ValueError):
    """A folder synthfb may not write into, or one in use; a one-line message."""


def read_marker(folder: str | Path) -> dict[str, Any] | None:
    """The marker of ``folder``, or None when it has none (or an unreadable one)."""
    p = Path(folder) / MARKER
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("synthfb"), str) or not isinstance(data.get("id"), str):
        return None
    return data


def _foreign(folder: Path) -> list[str]:
    """Entries of ``folder`` other than our lock file (sorted, at most a few)."""
    try:
        names = sorted(n for n in os.listdir(folder) if n != LOCK)
    except FileNotFoundError:
        return []
    return names


def _describe_kind(marker: dict[str, Any] | None) -> str:
    if marker is None:
        return "was not written by synthfb"
    return f"holds a synthfb {WHAT.get(marker['synthfb'], marker['synthfb'])}"


def check_folder(folder: str | Path, kind: str, mode: str, flag_hint: str = "") -> dict[str, Any] | None:
    """Refuse (FolderError) unless ``mode`` may use ``folder`` for ``kind``;
    return its marker (None for an absent or empty folder). Reads only.

    ``mode``: ``new`` (absent or empty only), ``resume`` (ours, or absent or
    empty), ``overwrite`` / ``replace`` (ours, cleared; or absent or empty),
    ``existing`` (ours only, e.g. ``synthfb card``).
    """
    p = Path(folder)
    if p.exists() and not p.is_dir():
        raise FolderError(f"{p} is a file, not a folder; choose another output folder")
    if p.is_symlink():
        raise FolderError(f"{p} is a symbolic link; give the real folder")
    marker = read_marker(p) if p.exists() else None
    names = _foreign(p) if p.exists() else []
    if marker is None:
        if mode == "existing":
            raise FolderError(f"{p} is not a synthfb {WHAT[kind]} (no {MARKER} marker)")
        if names:
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            raise FolderError(f"{p} is not empty ({shown}) and {_describe_kind(None)}; choose a new or empty folder "
                              f"(synthfb never deletes files it did not write, so no flag allows this)")
        return None
    if marker["synthfb"] != kind:
        raise FolderError(f"{p} {_describe_kind(marker)}, not a {WHAT[kind]}; choose another folder")
    if mode == "new":
        raise FolderError(f"{p} already holds a synthfb {WHAT[kind]}; {flag_hint or 'choose another folder'}")
    return marker


class OwnedFolder:
    """A folder synthfb holds: locked, marked, and cleared only of its entries.

    Use as a context manager (``with OwnedFolder(path, "run", "overwrite") as f:``)
    or :meth:`acquire` / :meth:`release`. Re-entrant within a process: a
    folder this process already holds is handed back as it is.
    """

    def __init__(self, folder: str | Path, kind: str, mode: str, *, flag_hint: str = "",
                 entries: Iterable[str] = ()):
        self.path = _checked_path(folder)
        self.kind = kind
        self.mode = mode
        self.flag_hint = flag_hint
        self.extra = list(entries)
        self.marker: dict[str, Any] = {}
        self._lock = None
        self._outer: OwnedFolder | None = None
        self._created = False

    # -- lifetime ---------------------------------------------------------
    def acquire(self) -> "OwnedFolder":
        held = _HELD.get(self.path)
        if held is not None:
            if held.kind != self.kind:
                raise FolderError(f"{self.path} is held as a synthfb {WHAT[held.kind]} by this process")
            self._outer, self.marker = held, held.marker
            return self
        check_folder(self.path, self.kind, self.mode, self.flag_hint)  # before creating anything
        created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        lock_path = self.path / LOCK
        lock_existed = lock_path.exists()
        self._lock = open(lock_path, "a")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            self._lock = None
            raise FolderError(f"{self.path} is in use by another synthfb process; nothing was changed") from None
        try:
            marker = check_folder(self.path, self.kind, self.mode, self.flag_hint)  # again, under the lock
        except FolderError:
            self._unlock()
            if not lock_existed:
                lock_path.unlink(missing_ok=True)
            if created:
                try:
                    self.path.rmdir()
                except OSError:
                    pass
            raise
        if marker is not None and self.mode in ("overwrite", "replace"):
            self._clear(marker)
            marker = None
        if marker is None:
            marker = {"synthfb": self.kind, "id": uuid.uuid4().hex,
                      "entries": list(dict.fromkeys([*ENTRIES.get(self.kind, ()), *self.extra]))}
        else:
            old = marker.get("entries")
            old = [e for e in old if isinstance(e, str) and _plain_name(e)] if isinstance(old, list) else []
            marker["entries"] = list(dict.fromkeys([*old, *ENTRIES.get(self.kind, ()), *self.extra]))
        self.marker = marker
        self._write_marker()
        self._created = created
        _HELD[self.path] = self
        return self

    def release(self, *, discard_if_unused: bool = False) -> None:
        """Unlock. With ``discard_if_unused``, a folder this call created that
        holds nothing but the marker and the lock is removed again (a command
        that failed before writing anything leaves no trace)."""
        if self._outer is not None:
            return
        _HELD.pop(self.path, None)
        if discard_if_unused and self._created and set(os.listdir(self.path)) <= {MARKER, LOCK}:
            (self.path / MARKER).unlink(missing_ok=True)
            self._unlock()
            (self.path / LOCK).unlink(missing_ok=True)
            try:
                self.path.rmdir()
            except OSError:
                pass
            return
        self._unlock()

    def _unlock(self) -> None:
        if self._lock is not None:
            try:
                fcntl.flock(self._lock, fcntl.LOCK_UN)
            finally:
                self._lock.close()
                self._lock = None

    def __enter__(self) -> "OwnedFolder":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    # -- marker -----------------------------------------------------------
    @property
    def id(self) -> str:
        return self.marker["id"]

    def _write_marker(self) -> None:
        from .io import atomic_write_json

        atomic_write_json(self.path / MARKER, self.marker)

    def add(self, *names: str) -> None:
        """Record more entries (names or patterns) as synthfb's, before writing them."""
        owner = self._outer or self
        new = [n for n in names if n not in owner.marker["entries"]]
        if new:
            owner.marker["entries"].extend(new)
            owner._write_marker()

    @contextlib.contextmanager
    def track(self):
        """Record as synthfb's every entry that appears in the folder while the
        block runs (for writers whose file names are not known in advance,
        e.g. ``save_pretrained``)."""
        before = set(os.listdir(self.path))
        try:
            yield self
        finally:
            new = sorted(set(os.listdir(self.path)) - before - {MARKER, LOCK})
            if new:
                self.add(*new)

    def still_ours(self) -> bool:
        """True while the marker on disk is the one this process wrote (same id)."""
        m = read_marker(self.path)
        return m is not None and m.get("id") == self.marker.get("id")

    # -- deletion ---------------------------------------------------------
    def owned_paths(self, marker: dict[str, Any] | None = None) -> list[Path]:
        marker = marker or self.marker
        # patterns only from the code; from the marker file, plain names only (a hand-edited
        # marker cannot widen what is deleted with '*', '../x' or an absolute path)
        entries = marker.get("entries")
        listed = [e for e in entries if isinstance(e, str) and _plain_name(e)] if isinstance(entries, list) else []
        pats = [*ENTRIES.get(marker.get("synthfb", self.kind), ()), *TEMPORARIES, *listed]
        out = []
        for name in sorted(os.listdir(self.path)):
            if name in (MARKER, LOCK):
                continue
            if any(fnmatch.fnmatchcase(name, pat) for pat in pats):
                out.append(self.path / name)
        return out

    def _clear(self, marker: dict[str, Any]) -> None:
        for p in self.owned_paths(marker):
            if p.name == LOG_DIR and p.is_dir() and not p.is_symlink():
                # the log folder is shared with the user (`> OUT/logs/job.txt`, a scheduler's output):
                # only synthfb's own log files go, the folder only when nothing else is left in it
                for name in LOG_FILES:
                    (p / name).unlink(missing_ok=True)
                try:
                    p.rmdir()
                except OSError:
                    pass
                continue
            remove(p)

    def clear(self) -> None:
        """Remove every entry synthfb wrote here (the marker stays)."""
        self._clear(self.marker)


def _checked_path(folder: str | Path) -> Path:
    """The absolute path of ``folder``, refusing paths whose meaning differs
    between the text and the file system: a leading ``~`` (not expanded by
    every writer) and a ``..`` after a symbolic link (``abspath`` would drop
    it while the OS resolves it from the link's target)."""
    text = os.fspath(folder)
    if not text:
        raise FolderError("an empty path is not a folder")
    if text.startswith("~"):
        raise FolderError(f"{text}: '~' is not expanded here; give the full path")
    raw = os.path.join(os.getcwd(), text)
    norm = os.path.abspath(text)
    if ".." in Path(text).parts and os.path.realpath(os.path.dirname(raw)) != os.path.realpath(os.path.dirname(norm)):
        raise FolderError(f"{text}: the path goes through a symbolic link and '..'; give the real path")
    return Path(norm)


def _plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and not any(ch in name for ch in "/\\*?[]")


def remove(p: Path) -> None:
    """Delete a file or a folder tree; a symbolic link is removed, never followed."""
    if p.is_symlink() or not p.is_dir():
        p.unlink(missing_ok=True)
    else:
        shutil.rmtree(p)


def publish_target(to: str | Path) -> Path:
    """An absolute, normalized target path that names a real folder (not / or a
    bare '.' left unresolved), so temporaries can be made beside it."""
    p = Path(os.path.abspath(to))
    if p == p.parent:
        raise FolderError(f"{to}: cannot publish into the file system root")
    return p
