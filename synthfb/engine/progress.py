"""What a run shows on the terminal, and where everything else goes.

:class:`Console` owns the terminal for the length of a run. While it is open,
file descriptors 1 and 2 point at ``RUN/logs/engine.log``, so whatever the
engine libraries print (vLLM and its worker processes, which inherit the
descriptors; transformers, torch, Python warnings) lands there; with
``verbose`` a small thread copies the same bytes to the terminal too. synthfb's
own lines go to the terminal through :attr:`Console.out`: per stage one live
progress line (:class:`StageProgress`; redrawn in place on a terminal, printed
once when the stage ends otherwise) and, at the end, :func:`summary_table`.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO


_OPEN: list["Console"] = []  # consoles open in this process, innermost last


class Console:
    """Redirect fd 1/2 into ``log_path`` until :meth:`close` (a context manager).

    ``out`` writes to the terminal the run started with. ``verbose`` also
    shows the engine output on it. ``enabled=False`` leaves the descriptors
    alone (``out`` is then plain ``sys.stderr``). Consoles nest (a loop's
    console, then each pipeline run's inside it): an inner one changes
    nothing, so the engine output of the whole loop goes to the outer log
    (engine workers keep the descriptors they started with, whichever run
    started them), and its lines go to the outer one's terminal."""

    def __init__(self, log_path: str | Path, *, verbose: bool = False, enabled: bool = True):
        self.log_path = Path(log_path)
        self.verbose = verbose
        self.enabled = enabled
        self.out: TextIO = sys.stderr
        self._saved: list[int] = []
        self._pump: threading.Thread | None = None
        self._pipe_w: int | None = None

    def __enter__(self) -> "Console":
        self.open()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def open(self) -> None:
        if not self.enabled:
            return
        outer = next((c for c in reversed(_OPEN) if c.enabled and c._saved), None)
        if outer is not None:  # inside another console: its log and terminal serve this one too
            self._outer = outer
            self.out = outer.out
            self._isatty = outer.isatty()
            return
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        try:
            self._saved = [os.dup(1), os.dup(2)]
        except OSError:  # no usable descriptors (e.g. closed stdio): leave output as it is
            self.enabled = False
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        term_fd = os.dup(self._saved[1])
        self.out = io.TextIOWrapper(io.FileIO(term_fd, "w", closefd=True), line_buffering=True,
                                    encoding=getattr(sys.stderr, "encoding", None) or "utf-8", errors="replace")
        self._isatty = os.isatty(term_fd)
        if self.verbose:
            r, w = os.pipe()
            self._pipe_w = w
            self._pump = threading.Thread(target=_pump, args=(r, log_fd, self._saved[1]), daemon=True)
            self._pump.start()
            target = w
        else:
            target = log_fd
        os.dup2(target, 1)
        os.dup2(target, 2)
        if not self.verbose:
            os.close(log_fd)
        # Python-level writers too, where sys.stdout/err were replaced by objects not on fds 1/2
        self._sys = (sys.stdout, sys.stderr)
        sys.stdout, sys.stderr = (io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), line_buffering=True,
                                                   encoding="utf-8", errors="replace") for fd in (1, 2))
        _OPEN.append(self)

    def isatty(self) -> bool:
        return getattr(self, "_isatty", False) if self.enabled else _isatty(self.out)

    def close(self) -> None:
        if getattr(self, "_outer", None) is not None:
            self._outer = None
            self.out = sys.stderr
            return
        if not self.enabled or not self._saved:
            return
        if self in _OPEN:
            _OPEN.remove(self)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        sys.stdout, sys.stderr = self._sys
        os.dup2(self._saved[0], 1)
        os.dup2(self._saved[1], 2)
        for fd in self._saved:
            os.close(fd)
        self._saved = []
        if self._pipe_w is not None:
            # worker processes that outlived the engine may still hold the pipe; do not wait on them forever
            os.close(self._pipe_w)
            self._pipe_w = None
            if self._pump is not None:
                self._pump.join(timeout=5)
        try:
            self.out.flush()
            self.out.close()
        except (OSError, ValueError):
            pass
        self.out = sys.stderr


class TerminalLogHandler(logging.Handler):
    """synthfb's own warnings (e.g. a served model's retries) on the terminal
    while the engine libraries' logs go to the file: ``say`` prints a line
    under the live progress line. Installed on the ``synthfb`` logger only
    where no logging is configured (Python would then print warnings to
    stderr, i.e. into the log file)."""

    def __init__(self, say):
        super().__init__(logging.WARNING)
        self.say = say

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.say(self.format(record))
        except Exception:  # noqa: BLE001 - logging must never break the run
            self.handleError(record)

    @classmethod
    def install(cls, say) -> "TerminalLogHandler | None":
        ours = logging.getLogger("synthfb")
        if logging.getLogger().handlers or ours.handlers:
            return None
        handler = cls(say)
        ours.addHandler(handler)
        return handler

    def remove(self) -> None:
        logging.getLogger("synthfb").removeHandler(self)


def _pump(r: int, log_fd: int, term_fd: int) -> None:
    """Copy the engine output to the log file and the terminal (``verbose``)."""
    term = os.dup(term_fd)
    try:
        while True:
            data = os.read(r, 65536)
            if not data:
                break
            os.write(log_fd, data)
            try:
                os.write(term, data)
            except OSError:
                pass
    finally:
        for fd in (r, log_fd, term):
            try:
                os.close(fd)
            except OSError:
                pass


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _clock(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "--:--"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60:02d}:{rest % 60:02d}"


class StageProgress:
    """One progress line for one stage: ``rows done/total, tokens/s, ETA,
    failures``. On a terminal it is redrawn in place (at most every
    ``interval`` seconds); elsewhere it is printed once, by :meth:`close`.

    The runner calls :meth:`chunk_done` after each chunk (exact rows, tokens,
    failures) and, through :mod:`synthfb.llm.live`, :meth:`live` as requests
    of the running chunk finish (rows estimated from the share of that
    engine call's requests done, never past the chunk)."""

    def __init__(self, label: str, total: int | None, *, out: TextIO, tty: bool, enabled: bool = True,
                 initial: int = 0, interval: float = 0.5):
        self.label, self.total, self.out, self.tty, self.enabled = label, total, out, tty, enabled
        self.rows = initial
        self._start_rows = initial
        self.tokens = 0
        self.failed = 0
        self.interval = interval
        self._t0 = time.monotonic()
        self._drawn = 0.0
        self._chunk_rows = 0
        self._chunk_done = 0.0
        self._call_seen = 0
        self._live_speed: float | None = None
        self._width = 0
        self.closed = False

    # -- updates -------------------------------------------------------------
    def start_chunk(self, rows: int) -> None:
        self._chunk_rows, self._chunk_done, self._call_seen = rows, 0.0, 0

    def live(self, finished: int, in_call: int, tokens_per_s: float | None) -> None:
        """``finished`` more requests of an engine call of ``in_call`` requests."""
        self._call_seen += finished
        if in_call:
            self._chunk_done = max(self._chunk_done, min(1.0, self._call_seen / in_call) * self._chunk_rows)
        if tokens_per_s is not None:
            self._live_speed = tokens_per_s
        self.draw()

    def chunk_done(self, rows: int, tokens: int = 0, failed: int = 0) -> None:
        self.rows += rows
        self.tokens += tokens
        self.failed += failed
        self._chunk_rows, self._chunk_done, self._live_speed = 0, 0.0, None
        self.draw()

    # -- rendering -----------------------------------------------------------
    def line(self) -> str:
        elapsed = max(time.monotonic() - self._t0, 1e-9)
        rows = self.rows + int(self._chunk_done)
        total = f"/{self.total}" if self.total is not None else ""
        speed = self.tokens / elapsed if self.tokens else self._live_speed
        parts = [f"{self.label}", f"{rows}{total} rows"]
        if speed:
            parts.append(f"{speed:,.0f} tok/s")
        done_here = rows - self._start_rows
        if self.total is not None and not self.closed:
            left = self.total - rows
            eta = elapsed / done_here * left if done_here > 0 else None
            parts.append(f"ETA {_clock(eta if left > 0 else 0)}")
        else:
            parts.append(f"{_clock(elapsed)}")
        parts.append(f"failed {self.failed}")
        return "  ".join(parts)

    def draw(self, force: bool = False) -> None:
        if not self.enabled or not self.tty:
            return
        now = time.monotonic()
        if not force and now - self._drawn < self.interval:
            return
        self._drawn = now
        text = self.line()
        pad = max(0, self._width - len(text))
        self._width = len(text)
        self.out.write("\r" + text + " " * pad)
        self.out.flush()

    def clear(self) -> None:
        """Wipe the live line so another message can be printed (terminal only)."""
        if self.enabled and self.tty and self._width:
            self.out.write("\r" + " " * self._width + "\r")
            self.out.flush()
            self._width = 0
            self._drawn = 0.0

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.enabled:
            return
        if self.tty:
            self.draw(force=True)
            self.out.write("\n")
        else:
            self.out.write(self.line() + "\n")
        self.out.flush()


def summary_table(manifest: dict[str, Any]) -> list[str]:
    """The run's final table: per stage rows in/out, failed rows, completion
    tokens, tokens/s (over the chunks' own time, without engine start-up)
    and the stage's wall time."""
    head = ("stage", "rows in", "rows out", "failed", "tokens", "tok/s", "time")
    rows = []
    for r in manifest.get("stages", []):
        failed = len({f["row_id"] for f in r.get("failures") or []})
        tokens = int((r.get("usage") or {}).get("completion_tokens", 0))
        secs = float(r.get("seconds") or 0.0)
        gen_secs = float(r.get("generate_seconds") or secs)  # without engine start-up
        label = f"{r['index'] + 1}. {r['kind']}" + (" (reused)" if r.get("reused") else "")
        rows.append((label, str(r["rows_in"]), str(r["rows_out"]), str(failed), str(tokens) if tokens else "-",
                     f"{tokens / gen_secs:,.0f}" if tokens and gen_secs > 0 else "-", _clock(secs)))
    widths = [max(len(h), *(len(x[k]) for x in rows)) if rows else len(h) for k, h in enumerate(head)]

    def fmt(cells) -> str:
        return "  ".join(c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(cells, widths)))

    lines = [fmt(head), "  ".join("-" * w for w in widths), *(fmt(x) for x in rows)]
    return lines
