"""Real-model check: the shipped quickstart pipeline on SmolLM2-135M-Instruct."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from synthfb.engine import Pipeline, run_pipeline

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.smollm2
@pytest.mark.timeout(900)
def test_quickstart_on_smollm2(tmp_path, vllm_smol):
    pipeline = Pipeline.from_yaml(REPO / "pipelines" / "quickstart.yaml")
    seeds = [json.loads(x) for x in (REPO / "pipelines" / "seeds" / "quickstart.jsonl").read_text().splitlines()]
    res = run_pipeline(pipeline, tmp_path / "qs", generators={pipeline.model: vllm_smol}, progress=False)
    ds = datasets.load_from_disk(str(res.dataset_dir))
    assert len(ds) == len(seeds)
    assert sorted(ds["instruction"]) == sorted(s["instruction"] for s in seeds)
    # real text: mostly letters and spaces, several words, on topic for at least some prompts
    for r in ds:
        text = r["response"]
        assert len(text.split()) >= 2, text
        letters = sum(ch.isalpha() or ch.isspace() for ch in text)
        assert letters / len(text) > 0.7, text
    assert sum(len(t.split()) for t in ds["response"]) / len(ds) >= 10
    answers = " ".join(ds["response"]).lower()
    assert "french" in answers or "bonjour" in answers
    assert any(w in answers for w in ("vitamin", "orange", "kiwi", "strawberr"))
    prov = ds[0]["provenance"][-1]
    assert prov["model"] == "default" and prov["backend"] == "vllm"
    assert json.loads(prov["sampling"])["max_tokens"] == 200
