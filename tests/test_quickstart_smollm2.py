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
    # real text from a 135M model sampled at T=0.7: every answer non-empty, most
    # of them several words of mostly letters, and on topic for most prompts
    texts = ds["response"]
    assert all(t.strip() for t in texts), texts
    assert sum(len(t.split()) >= 5 for t in texts) >= len(texts) - 2, texts
    joined = "".join(texts)
    assert sum(ch.isalpha() or ch.isspace() for ch in joined) / len(joined) > 0.8, texts
    assert sum(len(t.split()) for t in texts) / len(texts) >= 10, texts
    a = " ".join(texts).lower()
    on_topic = ["french" in a or "bonjour" in a,
                any(w in a for w in ("vitamin", "orange", "kiwi", "strawberr")),
                any(w in a for w in ("scatter", "light", "wavelength", "atmospher")),
                any(w in a for w in ("lunch", "friday"))]
    assert sum(on_topic) >= 2, (on_topic, texts)  # a 135M model misses some topics at T=0.7
    prov = ds[0]["provenance"][-1]
    assert prov["model"] == "default" and prov["backend"] == "vllm"
    assert json.loads(prov["sampling"])["max_tokens"] == 200
