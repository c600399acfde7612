"""Bad pipeline files are rejected before any work, naming file and field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from synthfb.data.io import InputError, read_user_file
from synthfb.engine import Pipeline, PipelineError

REPO = Path(__file__).resolve().parent.parent
GOOD = """
name: t
model: default
stages:
  - stage: load
    path: seeds.jsonl
  - stage: generate
    prompt: p.jinja
    sampling: {temperature: 0.5, max_tokens: 8}
"""


@pytest.fixture
def pdir(tmp_path):
    (tmp_path / "seeds.jsonl").write_text('{"instruction": "a"}\n{"instruction": "b"}\n')
    (tmp_path / "p.jinja").write_text("Answer: {{ instruction }}")
    return tmp_path


def write(pdir: Path, text: str) -> Path:
    f = pdir / "pipe.yaml"
    f.write_text(text)
    return f


def err(pdir: Path, text: str) -> str:
    with pytest.raises(PipelineError) as e:
        p = Pipeline.from_yaml(write(pdir, text))
        p.check_columns()
    assert "pipe.yaml" in str(e.value)
    return str(e.value)


def test_good_pipeline_loads(pdir):
    p = Pipeline.from_yaml(write(pdir, GOOD))
    p.check_columns()
    assert [s.kind for s in p.stages] == ["load", "generate"]


def test_malformed_yaml_names_line(pdir):
    assert "line" in err(pdir, "name: t\nstages: [\n  - stage: load\n")


def test_unknown_stage(pdir):
    msg = err(pdir, GOOD.replace("stage: generate", "stage: generat"))
    assert "stages[1].stage" in msg and "generat" in msg and "generate" in msg


def test_wrong_field_type(pdir):
    msg = err(pdir, GOOD.replace("max_tokens: 8}", "max_tokens: 8}\n    n: many"))
    assert "stages[1].n" in msg and "integer" in msg


def test_unknown_field_in_stage(pdir):
    msg = err(pdir, GOOD.replace("prompt: p.jinja", "prompt: p.jinja\n    temprature: 3"))
    assert "stages[1]" in msg and "temprature" in msg


def test_unknown_sampling_param(pdir):
    msg = err(pdir, GOOD.replace("temperature: 0.5", "temprature: 0.5"))
    assert "stages[1]" in msg and "temprature" in msg


def test_top_level_type(pdir):
    msg = err(pdir, GOOD.replace("name: t", "name: t\nchunk_size: lots"))
    assert "chunk_size" in msg


def test_not_a_mapping(pdir):
    assert "mapping" in err(pdir, "- just\n- a list\n")


def test_missing_prompt_file(pdir):
    msg = err(pdir, GOOD.replace("p.jinja", "nope.jinja"))
    assert "stages[1]" in msg and "nope.jinja" in msg


def test_template_syntax_error(pdir):
    (pdir / "p.jinja").write_text("Answer: {{ instruction ")
    assert "syntax" in err(pdir, GOOD)


def test_missing_column_caught_before_model_work(pdir):
    (pdir / "p.jinja").write_text("Answer: {{ question }}")
    msg = err(pdir, GOOD)
    assert "question" in msg and "instruction" in msg


def test_first_stage_must_be_source(pdir):
    assert "first stage" in err(pdir, "name: t\nstages:\n  - stage: generate\n")


def test_read_user_file_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(InputError, match="line 2"):
        read_user_file(bad)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"a": "ok"}\n{"a": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(InputError, match="line 2.*UTF-8"):
        read_user_file(latin)
    with pytest.raises(InputError, match="not found"):
        read_user_file(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_empty_data_file_is_named_before_model_work(pdir, content):
    (pdir / "seeds.jsonl").write_text(content)
    f = write(pdir, GOOD)
    r = subprocess.run([sys.executable, "-m", "synthfb.cli", "validate", str(f)], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "seeds.jsonl: the dataset is empty (0 rows)" in r.stderr


def test_cli_reports_error_without_traceback(pdir):
    f = write(pdir, GOOD.replace("stage: generate", "stage: generat"))
    r = subprocess.run([sys.executable, "-m", "synthfb.cli", "validate", str(f)], capture_output=True, text=True)
    assert r.returncode == 2
    assert "synthfb: error:" in r.stderr and "Traceback" not in r.stderr


def test_cli_help_for_every_command():
    for args in ([], ["run"], ["validate"], ["card"], ["publish"], ["models"], ["models", "prepare"], ["models", "tiny"],
                 ["train"], ["train", "sft"], ["train", "rm"], ["train", "dpo"], ["train", "kto"], ["train", "ppo"],
                 ["loop"]):
        r = subprocess.run([sys.executable, "-m", "synthfb.cli", *args, "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "usage: synthfb" in r.stdout


def test_shipped_pipelines_validate():
    import yaml

    checked = loops = 0
    for f in sorted((REPO / "pipelines").glob("*.yaml")):
        if "rounds" in yaml.safe_load(f.read_text()):
            from synthfb.loop import load_loop

            load_loop(f)  # an RLAIF loop file (`synthfb loop`): stages, trainer sections, prompts
            loops += 1
            continue
        Pipeline.from_yaml(f).check_columns()
        checked += 1
    assert checked >= 9 and loops >= 4
