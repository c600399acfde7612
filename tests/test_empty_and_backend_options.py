"""Runs that keep no row, and backend options checked per backend (issue #15 c, d).

* A run whose last stage keeps 0 rows writes a dataset with every column the
  stages declare (typed as in the last stage output that had it, else
  string), not an all-string schema missing columns; ``publish`` refuses it
  and ``synthfb train`` says so in one line (exit 2).
* Every backend declares the options it takes (its constructor's
  signature); ``synthfb validate`` / ``run`` with ``--backend X`` reject an
  option X lacks in one line naming the option and the backend, before any
  model loads. The shipped pipelines validate under ``--backend transformers``,
  whose ``max_model_len`` caps prompt + completion as vLLM's does.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ has no __init__.py
from fakes import FakeGenerator

from synthfb.cli import main
from synthfb.engine import Pipeline, PipelineError, Runner

REPO = Path(__file__).resolve().parent.parent
PIPELINES = REPO / "pipelines"


def shipped(name: str, limit: int = 3) -> dict:
    d = yaml.safe_load((PIPELINES / f"{name}.yaml").read_text())
    [load] = [s for s in d["stages"] if s["stage"] == "load"]
    load["limit"] = limit
    return d


def run(d: dict, out: Path, fake: FakeGenerator):
    p = Pipeline.from_dict(copy.deepcopy(d), PIPELINES, source=f"pipelines/{d['name']}.yaml")
    return Runner(p, out, generators={p.model: fake}, progress=False).run()


def declared(d: dict) -> list[str]:
    cols: list[str] = []
    for st in Pipeline.from_dict(copy.deepcopy(d), PIPELINES, source="x").stages:
        cols = st.output_columns(cols)
    return cols


def one_error_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("synthfb: error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# -- empty outputs -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def empty_judge_run(tmp_path_factory):
    """judge_pairs where every candidate gets the same score: every prompt is a tie, 0 rows kept."""
    out = tmp_path_factory.mktemp("empty") / "run"
    res = run(shipped("judge_pairs"), out, FakeGenerator(rules=[("<response>", "Score: 3")],
                                                         default=["a", "b", "c", "d"]))
    assert res.num_rows == 0 and res.manifest["stages"][-1]["counts"]["dropped_tie"] == 3
    return out


def test_empty_output_keeps_the_declared_schema(empty_judge_run):
    import datasets

    ds = datasets.load_from_disk(str(empty_judge_run / "dataset"))
    assert len(ds) == 0
    want = declared(shipped("judge_pairs"))
    assert ds.column_names == want
    assert {"prompt", "chosen", "rejected", "score_chosen", "score_rejected", "score_margin"} <= set(want)
    # types of columns an earlier stage produced are kept; the rest are strings
    assert ds.features["responses"].feature.dtype == "string"
    assert isinstance(ds.features["provenance"], datasets.List)
    assert ds.features["score_margin"].dtype == "string"
    m = json.loads((empty_judge_run / "run.json").read_text())
    assert m["status"] == "finished" and m["output"]["columns"] == want


def test_empty_output_after_a_middle_stage(tmp_path):
    """cai_label drops every row (identical responses): all columns of load -> generate -> cai_label."""
    d = shipped("cai_preferences")
    res = run(d, tmp_path / "run", FakeGenerator(lambda req, k: "The same answer."))
    assert res.num_rows == 0
    import datasets

    ds = datasets.load_from_disk(str(tmp_path / "run" / "dataset"))
    assert ds.column_names == declared(d) and "p_chosen" in ds.column_names
    assert pa.types.is_list(ds.data.schema.field("responses").type)


def test_publish_refuses_an_empty_run(empty_judge_run, tmp_path, capsys):
    assert main(["publish", str(empty_judge_run), "--to", str(tmp_path / "pub")]) == 2
    one_error_line(capsys, "kept 0 rows", "nothing to publish")
    assert not (tmp_path / "pub" / "README.md").exists()


@pytest.mark.parametrize("trainer", ["dpo", "rm", "sft"])
def test_train_on_an_empty_run_is_one_line(empty_judge_run, tmp_path, capsys, trainer):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": str(tmp_path), "dataset": str(empty_judge_run / "dataset"),
                                   "output_dir": str(tmp_path / "o"), "max_steps": 1}))
    assert main(["train", trainer, "--config", str(cfg)]) == 2
    one_error_line(capsys, str(empty_judge_run / "dataset"), "0 rows", "nothing to train on")


# -- backend options ---------------------------------------------------------------------------------------------

def test_each_backend_declares_its_options_from_its_constructor():
    import inspect

    from synthfb.llm import backend_options
    from synthfb.llm.hf_backend import TransformersGenerator
    from synthfb.llm.openai_backend import OpenAIGenerator

    for backend, cls in (("transformers", TransformersGenerator), ("openai", OpenAIGenerator)):
        names = set(inspect.signature(cls.__init__).parameters) - {"self", "model", "name"}
        assert backend_options(backend) == names
    assert {"max_model_len", "dtype", "batch_size", "device"} <= backend_options("transformers")
    assert backend_options("vllm") is None and backend_options("vllm-cpu") is None  # open: vllm.LLM's arguments


def test_the_check_imports_no_engine():
    code = ("import sys; from synthfb.llm import check_backend_options as c; c('transformers', {'dtype': 'x'}); "
            "c('vllm', {'max_num_batched_tokens': 8}); print(sorted({'torch', 'vllm', 'transformers'} & set(sys.modules)))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                       check=False)
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr)


@pytest.mark.parametrize("backend,options,bad", [
    ("transformers", {"dtype": "float32", "kv_cache_gib": 1}, "kv_cache_gib"),
    ("transformers", {"max_num_batched_tokens": 1024}, "max_num_batched_tokens"),
    ("openai", {"dtype": "bfloat16"}, "dtype"),
    ("vllm", {"batch_size": 8}, "batch_size"),  # another backend's option
    ("vllm-cpu", {"base_url": "http://x/v1"}, "base_url"),
])
def test_an_option_the_backend_lacks_is_named(backend, options, bad):
    from synthfb.llm import check_backend_options

    with pytest.raises(ValueError, match=rf"^backend_options\.{bad}: not an option of backend {backend} "):
        check_backend_options(backend, options)


@pytest.mark.parametrize("backend,options", [
    ("transformers", {"dtype": "bfloat16", "max_model_len": 2048, "batch_size": 4, "seed": 0, "progress": False}),
    ("vllm", {"dtype": "float32", "max_model_len": 2048, "max_num_batched_tokens": 1024, "kv_cache_gib": 2}),
    ("openai", {"base_url": "http://x/v1", "max_retries": 2, "concurrency": 4}),
])
def test_options_the_backend_takes_pass(backend, options):
    from synthfb.llm import check_backend_options

    check_backend_options(backend, options)


def test_load_generator_checks_before_loading_anything():
    from synthfb.llm import load_generator

    with pytest.raises(ValueError, match=r"options\.kv_cache_gib: not an option of backend transformers"):
        load_generator("transformers", "/nonexistent/model", kv_cache_gib=1)


@pytest.mark.parametrize("name", sorted(p.stem for p in PIPELINES.glob("*.yaml")
                                         if "stages" in (yaml.safe_load(p.read_text()) or {})))  # pipeline files
def test_shipped_pipelines_validate_under_every_local_backend(name, capsys):
    for backend in ("transformers", "vllm", "vllm-cpu"):
        assert main(["validate", name, "--backend", backend]) == 0
        assert capsys.readouterr().out.strip().endswith(f"; backend {backend})")


def test_validate_backend_override_rejects_in_one_line(capsys):
    assert main(["validate", "quickstart", "--backend", "openai"]) == 2
    one_error_line(capsys, "quickstart.yaml", "backend_options.dtype", "backend openai")


def _pipeline_file(tmp_path: Path, backend: str, options: dict, models: dict | None = None) -> Path:
    d = shipped("quickstart")
    d.update(backend=backend, backend_options=options, models=models or {})
    d["stages"][0]["path"] = str(PIPELINES / d["stages"][0]["path"])
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump(d))
    return f


def test_file_options_are_checked_against_the_files_backend(tmp_path, capsys):
    f = _pipeline_file(tmp_path, "transformers", {"dtype": "float32", "kv_cache_gib": 1})
    assert main(["validate", str(f)]) == 2
    one_error_line(capsys, "p.yaml", "backend_options.kv_cache_gib", "backend transformers")
    f = _pipeline_file(tmp_path, "transformers", {"dtype": "float32"}, {"default": {"enforce_eager": True}})
    assert main(["validate", str(f)]) == 2
    one_error_line(capsys, "models.default.enforce_eager", "backend transformers")
    with pytest.raises(PipelineError, match="kv_cache_gib"):
        Pipeline.from_dict({**yaml.safe_load(f.read_text()), "models": {}, "backend_options": {"kv_cache_gib": 1}},
                           tmp_path)


def test_run_backend_override_rejects_before_loading(tmp_path, capsys):
    f = _pipeline_file(tmp_path, "vllm", {"dtype": "float32", "max_model_len": 2048, "max_num_batched_tokens": 512})
    out = tmp_path / "out"
    assert main(["run", str(f), "--backend", "transformers", "--out", str(out), "--quiet"]) == 2
    one_error_line(capsys, "backend_options.max_num_batched_tokens", "backend transformers")
    assert not out.exists()


def test_validate_backend_on_a_loop_file_is_an_error(capsys):
    assert main(["validate", "rlaif_tiny", "--backend", "transformers"]) == 2
    one_error_line(capsys, "rlaif_tiny.yaml", "--backend applies to pipeline files")


@pytest.mark.engine
def test_transformers_max_model_len_caps_prompt_and_completion(tiny_model):
    from synthfb.llm.hf_backend import TransformersGenerator
    from synthfb.llm.types import GenerationRequest, SamplingParams

    gen = TransformersGenerator(str(tiny_model), seed=0, dtype="float32", max_model_len=40, progress=False)
    try:
        n = len(gen.tokenizer.context_ids([GenerationRequest(prompt="a b c d e f")])[0])
        params = SamplingParams(temperature=0.0, max_tokens=200, n=1)
        short, long_ = gen.generate([GenerationRequest(prompt="a b c d e f", params=params),
                                     GenerationRequest(prompt="word " * 60, params=params)])
        assert long_.error and "max_model_len) is 40" in long_.error and not long_.completions
        [c] = short.completions
        assert c.num_tokens <= 40 - n
        assert c.finish_reason == "length" or c.num_tokens < 40 - n
        with pytest.raises(ValueError, match="exceed max_model_len 40"):
            from synthfb.llm.types import ScoreRequest

            gen.score([ScoreRequest(" x", prompt="word " * 60)])
    finally:
        gen.close()
    with pytest.raises(ValueError, match="max_model_len 100000: must be between 1 and the model's context"):
        TransformersGenerator(str(tiny_model), dtype="float32", max_model_len=100_000, progress=False)
