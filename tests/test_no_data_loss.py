"""synthfb never deletes or overwrites a file it did not write, and never
reports ``finished`` after losing rows (issue #11).

Every case runs through the CLI in a subprocess, as a user would, and checks
that each foreign file survives byte for byte. Load-only pipelines and a small
fake OpenAI-compatible server on 127.0.0.1: no engine is started here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from synthfb.data.owned import MARKER

REPO = Path(__file__).resolve().parent.parent


def synthfb(*args: str, cwd: Path | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "synthfb.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def one_line_error(res: subprocess.CompletedProcess, code: int = 2) -> str:
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("synthfb: error:")]
    assert len(errors) == 1, res.stderr
    return errors[0]


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A user's project folder: a load-only pipeline, its input data, and a
    user's own ``dataset/`` and ``README.md``."""
    write_rows(tmp_path / "data.jsonl", [{"text": f"row {i}"} for i in range(30)])
    (tmp_path / "p.yaml").write_text("name: demo\nstages:\n  - stage: load\n    path: data.jsonl\n")
    (tmp_path / "dataset").mkdir()
    (tmp_path / "dataset" / "mine.arrow").write_bytes(b"user data \x00\x01")
    (tmp_path / "README.md").write_text("# my project\n")
    return tmp_path


# -- 1. run --out into a folder synthfb did not write --------------------------------------------

def test_run_refuses_a_foreign_folder_and_keeps_every_file(project: Path):
    user = project / "user"
    (user / "dataset").mkdir(parents=True)
    (user / "dataset" / "data.arrow").write_bytes(b"precious")
    (user / "README.md").write_text("mine")
    before = snapshot(user)
    err = one_line_error(synthfb("run", project / "p.yaml", "--out", user))
    assert str(user) in err and "not empty" in err
    assert snapshot(user) == before and not (user / MARKER).exists()


def test_run_out_dot_in_a_project_keeps_its_input(project: Path):
    before = snapshot(project)
    one_line_error(synthfb("run", "p.yaml", "--out", ".", cwd=project))
    assert snapshot(project) == before


@pytest.mark.parametrize("flag", ["--overwrite", "--resume"])
def test_overwrite_and_resume_refuse_a_folder_that_only_looks_like_a_run(project: Path, flag: str):
    fake = project / "fake"
    (fake / "stages").mkdir(parents=True)
    (fake / "stages" / "notes.txt").write_text("not synthfb's")
    (fake / "run.json").write_text('{"synthfb_run": 1, "mine": true}')
    (fake / "dataset").mkdir()
    (fake / "dataset" / "x.bin").write_bytes(b"\x00" * 10)
    before = snapshot(fake)
    err = one_line_error(synthfb("run", project / "p.yaml", "--out", fake, flag))
    assert "not written by synthfb" in err
    assert snapshot(fake) == before


def test_name_stays_under_runs(project: Path):
    for name in ("../../x", str(project / "abs"), "..", "a/b"):
        (project / "q.yaml").write_text(f"name: {json.dumps(name)}\nstages:\n  - stage: load\n    path: data.jsonl\n")
        one_line_error(synthfb("run", "q.yaml", cwd=project))
        one_line_error(synthfb("validate", "q.yaml", cwd=project))
    assert not (project / "abs").exists() and not (project.parent / "x").exists()


def test_overwrite_deletes_only_what_synthfb_wrote(project: Path):
    out = project / "out"
    assert synthfb("run", project / "p.yaml", "--out", out, "--quiet").returncode == 0
    (out / "notes.txt").write_text("user notes")
    (out / "stages" / "..keep").write_text("")  # inside a synthfb entry: synthfb's to replace
    (out / "logs" / "job.txt").write_text("a scheduler's output")  # the log folder is shared: kept
    (out / "logs" / "engine.log").write_text("OLD ENGINE LOG\n")
    res = synthfb("run", project / "p.yaml", "--out", out, "--overwrite", "--quiet")
    assert res.returncode == 0, res.stderr
    assert (out / "notes.txt").read_text() == "user notes"
    assert (out / "logs" / "job.txt").read_text() == "a scheduler's output"
    assert "OLD ENGINE LOG" not in (out / "logs" / "engine.log").read_text()  # synthfb's own log was replaced
    again = one_line_error(synthfb("run", project / "p.yaml", "--out", out))
    assert "--resume" in again and "--overwrite" in again


def test_overwrite_never_follows_a_symlink(project: Path):
    out = project / "out"
    assert synthfb("run", project / "p.yaml", "--out", out, "--quiet").returncode == 0
    victim = project / "victim"
    victim.mkdir()
    (victim / "f.txt").write_text("keep")
    import shutil

    shutil.rmtree(out / "dataset")
    (out / "dataset").symlink_to(victim, target_is_directory=True)
    assert synthfb("run", project / "p.yaml", "--out", out, "--overwrite", "--quiet").returncode == 0
    assert (victim / "f.txt").read_text() == "keep"


# -- 3. publish ---------------------------------------------------------------------------------

@pytest.fixture
def finished_run(project: Path) -> Path:
    out = project / "runs" / "demo"
    res = synthfb("run", "p.yaml", "--quiet", cwd=project)
    assert res.returncode == 0, res.stderr
    return out


def test_publish_refuses_foreign_folders_the_run_and_dot(project: Path, finished_run: Path):
    target = project / "target"
    target.mkdir()
    (target / "other.parquet").write_bytes(b"PAR1 user")
    before_all = snapshot(project)
    for to in (target, finished_run, project / "runs", ".", ".."):
        one_line_error(synthfb("publish", finished_run, "--to", to, cwd=project))
    assert snapshot(project) == before_all
    assert not [p for p in project.parent.rglob(".*partial*")]


def test_publish_replaces_only_its_own_files(project: Path, finished_run: Path):
    import datasets

    pub = project / "pub"
    assert synthfb("publish", finished_run, "--to", pub, cwd=project).returncode == 0
    (pub / "NOTES.txt").write_text("added by the user")
    res = synthfb("publish", finished_run, "--to", pub, "--license", "mit", cwd=project)
    assert res.returncode == 0, res.stderr
    assert (pub / "NOTES.txt").read_text() == "added by the user"
    assert "mit" in (pub / "README.md").read_text()
    ds = datasets.load_dataset(str(pub), split="train")
    assert len(ds) == 30


def test_card_refuses_a_folder_synthfb_did_not_write(project: Path):
    before = snapshot(project)
    one_line_error(synthfb("card", project, cwd=project))
    assert snapshot(project) == before


# -- 4. a second process on a locked run folder changes nothing ----------------------------------

def test_second_overwrite_on_a_running_run_changes_nothing(project: Path, finished_run: Path):
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from synthfb.data.owned import OwnedFolder; "
         f"f = OwnedFolder({str(finished_run)!r}, 'run', 'resume').acquire(); print('held', flush=True); "
         "time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(finished_run)
        err = one_line_error(synthfb("run", project / "p.yaml", "--out", finished_run, "--overwrite"))
        assert "in use" in err
        assert snapshot(finished_run) == before
        one_line_error(synthfb("card", finished_run))
        assert snapshot(finished_run) == before
    finally:
        holder.kill()
        holder.wait()


def test_a_run_whose_folder_is_replaced_never_reports_finished(project: Path, monkeypatch):
    from synthfb.data.io import atomic_write_json
    from synthfb.engine import Pipeline, Runner, RunError

    out = project / "out"
    runner = Runner(Pipeline.from_yaml(project / "p.yaml"), out, progress=False)
    real = Runner._write_dataset

    def hijack(self, table):  # another process re-claims the folder mid-run
        marker = json.loads((out / MARKER).read_text())
        atomic_write_json(out / MARKER, {**marker, "id": "someone-else"})
        return real(self, table)

    monkeypatch.setattr(Runner, "_write_dataset", hijack)
    with pytest.raises(RunError, match="replaced"):
        runner.run()
    assert json.loads((out / "run.json").read_text())["status"] != "finished"


# -- 5. train output_dir ------------------------------------------------------------------------

def test_train_refuses_a_foreign_output_dir(project: Path, tiny_model: Path):
    out = project / "trained"
    (out / "checkpoint-1").mkdir(parents=True)
    (out / "checkpoint-1" / "weights.bin").write_bytes(b"user checkpoint")
    (out / "config.json").write_text("{}")
    write_rows(project / "sft.jsonl", [{"prompt": "a b", "completion": " c d"}] * 4)
    cfg = project / "sft.yaml"
    cfg.write_text(f"model: {tiny_model}\ndataset: {project / 'sft.jsonl'}\noutput_dir: {out}\nmax_steps: 1\n"
                   f"batch_size: 2\n")
    before = snapshot(out)
    err = one_line_error(synthfb("train", "sft", "--config", cfg))
    assert str(out) in err
    assert snapshot(out) == before


def test_train_into_its_own_output_again_keeps_user_files(project: Path, tiny_model: Path):
    out = project / "trained"
    write_rows(project / "sft.jsonl", [{"prompt": "a b", "completion": " c d"}] * 4)
    cfg = project / "sft.yaml"
    cfg.write_text(f"model: {tiny_model}\ndataset: {project / 'sft.jsonl'}\noutput_dir: {out}\nmax_steps: 2\n"
                   f"batch_size: 2\nsave_steps: 1\n")
    res = synthfb("train", "sft", "--config", cfg)
    assert res.returncode == 0, res.stderr
    assert (out / "config.json").exists() and (out / "checkpoint-1").is_dir()
    (out / "MY_NOTES.md").write_text("notes")
    res = synthfb("train", "sft", "--config", cfg, "--set", "max_steps=1", "--set", "save_steps=null")
    assert res.returncode == 0, res.stderr
    assert (out / "MY_NOTES.md").read_text() == "notes"
    assert not (out / "checkpoint-1").exists()  # the earlier training's own checkpoint was synthfb's


# -- loop folder --------------------------------------------------------------------------------

def test_loop_refuses_a_foreign_folder(project: Path):
    loop = REPO / "pipelines" / "rlaif_tiny.yaml"
    if not loop.exists():
        pytest.skip("no tiny loop file shipped")
    before = snapshot(project)
    one_line_error(synthfb("loop", loop, "--out", project))
    one_line_error(synthfb("loop", loop, "--out", project, "--overwrite"))
    assert snapshot(project) == before


# -- 6. late columns ----------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_a_column_first_seen_on_the_last_row_is_kept(tmp_path: Path, fmt: str):
    import datasets

    n = 20_000
    rows = [{"text": f"row {i}"} for i in range(n)]
    rows.append({"text": "row 0", "late": "only here"})  # differs from row 0 only in the late column
    if fmt == "jsonl":
        write_rows(tmp_path / "data.jsonl", rows)
    else:
        (tmp_path / "data.json").write_text(json.dumps(rows))
    (tmp_path / "p.yaml").write_text(f"name: late\nstages:\n  - stage: load\n    path: data.{fmt}\n")
    res = synthfb("run", tmp_path / "p.yaml", "--out", tmp_path / "out", "--quiet")
    assert res.returncode == 0, res.stderr
    ds = datasets.load_from_disk(str(tmp_path / "out" / "dataset"))
    assert len(ds) == n + 1
    assert "late" in ds.column_names
    late = [r for r in ds if r["late"] is not None]
    assert late == [{**late[0], "text": "row 0", "late": "only here"}]


# -- 7. chunk size ------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["-1", "0", "x"])
def test_bad_chunk_size_is_refused(project: Path, value: str):
    res = synthfb("run", project / "p.yaml", "--out", project / "o", "--chunk-size", value)
    assert res.returncode == 2 and "--chunk-size" in res.stderr and "Traceback" not in res.stderr
    assert not (project / "o").exists()


# -- 8. failed rows -----------------------------------------------------------------------------

class _Server:
    """A minimal OpenAI-compatible chat server whose behaviour a test sets:
    ``ok`` answers, ``500`` always, or invalid JSON."""

    def __init__(self):
        self.mode = "ok"
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code: int, body: bytes):
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self._send(200, json.dumps({"object": "list", "data": [{"id": "m", "object": "model"}]}).encode())

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                odd = int(body["messages"][-1]["content"].split()[-1]) % 2 == 1
                if server.mode == "500" or (server.mode == "odd" and odd):
                    return self._send(500, b'{"error": {"message": "internal error: engine crashed"}}')
                if server.mode == "badjson":
                    return self._send(200, b'{"choices": [ not json')
                text = "answer to " + body["messages"][-1]["content"]
                self._send(200, json.dumps({
                    "id": "x", "object": "chat.completion", "model": "m",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}}).encode())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


def _api_pipeline(tmp_path: Path, port: int) -> Path:
    write_rows(tmp_path / "q.jsonl", [{"instruction": f"question {i}"} for i in range(12)])
    p = tmp_path / "api.yaml"
    p.write_text(f"""name: api
backend: openai
model: m
chunk_size: 4
backend_options: {{base_url: "http://127.0.0.1:{port}/v1", max_retries: 1, retry_wait_min: 0.01, timeout: 5,
                  vllm_extensions: false}}
stages:
  - stage: load
    path: q.jsonl
  - stage: generate
    sampling: {{max_tokens: 8}}
""")
    return p


@pytest.mark.parametrize("mode", ["500", "badjson", "down"])
def test_a_stage_whose_requests_all_fail_fails_the_run_and_resume_retries(tmp_path: Path, server, mode: str):
    port = server.port
    if mode == "down":
        from socket import socket

        with socket() as s:  # a port nothing listens on
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    else:
        server.mode = mode
    pipe = _api_pipeline(tmp_path, port)
    out = tmp_path / "out"
    res = synthfb("run", pipe, "--out", out)
    err = one_line_error(res, code=1)
    assert "12 of 12 row(s) failed" in err and "first error" in err
    assert "generate 12->0 (failed 12)" in res.stderr  # the summary line
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "failed" and "first error" in manifest["error"]
    assert not (out / "dataset").exists()

    # the server is fixed: --resume retries the failed rows and finishes with all of them
    if mode == "down":
        pipe = _api_pipeline(tmp_path, server.port)
    server.mode = "ok"
    res = synthfb("run", pipe, "--out", out, "--resume")
    assert res.returncode == 0, res.stderr
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "finished" and manifest["output"]["rows"] == 12
    assert "generate 12->12 (failed 0)" in res.stderr


def test_max_failure_rate_is_configurable_and_resume_retries_a_finished_stage(tmp_path: Path, server):
    """Rows with an odd number fail (6 of 12): fine at the default 0.5, a failed run at 0.4."""
    server.mode = "odd"
    pipe = _api_pipeline(tmp_path, server.port)
    res = synthfb("run", pipe, "--out", tmp_path / "a")
    assert res.returncode == 0, res.stderr
    assert "generate 12->6 (failed 6)" in res.stderr
    assert json.loads((tmp_path / "a" / "run.json").read_text())["status"] == "finished"

    strict = tmp_path / "strict.yaml"
    strict.write_text(pipe.read_text().replace("chunk_size: 4\n", "chunk_size: 4\nmax_failure_rate: 0.4\n"))
    err = one_line_error(synthfb("run", strict, "--out", tmp_path / "b"), code=1)
    assert "6 of 12 row(s) failed" in err and "internal error" in err

    server.mode = "ok"  # --resume on the finished run retries its 6 failed rows
    res = synthfb("run", pipe, "--out", tmp_path / "a", "--resume")
    assert res.returncode == 0, res.stderr
    assert "generate 12->12 (failed 0)" in res.stderr
    import datasets

    ds = datasets.load_from_disk(str(tmp_path / "a" / "dataset"))
    assert sorted(ds["instruction"]) == sorted(f"question {i}" for i in range(12))
    assert all(r.startswith("answer to question") for r in ds["response"])
