"""Run a model-written Python program in a sandbox and read what it prints.

Used by the ``consistency`` stage (TableLLM-style cross-way validation,
specs/methods-2.md section 5.1: the program's answer is computed by
executing it, never trusted from the model's text). One program, one fresh
interpreter:

- ``python -I`` (isolated mode: no ``PYTHON*`` variables, no user site, the
  script's folder not on ``sys.path``) with an empty environment, started in
  its own session inside a fresh temporary directory that is its working
  directory and is deleted afterwards;
- limits set with ``resource.setrlimit`` by a prelude that runs before the
  program, hard limit = soft limit so the program cannot raise them:
  address space (``memory_mb``), CPU seconds, size of files it writes
  (its stdout goes to a file, so an endless ``print`` loop stops too) and
  no core dumps;
- no network: the prelude moves the process into new user and network
  namespaces (``unshare(2)`` through libc; the new namespace has no
  interfaces), and where the kernel refuses that, replaces
  ``socket.socket`` and ``socket.create_connection`` by functions that
  raise (weaker: a program could still reach ``_socket``). Which of the two
  applied is reported (``network``);
- a wall-clock ``timeout``: the whole process group is killed when it runs
  out.

This is a guard against accidents of generated code (endless loops, huge
allocations, stray network calls), not a security boundary against hostile
code: the program runs as the same user with the same file-system view
(for that, run synthfb in a container).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

_PRELUDE = r'''
import resource as _r, sys as _s
def _lim(k, v):
    try:
        _r.setrlimit(k, (v, v))
    except (ValueError, OSError):
        pass
_lim(_r.RLIMIT_AS, {memory})
_lim(_r.RLIMIT_CPU, {cpu})
_lim(_r.RLIMIT_FSIZE, {fsize})
_lim(_r.RLIMIT_CORE, 0)
_net = "open"
try:
    import ctypes as _c
    if _c.CDLL(None, use_errno=True).unshare(0x10000000 | 0x40000000) == 0:  # CLONE_NEWUSER | CLONE_NEWNET
        _net = "namespace"
    del _c
except Exception:
    pass
if _net != "namespace":
    import socket as _sk
    def _no_net(*a, **k):
        raise OSError("network access is disabled in the synthfb sandbox")
    _sk.socket = _no_net
    _sk.create_connection = _no_net
    _net = "socket_blocked"
_s.stderr.write("\n__synthfb_sandbox_network=" + _net + "\n")
_s.stderr.flush()
del _r, _lim
_src = open("program.py", encoding="utf-8").read()
_g = {{"__name__": "__main__", "__file__": "program.py", "__builtins__": __builtins__}}
del _s
exec(compile(_src, "program.py", "exec"), _g)
'''


@dataclass(frozen=True)
class SandboxResult:
    """What one program did. ``status``: ``ok`` (exit code 0), ``error``
    (non-zero exit, e.g. an exception or a ``MemoryError``), ``timeout``
    (killed after the wall-clock limit), ``killed`` (ended by a signal, e.g.
    the CPU or file-size limit). ``stdout``/``stderr`` are cut at
    ``max_output`` characters; ``network``: ``namespace`` or
    ``socket_blocked`` (how network access was taken away)."""

    status: str
    stdout: str
    stderr: str
    returncode: int | None
    seconds: float
    network: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def run_python(code: str, *, timeout: float = 5.0, memory_mb: int = 512, max_output: int = 65536,
               python: str | None = None) -> SandboxResult:
    """Run ``code`` in a fresh sandboxed interpreter (module docstring);
    ``timeout`` in wall-clock seconds, ``memory_mb`` the address-space limit
    in MiB, ``max_output`` the most bytes it may write to stdout (a program
    that writes more is stopped by the file-size limit)."""
    if timeout <= 0 or memory_mb <= 0 or max_output <= 0:
        raise ValueError(f"timeout, memory_mb and max_output must be > 0, got {timeout}, {memory_mb}, {max_output}")
    prelude = _PRELUDE.format(memory=int(memory_mb) * 1024 * 1024, cpu=int(timeout) + 1, fsize=int(max_output))
    with tempfile.TemporaryDirectory(prefix="synthfb-sandbox-") as tmp:
        d = Path(tmp)
        (d / "program.py").write_text(code, encoding="utf-8")
        t0 = time.perf_counter()
        with open(d / "stdout.txt", "wb") as out, open(d / "stderr.txt", "wb") as err:
            proc = subprocess.Popen([python or sys.executable, "-I", "-c", prelude], cwd=tmp, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=err, env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"},
                                    start_new_session=True)
            try:
                proc.wait(timeout=timeout)
                status = "ok" if proc.returncode == 0 else ("killed" if proc.returncode < 0 else "error")
            except subprocess.TimeoutExpired:
                status = "timeout"
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the program and anything it started
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
        seconds = time.perf_counter() - t0
        stdout = (d / "stdout.txt").read_bytes()[:max_output].decode("utf-8", "replace")
        stderr = (d / "stderr.txt").read_bytes()[-max_output:].decode("utf-8", "replace")
    network = ""
    marker = "\n__synthfb_sandbox_network="
    if marker in stderr:
        head, _, tail = stderr.partition(marker)
        network, _, rest = tail.partition("\n")
        stderr = head + rest
    return SandboxResult(status, stdout, stderr.strip(), proc.returncode, round(seconds, 3), network)


__all__ = ["SandboxResult", "run_python"]
