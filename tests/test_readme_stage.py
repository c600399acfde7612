"""README's "Adding a stage" example is a complete, working stage: its code
block is run as written, then used in a pipeline with the scripted fake
Generator (the seam does the batching, counting, provenance, fingerprint
and card record)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import datasets
import pytest

from fakes import FakeGenerator
from synthfb.engine import Pipeline, run_pipeline

REPO = Path(__file__).resolve().parent.parent


def _readme_stage_code() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## Adding a stage", 1)[1].split("\n## ", 1)[0]
    m = re.search(r"```python\n(.*?)```", section, re.S)
    assert m, "README's 'Adding a stage' section has no python block"
    return m.group(1)


@pytest.fixture(scope="module")
def grade_module(tmp_path_factory):
    code = _readme_stage_code()
    assert len(code.splitlines()) < 40
    d = tmp_path_factory.mktemp("mystages")
    (d / "readme_grade_stage.py").write_text(code)
    sys.path.insert(0, str(d))
    try:
        import readme_grade_stage

        yield readme_grade_stage
    finally:
        sys.path.remove(str(d))


def test_readme_stage_runs_in_a_pipeline(grade_module, tmp_path):
    (tmp_path / "grade.jinja").write_text("Grade 1-10.\nTask: {{ instruction }}\nAnswer: {{ response }}\nGrade:")
    rows = [{"instruction": f"task {i}", "response": f"answer {i}"} for i in range(6)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"name": "grade", "model": "default", "stages": [
        {"stage": "load", "path": "in.jsonl"},
        {"stage": "grade", "min_grade": 6}]}
    p = Pipeline.from_dict(spec, tmp_path)
    p.check_columns()
    # task 0,1 -> 9 (kept); 2,3 -> 3 (low); 4 -> no number; 5 -> the request fails
    fake = FakeGenerator(rules=[("task 0", "9"), ("task 1", "Grade: 9/10"), ("task 2", "3"), ("task 3", "3"),
                                ("task 4", "great!")], default="7",
                         failures=[("task 5", "HTTP 500")])
    p.max_failure_rate = 1.0  # 1 of 6 rows fails on purpose
    run_pipeline(p, tmp_path / "run", generators={"default": fake}, progress=False)
    assert fake.num_generate_calls == 1  # one batched call for the chunk
    ds = datasets.load_from_disk(str(tmp_path / "run" / "dataset"))
    assert sorted(ds["instruction"]) == ["task 0", "task 1"] and ds["grade"] == [9, 9]
    prov = ds["provenance"][0][-1]
    assert prov["stage"] == "grade" and prov["model"] == "default" and prov["template_sha256"]
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    st = run["stages"][1]
    assert st["counts"]["dropped_low_grade"] == 2 and st["counts"]["dropped_no_grade"] == 1
    assert st["counts"]["failed_requests"] == 1 and ["HTTP 500" in f["reason"] for f in st["failures"]] == [True]
    assert [t["field"] for t in st["templates"]] == ["prompt"]


def test_readme_stage_fingerprint_follows_its_template(grade_module, tmp_path):
    (tmp_path / "grade.jinja").write_text("Grade: {{ instruction }} {{ response }}")
    st = grade_module.GradeStage.from_dict({}, tmp_path)
    before = st.fingerprint()
    (tmp_path / "grade.jinja").write_text("Grade this: {{ instruction }} {{ response }}")
    after = grade_module.GradeStage.from_dict({}, tmp_path).fingerprint()
    assert before != after and before["template_sha256"] != after["template_sha256"]
