"""Randomized SIGKILLs across a multi-stage pipeline: every resume ends with
exactly the dataset of an uninterrupted run (same rows, none twice, none partial).

Uses the transformers backend with greedy decoding so that an uninterrupted
run is reproducible row for row (and process starts are cheap); the runner
code under test is the same for every backend.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest

MIN_KILLS, MAX_TRIALS, KILLS_PER_TRIAL = 20, 8, 4


def pipeline_file(tmp: Path, model: Path) -> Path:
    (tmp / "seeds.jsonl").write_text("".join(json.dumps({"instruction": f"Describe item {i} of the city"}) + "\n"
                                             for i in range(40)))
    (tmp / "a.jinja").write_text("Q: {{ instruction }}")
    (tmp / "b.jinja").write_text("Improve this answer: {{ response }}")
    f = tmp / "pipe.yaml"
    f.write_text(f"""
name: crash
backend: transformers
model: {model}
backend_options: {{dtype: float32, batch_size: 8}}
chunk_size: 4
stages:
  - stage: load
    path: seeds.jsonl
  - stage: generate
    prompt: a.jinja
    n: 2
    sampling: {{temperature: 0.0, max_tokens: 6}}
  - stage: generate
    prompt: b.jinja
    output_column: improved
    sampling: {{temperature: 0.0, max_tokens: 6}}
""")
    return f


def cli(f: Path, out: Path, resume: bool) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "synthfb.cli", "run", str(f), "--out", str(out), "--quiet"]
    if resume:
        cmd.append("--resume")
    return subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})


def table(out: Path) -> list[dict]:
    rows = datasets.load_from_disk(str(out / "dataset")).to_list()
    return sorted(rows, key=lambda r: r["row_id"])


def where(out: Path) -> str:
    done = [(d.name, len(list(d.glob("chunk-*.parquet")))) for d in sorted((out / "stages").glob("*"))] \
        if (out / "stages").exists() else []
    return ",".join(f"{n}:{c}" for n, c in done) or "start"


def chunk_count(out: Path) -> int:
    return len(list(out.glob("stages/*/chunk-*.parquet")))


def kill_at_random_point(proc: subprocess.Popen, out: Path, rng: random.Random) -> bool:
    """SIGKILL the run at a random point: either during start-up, or right
    after it finished 0-3 more chunks plus a random jitter (which lands the
    kill inside model calls, chunk writes or the final dataset write).
    Returns False if the run ended by itself first."""
    if rng.random() < 0.2:
        deadline = time.time() + rng.uniform(0.2, 3.0)
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.01)
    else:
        target = chunk_count(out) + rng.randint(0, 3)
        while proc.poll() is None and chunk_count(out) < target:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.25))
    if proc.poll() is not None:
        return False
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return True


@pytest.mark.engine  # CLI runs (subprocesses) on the transformers backend, killed and resumed
@pytest.mark.timeout(1800)
def test_random_sigkills_then_resume_equal_uninterrupted(tmp_path, tiny_model):
    f = pipeline_file(tmp_path, tiny_model)
    ref = cli(f, tmp_path / "ref", resume=False)
    assert ref.wait(timeout=600) == 0, ref.stderr.read().decode()[-3000:]
    expected = table(tmp_path / "ref")
    assert len(expected) == 80 and len({r["row_id"] for r in expected}) == 80

    rng = random.Random(1234)
    kills, places = 0, set()
    for trial in range(MAX_TRIALS):
        if kills >= MIN_KILLS:
            break
        out = tmp_path / f"trial{trial}"
        started = 0
        while started < KILLS_PER_TRIAL:
            proc = cli(f, out, resume=started > 0)
            started += 1
            if kill_at_random_point(proc, out, rng):
                kills += 1
                places.add(where(out).split(",")[-1].split(":")[0])
            else:
                assert proc.returncode == 0, proc.stderr.read().decode()[-3000:]
                break
        final = cli(f, out, resume=True)
        assert final.wait(timeout=600) == 0, final.stderr.read().decode()[-3000:]
        got = table(out)
        ids = [r["row_id"] for r in got]
        assert len(ids) == len(set(ids)), f"trial {trial}: duplicated rows"
        assert got == expected, f"trial {trial}: resumed dataset differs from the uninterrupted run"
        manifest = json.loads((out / "run.json").read_text())
        assert manifest["status"] == "finished"
        assert [s["rows_out"] for s in manifest["stages"]] == [40, 80, 80]
        assert not list(out.glob("stages/*/.*.tmp-*")), "stale partial files left behind"
    assert kills >= MIN_KILLS, f"only {kills} kills landed while a run was alive"
    # the kills landed in more than one place (before any stage, inside generate stages, ...)
    assert len(places) >= 2, places
