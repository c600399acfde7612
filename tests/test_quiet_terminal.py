"""A clean terminal: engine output goes to RUN/logs/engine.log, synthfb shows
one progress line per stage and a summary table."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ has no __init__.py
import scripted_runs as sr

from synthfb.engine.progress import Console, StageProgress, summary_table

REPO = Path(__file__).resolve().parent.parent
NOISE = "engine-noise-from-a-child-process"


def _child_prints(text: str) -> None:
    """What vLLM's worker processes do: write to the inherited fds 1 and 2."""
    subprocess.run([sys.executable, "-c", f"import sys; print({text!r}); print({text!r}, file=sys.stderr)"],
                   check=True)


def test_console_sends_fd_output_to_the_log_and_its_own_lines_to_the_terminal(tmp_path, capfd):
    log = tmp_path / "logs" / "engine.log"
    with Console(log) as con:
        _child_prints(NOISE)
        print("python-level noise", flush=True)
        print("synthfb line", file=con.out, flush=True)
    out, err = capfd.readouterr()
    assert NOISE not in out + err and "python-level noise" not in out + err
    assert "synthfb line" in err
    text = log.read_text()
    assert text.count(NOISE) == 2 and "python-level noise" in text
    # descriptors are back: output after the run reaches the terminal again
    _child_prints("after")
    out, err = capfd.readouterr()
    assert "after" in out and "after" in err


def test_nested_consoles_a_loop_and_its_runs(tmp_path, capfd):
    """A loop's console holds the terminal; a pipeline run inside it writes its lines to the terminal
    and the engine output to the loop's log (one log for the loop: an engine worker keeps the
    descriptors it started with, whichever run started it)."""
    loop_log, run_log = tmp_path / "logs" / "engine.log", tmp_path / "run" / "logs" / "engine.log"
    with Console(loop_log) as outer:
        _child_prints("engine starts")
        print("loop line", file=outer.out, flush=True)
        with Console(run_log) as inner:
            _child_prints("run engine noise")
            print("run progress line", file=inner.out, flush=True)
        _child_prints("engine closes")
        print("loop line 2", file=outer.out, flush=True)
    out, err = capfd.readouterr()
    terminal = out + err
    assert "loop line" in terminal and "run progress line" in terminal and "loop line 2" in terminal
    assert not any(x in terminal for x in ("engine starts", "run engine noise", "engine closes"))
    text = loop_log.read_text()
    assert "engine starts" in text and "engine closes" in text and "run engine noise" in text
    assert "run progress line" not in text and not run_log.exists()
    _child_prints("after")
    out, err = capfd.readouterr()
    assert "after" in out and "after" in err


def test_verbose_console_shows_engine_output_and_still_logs_it(tmp_path, capfd):
    log = tmp_path / "engine.log"
    with Console(log, verbose=True):
        _child_prints(NOISE)
    out, err = capfd.readouterr()
    assert (out + err).count(NOISE) == 2
    assert log.read_text().count(NOISE) == 2


def test_progress_line_counts_rows_tokens_and_failures():
    buf = io.StringIO()
    bar = StageProgress("[2/2] generate", 10, out=buf, tty=False)
    bar.start_chunk(4)
    bar.live(2, 4, 50.0)  # half of the chunk's requests finished: 2 of its 4 rows (estimate)
    assert bar.line().startswith("[2/2] generate  2/10 rows  50 tok/s  ETA ")
    bar.chunk_done(4, tokens=100, failed=1)
    bar.chunk_done(6, tokens=300, failed=0)
    bar.close()
    assert buf.getvalue().count("\n") == 1  # not a terminal: one line, at the end
    line = buf.getvalue().strip()
    assert line.startswith("[2/2] generate  10/10 rows  ") and line.endswith("failed 1")


def test_progress_line_redraws_in_place_on_a_terminal():
    buf = io.StringIO()
    bar = StageProgress("[1/1] x", 3, out=buf, tty=True, interval=0.0)
    for _ in range(3):
        bar.chunk_done(1)
    bar.close()
    assert buf.getvalue().count("\n") == 1 and buf.getvalue().count("\r") >= 3


def test_summary_table_from_a_run_record():
    manifest = {"stages": [
        {"index": 0, "kind": "load", "rows_in": 8, "rows_out": 8, "failures": [], "usage": {}, "seconds": 0.1},
        {"index": 1, "kind": "generate", "rows_in": 8, "rows_out": 7, "usage": {"completion_tokens": 500},
         "failures": [{"row_id": "a", "reason": "x"}, {"row_id": "a", "reason": "y"}], "seconds": 3.0,
         "generate_seconds": 2.0},  # 1 s of it was engine start-up
    ]}
    lines = summary_table(manifest)
    assert len(lines) == 4 and lines[0].split() == ["stage", "rows", "in", "rows", "out", "failed", "tokens", "tok/s",
                                                    "time"]
    assert lines[3].split() == ["2.", "generate", "8", "7", "1", "500", "250", "00:03"]


def test_scripted_run_prints_progress_and_a_table_only(tmp_path, capfd):
    """The quickstart on the scripted generator: per stage one line, the
    table, the status line; anything printed at fd level goes to engine.log."""
    d, fake = sr.quickstart()
    inner = fake.generate

    def noisy_generate(requests, desc=""):
        _child_prints(NOISE)  # an engine worker writing to the inherited descriptors
        return inner(requests, desc)

    fake.generate = noisy_generate
    p = sr.Pipeline.from_dict(d, sr.PIPELINES, source="pipelines/quickstart.yaml")
    sr.Runner(p, tmp_path / "qs", generators={p.model: fake}, progress=True).run()
    out, err = capfd.readouterr()
    lines = (out + err).splitlines()
    assert NOISE not in out + err
    assert (tmp_path / "qs" / "logs" / "engine.log").read_text().count(NOISE) == 2 * 3  # 3 chunks, 2 fds
    assert [x.split()[0] for x in lines if x.startswith("[")] == ["[1/2]", "[2/2]"]
    assert any(x.split()[:2] == ["stage", "rows"] for x in lines)
    assert any(x.startswith("synthfb: finished: load 8->8") for x in lines), lines
    assert len(lines) <= 12, lines


def _run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # vLLM at its default log level whatever the calling environment says (CI may quiet it): the test is
    # that a talking engine talks into engine.log, not onto the terminal
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_LOGGING_CONFIG_PATH", "VLLM_LOGGING_LEVEL")}
    env.update(PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", VLLM_CONFIGURE_LOGGING="1",
               VLLM_LOGGING_LEVEL="INFO")
    return subprocess.run([sys.executable, "-m", "synthfb.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.engine
@pytest.mark.timeout(900)
def test_quickstart_on_vllm_prints_at_most_40_lines(tmp_path, tiny_model):
    """A real `synthfb run quickstart` (tiny model, vLLM on this machine, a
    subprocess as a user runs it): at most 40 lines in all; the engine's
    logs are in engine.log; the record names the model without its path."""
    out = tmp_path / "qs"
    proc = _run_cli(["run", "quickstart", "--model", str(tiny_model), "--out", str(out)], tmp_path)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    lines = text.splitlines()
    assert len(lines) <= 40, f"{len(lines)} lines:\n{text}"
    assert [x.split()[0] for x in lines if x.startswith("[")] == ["[1/2]", "[2/2]"], text
    assert json.loads(proc.stdout.strip().splitlines()[-1])["rows"] == 8
    log = (out / "logs" / "engine.log").read_text()
    assert "vllm" in log.lower() and len(log.splitlines()) > 20  # the engine did talk, into the log
    record = json.loads((out / "run.json").read_text())
    assert record["stages"][1]["model"]["dtype"] in ("float32", "bfloat16")
    assert str(tiny_model) not in json.dumps(record) and str(tiny_model) not in (out / "README.md").read_text()
    import datasets  # the rows get published too: their provenance names the model without its path

    rows = datasets.load_from_disk(str(out / "dataset")).to_list()
    assert rows and str(tiny_model) not in json.dumps(rows, default=str)
    assert {p["model"] for r in rows for p in r["provenance"]} == {tiny_model.name}
