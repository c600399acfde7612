"""The runner on the tiny model: chunks, provenance, reuse, resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest

from synthfb.engine import Pipeline, RunError, run_pipeline

REPO = Path(__file__).resolve().parent.parent


def make_pipeline(tmp: Path, model: Path, rows: int = 20, chunk: int = 6, n: int = 2, prompt: str = "Q: {{ instruction }}",
                  max_tokens: int = 8) -> Path:
    seeds = tmp / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"instruction": f"Write item {i} about the city river"}) + "\n"
                             for i in range(rows)))
    (tmp / "p.jinja").write_text(prompt)
    f = tmp / "pipe.yaml"
    f.write_text(f"""
name: tiny
description: test pipeline
backend: vllm
model: {model}
backend_options: {{dtype: float32, max_model_len: 2048}}
chunk_size: {chunk}
stages:
  - stage: load
    path: seeds.jsonl
  - stage: generate
    prompt: p.jinja
    n: {n}
    sampling: {{temperature: 1.0, max_tokens: {max_tokens}}}
""")
    return f


def run(f: Path, out: Path, gen, **kw):
    p = Pipeline.from_yaml(f)
    return run_pipeline(p, out, generators={p.model: gen}, progress=False, **kw)


def test_run_writes_chunks_dataset_and_provenance(tmp_path, tiny_model, vllm_tiny):
    f = make_pipeline(tmp_path, tiny_model)
    res = run(f, tmp_path / "out", vllm_tiny)
    ds = datasets.load_from_disk(str(res.dataset_dir))
    assert len(ds) == 40 == res.num_rows
    ids = ds["row_id"]
    assert len(set(ids)) == 40 and all(i.endswith(("/0", "/1")) for i in ids)
    chunks = sorted((tmp_path / "out" / "stages" / "01-generate").glob("chunk-*.parquet"))
    assert len(chunks) == 4  # 20 rows in chunks of 6
    prov = ds[0]["provenance"][-1]
    assert prov["stage"] == "generate" and prov["backend"] == "vllm"
    assert prov["model_revision"].startswith("sha256:")
    assert json.loads(prov["sampling"])["n"] == 2
    assert prov["finish_reason"] in ("stop", "length")
    assert len(prov["template_sha256"]) == 64
    manifest = json.loads((tmp_path / "out" / "run.json").read_text())
    assert manifest["status"] == "finished"
    st = manifest["stages"][1]
    assert st["rows_in"] == 20 and st["rows_out"] == 40 and st["usage"]["requests"] == 20
    assert st["model"]["revision"] == prov["model_revision"]


def test_existing_run_needs_resume(tmp_path, tiny_model, vllm_tiny):
    f = make_pipeline(tmp_path, tiny_model, rows=4)
    run(f, tmp_path / "out", vllm_tiny)
    with pytest.raises(RunError, match="--resume"):
        run(f, tmp_path / "out", vllm_tiny)


def test_unchanged_stage_reused_changed_stage_rerun(tmp_path, tiny_model, vllm_tiny):
    f = make_pipeline(tmp_path, tiny_model, rows=8)
    first = run(f, tmp_path / "out", vllm_tiny)
    again = run(f, tmp_path / "out", vllm_tiny, resume=True)
    assert [s["reused"] for s in again.manifest["stages"]] == [True, True]
    a = datasets.load_from_disk(str(first.dataset_dir))
    b = datasets.load_from_disk(str(again.dataset_dir))
    assert a["response"] == b["response"]  # reused, not regenerated
    (tmp_path / "p.jinja").write_text("Question: {{ instruction }}")
    changed = run(f, tmp_path / "out", vllm_tiny, resume=True)
    assert [s["reused"] for s in changed.manifest["stages"]] == [True, False]


def test_duplicate_seed_rows_dropped_and_counted(tmp_path, tiny_model, vllm_tiny):
    f = make_pipeline(tmp_path, tiny_model, rows=3, n=1)
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(seeds.read_text() + seeds.read_text().splitlines()[0] + "\n")
    res = run(f, tmp_path / "out", vllm_tiny)
    assert res.num_rows == 3
    assert res.manifest["stages"][0]["counts"] == {"duplicate_rows": 1}


def test_sigkill_mid_stage_then_resume_gives_same_rows(tmp_path, tiny_model, vllm_tiny):
    rows, chunk = 240, 4
    f = make_pipeline(tmp_path, tiny_model, rows=rows, chunk=chunk, n=2, max_tokens=24)
    reference = run(f, tmp_path / "ref", vllm_tiny)
    ref_ids = sorted(datasets.load_from_disk(str(reference.dataset_dir))["row_id"])

    out = tmp_path / "killed"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    cmd = [sys.executable, "-m", "synthfb.cli", "run", str(f), "--out", str(out), "--quiet"]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stage_dir = out / "stages" / "01-generate"
    deadline = time.time() + 420
    while time.time() < deadline and proc.poll() is None:
        if len(list(stage_dir.glob("chunk-*.parquet"))) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(stage_dir.glob("chunk-*.parquet")))
    assert 3 <= done < rows // chunk, "the kill did not land mid-stage"
    assert not (out / "dataset").exists()

    resumed = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ds = datasets.load_from_disk(str(out / "dataset"))
    ids = ds["row_id"]
    assert len(ids) == len(set(ids)), "a row was produced twice"
    assert sorted(ids) == ref_ids
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "finished"
