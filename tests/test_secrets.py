"""Credentials never reach what synthfb writes or prints (issue #11, secrets).

Planted values go into an openai ``base_url`` (``user:PASS@``, ``?api-key=``)
and ``OPENAI_API_KEY``; a local OpenAI-compatible server echoes the
``Authorization`` header (raw and decoded) and the full request URL in its
error bodies. Unit tests cover ``synthfb.data.redact``; the backend tests run
``OpenAIGenerator`` against the echoing server; the end-to-end tests run a
pipeline through the CLI in a subprocess and read every byte it wrote.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from synthfb.data import redact
from synthfb.data.redact import (
    REDACTED,
    RedactingFilter,
    redact_obj,
    redact_text,
    redact_url,
    register_secret,
    registered_secrets,
    secrets_in,
)

REPO = Path(__file__).resolve().parents[1]

PASS = "PLANTEDPASS"
KEY = "PLANTEDKEY"
ENVKEY = "PLANTEDENVKEY"
USER = "plantedusername"  # long enough to count as part of the credential
BASIC = base64.b64encode(f"{USER}:{PASS}".encode()).decode()
PLANTED = (PASS, KEY, ENVKEY, USER, BASIC)


@pytest.fixture(autouse=True)
def _fresh_registry():
    """Secrets registered by one test must not redact another test's text."""
    before = registered_secrets()
    redact.clear_registered_secrets()
    yield
    redact.clear_registered_secrets()
    for s in before:
        register_secret(s)


# ------------------------------------------------------------- redact_url
def test_redact_url_userinfo_and_credential_params():
    url = f"http://user:{PASS}@127.0.0.1:8000/v1?api-key={KEY}&x=1"
    assert redact_url(url) == f"http://{REDACTED}@127.0.0.1:8000/v1?api-key={REDACTED}&x=1"
    for name in ("api_key", "apikey", "key", "token", "access_token", "secret", "client_secret", "password",
                 "sig", "signature", "auth", "X-Amz-Signature", "X-Amz-Security-Token"):
        out = redact_url(f"https://h.example/p?a=1&{name}={KEY}#frag")
        assert KEY not in out and f"{name}={REDACTED}" in out and "a=1" in out, out
    # a token as the only userinfo, URL-encoded values, a fragment token
    assert redact_url(f"https://{KEY}@github.com/o/r.git") == f"https://{REDACTED}@github.com/o/r.git"
    out = redact_url(f"http://u%40x:{PASS}%21@h/v1?api%2Dkey={KEY}%2B1&max_tokens=3")
    assert PASS not in out and KEY not in out and "max_tokens=3" in out
    assert KEY not in redact_url(f"https://h/cb#access_token={KEY}&state=s")


def test_redact_url_leaves_clean_urls_alone():
    for url in ("http://127.0.0.1:8000/v1", "https://api.example.com/v1/", "http://h/v1?max_tokens=5&model=m",
                "http://[::1]:8000/v1", "not a url", ""):
        assert redact_url(url) == url
    assert redact_url("http://[::1/v1?key=x") == REDACTED  # unparsable: nothing of it shown


# ------------------------------------------------------------- secrets_in
def test_secrets_in_url_and_options(monkeypatch):
    found = secrets_in(f"http://{USER}:{PASS}@h/v1?api-key={KEY}&x=1")
    assert {PASS, KEY, USER} <= found and "1" not in found
    # URL-encoded values are found as written and decoded
    assert {"PLANTED%40PASS", "PLANTED@PASS", "PLANTED+KEY", "PLANTED KEY"} <= secrets_in(
        "http://u:PLANTED%40PASS@h/v1?token=PLANTED+KEY")
    # a short username ("user") is not a secret value of its own
    assert "user" not in secrets_in(f"http://user:{PASS}@h/v1")
    monkeypatch.setenv("SYNTHFB_TEST_SECRET_ENV", ENVKEY)
    opts = {"base_url": f"http://h/v1?key={KEY}", "api_key_env": "SYNTHFB_TEST_SECRET_ENV", "max_tokens": 5,
            "models": {"m": {"api_key": "sk-configured-1234", "hf_token": "hf_abcdef"}}, "name": "xyz"}
    assert secrets_in(opts) == {KEY, ENVKEY, "sk-configured-1234", "hf_abcdef"}
    assert secrets_in(None) == set() and secrets_in({"api_key": "ab"}) == set()  # too short to be one


# ------------------------------------------------------------- redact_text
def test_redact_text_planted_values_and_patterns():
    body = json.dumps({"error": {"message": f"invalid key {ENVKEY}", "auth": f"Bearer {ENVKEY}",
                                 "url": f"/v1/chat/completions?api-key={KEY}&x=1"}})
    out = redact_text(f"HTTP 401: {body}", {ENVKEY, KEY})
    assert ENVKEY not in out and KEY not in out and "x=1" in out and "HTTP 401" in out
    # URL-encoded and JSON-escaped forms of a secret
    odd = 'se"cr/et+1&2'
    for form in ("se%22cr%2Fet%2B1%262", "se%22cr/et%2B1%262", 'se\\"cr/et+1&2', "se%22cr%2Fet%2B1%262"):
        assert redact_text(f"got {form} back", {odd}) == f"got {REDACTED} back", form
    # without being told any secret: URLs, Authorization values, key=value pairs
    text = (f"POST http://u:{PASS}@h:1/v1?api_key={KEY} with Authorization: Bearer {ENVKEY}; "
            f"Basic {BASIC}; api-key={KEY}; \"password\": \"{PASS}\"; GET /v1/models?token={KEY}")
    out = redact_text(text)
    assert not any(p in out for p in PLANTED), out
    assert redact_text(out, {KEY}) == out  # idempotent: "<redacted>" is never redacted again
    assert redact_text(f"http://h/v1?api-key={KEY}&x=1", {KEY}) == f"http://h/v1?api-key={REDACTED}&x=1"
    # ordinary prose is left alone
    for prose in ("Basic authentication failed", "max_tokens=16 and api_key_env=OPENAI_API_KEY",
                  "the user asked for a secret recipe", "see https://example.com/docs?page=2"):
        assert redact_text(prose) == prose
    assert redact_text(None) is None and redact_text(3) == 3


def test_registry_is_used_by_default_and_ignores_short_values():
    assert KEY not in registered_secrets()
    register_secret(KEY)
    register_secret("tests")  # too short: "tests/data.jsonl" would become "<redacted>/data.jsonl"
    register_secret("EMPTY")  # the usual placeholder key for a local vLLM server: not a secret
    register_secret("sk-no-key-required")
    register_secret(None)
    assert redact_text(f"echo {KEY}!") == f"echo {REDACTED}!"
    assert redact_text("tests/EMPTY: sk-no-key-required") == "tests/EMPTY: sk-no-key-required"
    assert registered_secrets() == {KEY}
    assert secrets_in({"api_key_env": "X", "api_key": "EMPTY"}) == set()


# ------------------------------------------------------------- redact_obj
def test_redact_obj_keys_and_values():
    obj = {
        "config": {"backend_options": {"base_url": f"http://u:{PASS}@h/v1?api-key={KEY}", "api_key_env": "E",
                                       "max_tokens": 7, "api_key": "sk-x", "client_secret": "s", "hf_token": None}},
        "stages": [{"failures": [{"row_id": "r1", "reason": f'HTTP 500: {{"error": "bad key {ENVKEY}"}}'}]}],
        "tuple": ("x", f"Bearer {ENVKEY}"),
        "n": 3, "ok": True, "none": None,
    }
    out = redact_obj(obj, {ENVKEY})
    blob = json.dumps(out)
    assert not any(p in blob for p in PLANTED) and "sk-x" not in blob
    bo = out["config"]["backend_options"]
    assert bo["api_key"] == bo["client_secret"] == bo["hf_token"] == REDACTED
    assert bo["api_key_env"] == "E" and bo["max_tokens"] == 7
    assert bo["base_url"] == f"http://{REDACTED}@h/v1?api-key={REDACTED}"
    assert out["n"] == 3 and out["ok"] is True and out["none"] is None
    assert obj["config"]["backend_options"]["api_key"] == "sk-x"  # the input is not changed


def test_redact_obj_matches_runner_scrub_on_keys():
    from synthfb.engine.runner import scrub

    cfg = {"api_key": "a", "apikey": "b", "api-key": "c", "hf_token": "d", "key": "e", "client_secret": "f",
           "password": "g", "Authorization": "h", "auth": "i", "max_tokens": 1, "api_key_env": "X",
           "token_env": "Y", "keys": "k", "nested": [{"token": "t", "tokenizer": "tok"}]}
    assert redact_obj(cfg) == scrub(cfg)


def test_logging_filter_redacts_message_args_and_exceptions():
    register_secret(ENVKEY)
    log = logging.getLogger("synthfb.test_secrets")
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(self.format(record))

    handler = Keep()
    handler.addFilter(RedactingFilter())
    log.addHandler(handler)
    try:
        log.warning("GET %s: %s", f"http://u:{PASS}@h/v1?key={KEY}", f"echo {ENVKEY}")
        try:
            raise RuntimeError(f"boom {ENVKEY}")
        except RuntimeError:
            log.exception("failed")
    finally:
        log.removeHandler(handler)
    text = "\n".join(seen)
    assert "GET http://" in text and "boom" in text
    assert not any(p in text for p in (PASS, KEY, ENVKEY)), text


# --------------------------------------------------------- the echoing server
class EchoServer:
    """A tiny OpenAI-compatible server on 127.0.0.1 that echoes credentials.

    ``GET /v1/models`` lists ``models``. ``POST .../chat/completions`` or
    ``.../completions`` answers ``"ok: <prompt>"``, except:

    * the first try of every prompt gets a 503 (so the client retries and logs);
    * any other POST (``/tokenize``) gets a 404;
    * a prompt containing ``FAIL500`` always gets a 500, ``FAILM2`` a 500 when
      the request is for model ``m2``, ``FAIL400`` a 400 with a plain-text body.

    Every error body echoes the ``Authorization`` header as sent, the basic-auth
    credentials decoded, and the full request URL with its query. ``requests``
    records ``(method, path, authorization)`` of everything received.
    """

    def __init__(self, models=("m1", "m2")) -> None:
        self.models = list(models)
        self.requests: list[tuple[str, str, str]] = []
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    def _echo(self, h: BaseHTTPRequestHandler) -> str:
        auth = h.headers.get("Authorization", "")
        decoded = ""
        if auth.lower().startswith("basic "):
            decoded = base64.b64decode(auth.split(None, 1)[1]).decode()
        return (f"denied: Authorization was {auth!r} (credentials {decoded!r}) "
                f"for http://{h.headers.get('Host')}{h.path} api-key in query: {h.path.partition('?')[2]}")

    def start(self) -> "EchoServer":
        srv = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format, *args):  # noqa: A002 - silence the access log
                pass

            def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):  # noqa: N802
                with srv._lock:
                    srv.requests.append(("GET", self.path, self.headers.get("Authorization", "")))
                if self.path.split("?")[0].rstrip("/") == "/v1/models":
                    data = [{"id": m, "object": "model", "owned_by": "echo"} for m in srv.models]
                    self._send(200, json.dumps({"object": "list", "data": data}).encode())
                else:
                    self._send(404, json.dumps({"error": {"message": srv._echo(self)}}).encode())

            def do_POST(self):  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                req = json.loads(self.rfile.read(length) or b"{}")
                with srv._lock:
                    srv.requests.append(("POST", self.path, self.headers.get("Authorization", "")))
                if not self.path.split("?")[0].endswith("/completions"):
                    return self._send(404, json.dumps({"error": {"message": srv._echo(self)}}).encode())
                chat = "messages" in req
                prompt = req["messages"][-1]["content"] if chat else str(req.get("prompt"))
                with srv._lock:
                    first = prompt not in srv._seen
                    srv._seen.add(prompt)
                echo = srv._echo(self)
                if "FAIL400" in prompt:
                    return self._send(400, f"bad request; {echo}".encode(), "text/plain")
                if first or "FAIL500" in prompt or ("FAILM2" in prompt and req.get("model") == "m2"):
                    status = 503 if first else 500
                    body = {"error": {"message": echo, "type": "Echo", "code": status},
                            "request_headers": {"authorization": self.headers.get("Authorization", "")}}
                    return self._send(status, json.dumps(body).encode())
                text = f"ok: {prompt}"[:60]
                choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                          if chat else {"index": 0, "text": text, "finish_reason": "stop"})
                usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
                self._send(200, json.dumps({"id": "x", "choices": [choice], "usage": usage}).encode())

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        daemon=True)
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

    def __enter__(self) -> "EchoServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


FAST = dict(retry_wait_min=0.01, retry_wait_max=0.02, max_retries=3, timeout=10)


def _assert_clean(text: str, where: str) -> None:
    leaked = [p for p in PLANTED if p in text]
    assert not leaked, f"{leaked} in {where}: {text[:2000]}"


# ------------------------------------------------------------ the backend
def test_backend_reports_no_credentials(monkeypatch, caplog):
    from synthfb.llm.openai_backend import OpenAIGenerator
    from synthfb.llm.types import GenerationRequest, SamplingParams, ScoreRequest

    monkeypatch.setenv("SYNTHFB_SECRETS_KEY", ENVKEY)
    caplog.set_level(logging.WARNING)
    with EchoServer() as server:
        port = server.port
        url = f"http://{USER}:{PASS}@127.0.0.1:{port}/v1?api-key={KEY}&x=1"
        g = OpenAIGenerator("m1", base_url=url, api_key_env="SYNTHFB_SECRETS_KEY", **FAST)
        params = SamplingParams(max_tokens=4)
        reqs = [GenerationRequest(messages=[{"role": "user", "content": c}], params=params)
                for c in ("hello", "FAIL500 a", "FAIL400 b")]
        reqs.append(GenerationRequest(prompt="FAIL500 raw", params=params))
        res = g.generate(reqs)
        # without userinfo the env key goes as a Bearer token (and is echoed back)
        g2 = OpenAIGenerator("m2", base_url=f"http://127.0.0.1:{server.port}/v1?api-key={KEY}",
                             api_key_env="SYNTHFB_SECRETS_KEY", **FAST)
        res2 = g2.generate([GenerationRequest(messages=[{"role": "user", "content": "FAILM2 c"}], params=params)])
        with pytest.raises(NotImplementedError) as score_err:  # /tokenize: a 404 that echoes
            g2.score([ScoreRequest(prompt="a b", continuation="c")])
        sent = list(server.requests)
    # the credentials were sent as configured
    posts = [r for r in sent if r[0] == "POST"]
    assert posts and all(f"api-key={KEY}" in path for _, path, _ in sent)
    assert any(path.endswith("&x=1") for _, path, _ in posts)
    assert any(auth == f"Basic {BASIC}" for _, _, auth in posts)
    assert any(auth == f"Bearer {ENVKEY}" for _, _, auth in posts)
    # ... and show up nowhere in what the backend reports
    assert res[0].error is None and res[0].completions[0].text == "ok: hello"
    errors = [r.error for r in res[1:] + res2]
    assert all(errors) and all(REDACTED in e for e in errors), errors
    assert "HTTP 500" in errors[0] and "HTTP 400" in errors[1]
    reports = [*errors, repr(g), repr(g2), g.base_url, g.root_url, json.dumps(g.info.to_dict()),
               json.dumps(g2.info.to_dict()), str(score_err.value), repr(score_err.value.__cause__), caplog.text]
    for text in reports:
        _assert_clean(text, "backend report")
    assert g.info.path == f"http://{REDACTED}@127.0.0.1:{port}/v1?api-key={REDACTED}&x=1"
    assert "retrying" in caplog.text  # the 503 echo went through the log, redacted
    g.close()
    g2.close()


# ------------------------------------------------------------- end to end
SEEDS = ["Name a fruit.", "FAIL500 Name a color.", "Name a planet.", "FAIL400 Name a tree.",
         "Name a river.", "FAILM2 Name a bird.", "Name a city.", "FAIL500 Name a song.",
         "Name a metal.", "FAILM2 Name a game."]


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """One CLI run (subprocess) of load -> generate (m1: user:pass@ URL) ->
    generate (m2: Bearer env key) against the echoing server."""
    tmp = tmp_path_factory.mktemp("secrets")
    (tmp / "seeds.jsonl").write_text("".join(json.dumps({"instruction": s}) + "\n" for s in SEEDS))
    (tmp / "ask.jinja").write_text("Answer briefly: {{ instruction }}\n")
    (tmp / "again.jinja").write_text("Again: {{ instruction }} / {{ response }}\n")
    with EchoServer() as server:
        port = server.port
        (tmp / "pipeline.yaml").write_text(f"""
name: secrets
description: planted credentials must not be written anywhere
license: apache-2.0
backend: openai
model: m1
backend_options:
  base_url: "http://{USER}:{PASS}@127.0.0.1:{port}/v1?api-key={KEY}"
  max_retries: 3
  retry_wait_min: 0.01
  retry_wait_max: 0.02
  concurrency: 2
  timeout: 20
models:
  m2: {{base_url: "http://127.0.0.1:{port}/v1?api-key={KEY}&x=1"}}
seed: 0
chunk_size: 4
stages:
  - stage: load
    path: seeds.jsonl
    require: [instruction]
  - stage: generate
    prompt: ask.jinja
    output_column: response
    sampling: {{max_tokens: 8}}
  - stage: generate
    model: m2
    prompt: again.jinja
    output_column: response2
    sampling: {{max_tokens: 8}}
""")
        env = dict(os.environ, OPENAI_API_KEY=ENVKEY, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false",
                   HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
        proc = subprocess.run(
            [sys.executable, "-m", "synthfb.cli", "run", str(tmp / "pipeline.yaml"), "--out", str(tmp / "run")],
            cwd=tmp, env=env, capture_output=True, text=True, timeout=300,
        )
        sent = list(server.requests)
    return proc, tmp / "run", sent


def test_e2e_run_sent_credentials_and_finished(e2e):
    proc, run, sent = e2e
    # exit 0, or 1 once a run with failed rows is reported as failed; never a crash
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    posts = [r for r in sent if r[0] == "POST"]
    assert posts and all(f"api-key={KEY}" in path for _, path, _ in sent)
    assert any(auth == f"Basic {BASIC}" for _, _, auth in posts)  # m1: userinfo -> basic auth
    assert any(auth == f"Bearer {ENVKEY}" for _, _, auth in posts)  # m2: the env key
    manifest = json.loads((run / "run.json").read_text())
    gen1, gen2 = manifest["stages"][1], manifest["stages"][2]
    assert gen1["rows_out"] == 7 and len(gen1["failures"]) == 3
    assert gen2["rows_out"] == 5 and len(gen2["failures"]) == 2
    for f in gen1["failures"] + gen2["failures"]:
        assert REDACTED in f["reason"], f  # the echo was there, and it was redacted
    assert (run / "README.md").exists() and (run / "dataset").is_dir()


def test_e2e_stdout_stderr_and_chunk_stats_have_no_secret(e2e):
    proc, run, _ = e2e
    _assert_clean(proc.stdout, "stdout")
    _assert_clean(proc.stderr, "stderr")
    assert "retrying" in proc.stderr  # the echoed 503s were logged, redacted
    stats = sorted(run.glob("stages/*/chunk-*.stats.json"))
    assert stats
    for p in stats:
        _assert_clean(p.read_text(), str(p.relative_to(run)))


def test_e2e_no_secret_in_any_file_of_the_run(e2e):
    """Every byte of the run folder: run.json (config, stage records, failures),
    stages/*/stage.json, chunk stats and parquet, the card, the dataset."""
    _, run, _ = e2e
    leaks = []
    for p in sorted(run.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            leaks += [f"{p.relative_to(run)}: {s}" for s in PLANTED if s.encode() in data]
    assert not leaks, "credentials written to the run folder:\n" + "\n".join(leaks)
