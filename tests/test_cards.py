"""Data cards: numbers recomputed from the dataset and run records; publishing."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import datasets
import jsonschema
import pytest
import yaml

from synthfb.cards import build_card, publish_dir, publish_hub
from synthfb.cards.builder import SCHEMA_PATH, CardError, size_category
from synthfb.engine import Pipeline, run_pipeline
from synthfb.engine.runner import scrub


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model, vllm_tiny):
    tmp = tmp_path_factory.mktemp("cardrun")
    rows = [{"instruction": f"Explain topic {i} about the river"} for i in range(7)]
    rows.append(rows[0])  # one duplicate, dropped by load
    (tmp / "seeds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp / "ask.jinja").write_text("Please answer: {{ instruction }}")
    f = tmp / "pipe.yaml"
    f.write_text(f"""
name: card-test
description: Card test pipeline.
license: cc-by-4.0
model: {tiny_model}
backend_options: {{dtype: float32}}
chunk_size: 3
stages:
  - stage: load
    path: seeds.jsonl
  - stage: generate
    prompt: ask.jinja
    n: 2
    sampling: {{temperature: 1.0, max_tokens: 12}}
""")
    p = Pipeline.from_yaml(f)
    res = run_pipeline(p, tmp / "run", generators={p.model: vllm_tiny}, progress=False)
    return res


def test_card_written_with_run_and_numbers_match(finished_run):
    run = finished_run.out_dir
    readme = (run / "README.md").read_text()
    assert (run / "plots" / "lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    header = yaml.safe_load(readme.split("---\n")[1])
    jsonschema.validate(header, json.loads(SCHEMA_PATH.read_text()))
    ds = datasets.load_from_disk(str(run / "dataset"))
    manifest = json.loads((run / "run.json").read_text())
    assert header["dataset_info"]["splits"][0]["num_examples"] == len(ds) == 14
    assert header["size_categories"] == [size_category(len(ds))] == ["n<1K"]
    assert header["license"] == "cc-by-4.0"
    assert "machine-generated" in header["annotations_creators"] and "synthetic" in header["tags"]
    assert [f["name"] for f in header["dataset_info"]["features"]] == ds.column_names
    # the stage table: rows in/out and drop reasons, as recomputed from the chunk files
    for s in manifest["stages"]:
        sdir = run / "stages" / f"{s['index']:02d}-{s['kind']}"
        out_rows = sum(json.loads(p.read_text())["rows_out"] for p in sdir.glob("chunk-*.stats.json"))
        assert out_rows == s["rows_out"]
        cell = f"| {s['index']} | `{s['kind']}` | {s['rows_in']} | {s['rows_out']} |"
        assert cell in readme
    assert "| 0 | `load` | 8 | 7 | duplicate_rows: 1 |" in readme
    # length stats equal the dataset's own
    words = [len(t.split()) for t in ds["response"]]
    m = re.search(r"`response` length in words: min (\d+), median ([\d.]+), mean ([\d.]+), max (\d+) \((\d+) rows\)", readme)
    assert m, readme
    assert int(m.group(1)) == min(words) and int(m.group(4)) == max(words) and int(m.group(5)) == len(words)
    assert float(m.group(2)) == statistics.median(words)
    assert float(m.group(3)) == round(statistics.fmean(words), 3)
    # the prompt template is shown with its hash
    prov = ds[0]["provenance"][-1]
    assert prov["template_sha256"] in readme and "Please answer: {{ instruction }}" in readme


def test_publish_dir_loads_with_load_dataset(finished_run, tmp_path):
    out = publish_dir(finished_run.out_dir, tmp_path / "pub")
    loaded = datasets.load_dataset(str(out), split="train")
    original = datasets.load_from_disk(str(finished_run.dataset_dir))
    assert loaded["row_id"] == original["row_id"]
    assert (out / "README.md").read_text().startswith("---\n")
    assert (out / "plots" / "lengths.png").exists()


def test_publish_hub_up_to_the_upload(finished_run, tmp_path, monkeypatch):
    # the Hub is not reachable here: everything up to the upload call is real, the HTTP calls are recorded
    import huggingface_hub

    calls = []

    class RecordingApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw))

        def upload_folder(self, folder_path, repo_id, ignore_patterns=(), **kw):
            import fnmatch

            files = [str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file()]
            calls.append(("upload_folder", repo_id, sorted(f for f in files  # what the Hub client would upload
                                                           if not any(fnmatch.fnmatch(f, i) for i in ignore_patterns))))
            return "https://hub/commit/1"

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    monkeypatch.setenv("HF_TOKEN", "hf_PLANTED_SECRET")
    url = publish_hub(finished_run.out_dir, "me/card-test", staging=tmp_path / "stage")
    assert url == "https://hub/commit/1"
    assert calls[0] == ("init", "hf_PLANTED_SECRET")
    assert calls[1][0] == "create_repo" and calls[1][2]["repo_type"] == "dataset"
    assert calls[2][2] == ["README.md", "data/train-00000-of-00001.parquet", "plots/lengths.png"]
    for p in (tmp_path / "stage").rglob("*"):
        if p.is_file():
            assert b"hf_PLANTED_SECRET" not in p.read_bytes()


def test_unfinished_run_is_refused(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"status": "running", "stages": []}))
    with pytest.raises(CardError, match="not finished"):
        build_card(tmp_path)


def test_scrub_redacts_credentials_only():
    cfg = {"max_tokens": 5, "api_key": "sk-x", "api_key_env": "OPENAI_API_KEY", "opts": [{"hf_token": "t", "password": "p"}]}
    assert scrub(cfg) == {"max_tokens": 5, "api_key": "<redacted>", "api_key_env": "OPENAI_API_KEY",
                          "opts": [{"hf_token": "<redacted>", "password": "<redacted>"}]}
