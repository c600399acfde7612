"""Bad input is refused up front with one line, never a traceback (issue #11).

Every case runs the real CLI in a subprocess (``synthfb validate``, ``synthfb
loop``, ``synthfb train sft``) and expects exit code 2 and a single stderr
line ``synthfb: error: <file>: <field path>: <what is wrong>``. No case loads
a model: ``validate`` never does, and the trainer refuses bad data before it
loads one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent

PIPELINE = """\
name: t
stages:
  - stage: load
    path: seeds.jsonl
  - stage: generate
    prompt: p.jinja
"""


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "synthfb.cli", *args], check=False, capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, no traceback, exactly one stderr line naming all ``needles``."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    line = lines[0]
    assert line.startswith("synthfb: error: "), line
    for n in needles:
        assert n in line, (n, line)
    return line


@pytest.fixture
def pdir(tmp_path: Path) -> Path:
    (tmp_path / "seeds.jsonl").write_text('{"instruction": "a", "prompt": "p", "response": "r"}\n'
                                          '{"instruction": "b", "prompt": "q", "response": "s"}\n')
    (tmp_path / "p.jinja").write_text("Answer: {{ instruction }}")
    (tmp_path / "adir").mkdir()
    return tmp_path


def validate(pdir: Path, text: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    f = pdir / "pipe.yaml"
    f.write_text(text)
    return cli("validate", str(f), cwd=cwd)


def test_good_pipeline_validates(pdir):
    r = validate(pdir, PIPELINE + "    sampling: {temperature: 1, top_p: 0.9, stop: '###', seed: 3}\n")
    assert r.returncode == 0, r.stderr
    assert "ok (2 stages" in r.stdout


# -- 1. sampling values and int fields -------------------------------------------------
@pytest.mark.parametrize("extra,field,what", [
    ("    sampling: {temperature: hot}", "stages[1].sampling.temperature", "number"),
    ("    sampling: {temperature: .nan}", "stages[1].sampling.temperature", "finite number"),
    ("    sampling: {stop: 5}", "stages[1].sampling.stop", "a string or a list of strings"),
    ("    sampling: {stop: [a, 1]}", "stages[1].sampling.stop", "a string or a list of strings"),
    ("    sampling: {max_tokens: 1.5}", "stages[1].sampling.max_tokens", "integer"),
    ("    sampling: {max_tokens: true}", "stages[1].sampling.max_tokens", "integer"),
    ("    sampling: {top_p: high}", "stages[1].sampling.top_p", "number"),
    ("    sampling: {presence_penalty: true}", "stages[1].sampling.presence_penalty", "number"),
    ("    sampling: {frequency_penalty: [1]}", "stages[1].sampling.frequency_penalty", "number"),
    ("    sampling: {presence_penalty: 5}", "stages[1]", "[-2, 2]"),
    ("    sampling: {seed: 1.5}", "stages[1].sampling.seed", "integer"),
    ("    sampling: {seed: 'x'}", "stages[1].sampling.seed", "integer"),
    ("    sampling: {n: 2}", "stages[1].sampling.n", "set by the stage's `n` field"),
    ("    n: 2.0", "stages[1].n", "integer"),
    ("    n: true", "stages[1].n", "integer"),
])
def test_bad_sampling_values(pdir, extra, field, what):
    one_line_error(validate(pdir, PIPELINE + extra + "\n"), "pipe.yaml", field, what)


def test_bad_sampling_in_other_fields_names_that_field(pdir):
    text = PIPELINE.replace("  - stage: generate\n    prompt: p.jinja\n",
                            "  - stage: cai_label\n    cot: true\n    cot_sampling: {temperature: hot}\n")
    one_line_error(validate(pdir, text), "stages[1].cot_sampling.temperature", "number")
    text = PIPELINE.replace("  - stage: generate\n    prompt: p.jinja\n",
                            "  - stage: judge_pairs\n    samples: 2.0\n")
    one_line_error(validate(pdir, text), "stages[1].samples", "integer")
    text = PIPELINE.replace("  - stage: generate\n    prompt: p.jinja\n",
                            "  - stage: backtranslate\n    sampling: {n: 2.0}\n")
    one_line_error(validate(pdir, text), "stages[1].sampling.n", "integer")


@pytest.mark.parametrize("stage,field,what", [
    ("  - stage: generate\n    prompt: p.jinja\n    json_schema: {type: 5}\n", "stages[1].json_schema",
     "not a valid JSON schema"),
    ("  - stage: onpolicy_pairs\n    ranker_options: [' (A)']\n", "stages[1].ranker_options", "two distinct"),
    ("  - stage: cai_label\n    options: [a, a]\n", "stages[1].options", "two distinct"),
])
def test_other_values_that_only_failed_after_the_model_loaded(pdir, stage, field, what):
    text = PIPELINE.split("  - stage: generate")[0] + stage
    one_line_error(validate(pdir, text), "pipe.yaml", field, what)


@pytest.mark.parametrize("extra,field", [("seed: 1.0", "seed"), ("chunk_size: 2.0", "chunk_size"),
                                         ("chunk_size: true", "chunk_size")])
def test_top_level_ints_refuse_floats_and_bools(pdir, extra, field):
    one_line_error(validate(pdir, PIPELINE.replace("name: t", f"name: t\n{extra}")), field, "integer")


def test_sampling_params_type_checks():
    from synthfb.llm.types import SamplingParams

    for bad in ({"n": True}, {"n": 2.0}, {"max_tokens": 1.5}, {"temperature": "hot"}, {"temperature": False},
                {"top_p": None}, {"stop": 5}, {"stop": ["a", 1]}, {"stop": [""]}, {"seed": 1.5}, {"seed": True},
                {"presence_penalty": "x"}, {"frequency_penalty": 3}):
        with pytest.raises(ValueError, match=f"sampling\\.{next(iter(bad))}"):
            SamplingParams.from_dict(bad)
    p = SamplingParams.from_dict({"temperature": 1, "top_p": 1, "stop": "###", "seed": 7, "presence_penalty": -2})
    assert p.temperature == 1 and p.stop == ("###",) and p.seed == 7
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    with pytest.raises(ValueError, match=r"^cot_sampling\.temperature: "):
        SamplingParams.from_dict({"temperature": "hot"}, where="cot_sampling")


# -- 2. reserved and empty column names ------------------------------------------------
@pytest.mark.parametrize("stage,field,value", [
    ("  - stage: generate\n    prompt: p.jinja\n    output_column: {v}\n", "output_column", "row_id"),
    ("  - stage: generate\n    prompt: p.jinja\n    output_column: {v}\n", "output_column", "provenance"),
    ("  - stage: generate\n    prompt: p.jinja\n    output_column: {v}\n", "output_column", "''"),
    ("  - stage: generate\n    input_column: {v}\n", "input_column", "''"),
    ("  - stage: realign_classify\n    output_column: {v}\n", "output_column", "row_id"),
    ("  - stage: self_instruct_classify\n    output_column: {v}\n", "output_column", "provenance"),
    ("  - stage: judge_pairs\n    responses_column: {v}\n", "responses_column", "provenance"),
    ("  - stage: realign_rewrite\n    evidence_column: {v}\n", "evidence_column", "'  '"),
])
def test_reserved_or_empty_column_names(pdir, stage, field, value):
    text = PIPELINE.split("  - stage: generate")[0] + stage.format(v=value)
    what = "reserved" if value.strip("'").strip() else "non-empty"
    one_line_error(validate(pdir, text), "pipe.yaml", f"stages[1].{field}", what)


def test_load_may_keep_row_ids_of_a_synthfb_file(pdir):
    (pdir / "seeds.jsonl").write_text('{"row_id": "a1", "instruction": "a"}\n{"row_id": "b2", "instruction": "b"}\n')
    r = validate(pdir, PIPELINE.replace("path: seeds.jsonl", "path: seeds.jsonl\n    id_column: row_id"))
    assert r.returncode == 0, r.stderr


# -- 3. a template path that is a directory --------------------------------------------
@pytest.mark.parametrize("stage,field", [
    ("  - stage: generate\n    prompt: adir\n", "prompt"),
    ("  - stage: cai_revise\n    style: separate\n    critique_prompt: adir\n", "critique_prompt"),
    ("  - stage: cai_revise\n    transcript_prompt: adir\n", "transcript_prompt"),
    ("  - stage: judge_pairs\n    judge_prompt: adir\n", "judge_prompt"),
])
def test_template_path_is_a_directory(pdir, stage, field):
    text = PIPELINE.split("  - stage: generate")[0] + stage
    one_line_error(validate(pdir, text), f"stages[1].{field}", "'adir' is a directory", str(pdir / "adir"))


def test_data_files_that_are_directories(pdir):
    text = PIPELINE.replace("  - stage: generate\n    prompt: p.jinja\n",
                            "  - stage: cai_revise\n    constitution: adir\n")
    one_line_error(validate(pdir, text), "stages[1].constitution", "is a directory")


# -- 4. sandbox-blocked expressions and loader tags ------------------------------------
@pytest.mark.parametrize("template,what", [
    ("{{ ''.__class__.__mro__ }}", "blocked by the template sandbox"),
    ("{{ instruction.__class__ }}", "blocked by the template sandbox"),
    ("{% if instruction == 'never' %}{{ instruction.__class__ }}{% endif %}", "blocked by the template sandbox"),
    ("{{ instruction|attr('__class__') }}", "blocked by the template sandbox"),
    ("{% set f = 'upper' %}{{ (instruction|attr(f)).__self__ }}", "blocked by the template sandbox"),
    ("{% include 'other.jinja' %}", "{% include %} is not supported"),
    ("{% import 'macros.jinja' as m %}{{ instruction }}", "{% import %} is not supported"),
    ("{% from 'macros.jinja' import f %}{{ instruction }}", "{% from ... import %} is not supported"),
    ("{% extends 'base.jinja' %}", "{% extends %} is not supported"),
])
def test_unsafe_or_multi_file_templates_fail_validate(pdir, template, what):
    (pdir / "p.jinja").write_text(template)
    one_line_error(validate(pdir, PIPELINE), "pipe.yaml", "stages[1].prompt", "p.jinja", what)


def test_templates_that_use_rows_normally_pass_the_probe(pdir):
    (pdir / "p.jinja").write_text("{% for d in instruction %}{{ d.text }}{{ loop.index }}{% endfor %}"
                                  "{{ instruction|upper }} {{ instruction['_id'] }} {{ (instruction ~ '!')|length }}")
    r = validate(pdir, PIPELINE)
    assert r.returncode == 0, r.stderr
    from synthfb.llm.prompts import PROMPTS_DIR, PromptTemplate

    for f in sorted(PROMPTS_DIR.glob("*.jinja")):  # every shipped template
        PromptTemplate(f.read_text(), str(f))


# -- 5. YAML: duplicate keys, alias bombs ----------------------------------------------
def _laughs(levels: int, where: str) -> str:
    lines = ["lol0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"lol{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, levels + 1)]
    return "\n".join(lines) + f"\n{where}: *l{levels}\n"


def test_duplicate_keys_name_the_line(pdir):
    one_line_error(validate(pdir, PIPELINE.replace("name: t", "name: t\nseed: 1\nseed: 2")),
                   "pipe.yaml", "line 3", "duplicate key 'seed' (first on line 2)")
    one_line_error(validate(pdir, PIPELINE + "    prompt: q.jinja\n"),
                   "line 7", "duplicate key 'prompt' (first on line 6)")


def test_merge_keys_may_override(pdir):
    text = PIPELINE + "    sampling:\n      <<: &base {temperature: 0.5, max_tokens: 8}\n      max_tokens: 16\n"
    r = validate(pdir, text)
    assert r.returncode == 0, r.stderr


def test_alias_bomb_refused_quickly(pdir):
    # 10 levels of 10 aliases: 10**10 nodes once expanded (a JSON schema check would never finish)
    text = PIPELINE.replace("name: t\n", "name: t\nx-anchors: &x\n" + "".join(
        "  " + line + "\n" for line in _laughs(10, "all").splitlines()[:-1]) + "backend_options: {bomb: *l10}\n")
    t0 = time.monotonic()
    r = validate(pdir, text)
    assert time.monotonic() - t0 < 30  # includes interpreter start-up; the check itself is below
    one_line_error(r, "pipe.yaml", "aliases expand this document to more than")
    bomb = PIPELINE + "    json_schema: *l10\n"
    bomb = bomb.replace("name: t\n", "name: t\n" + "".join(f"{line}\n" for line in
                                                            _laughs(10, "z").splitlines()[:-1]))
    one_line_error(validate(pdir, bomb), "pipe.yaml", "aliases expand this document")

    from synthfb.data import yamlio

    t0 = time.monotonic()
    with pytest.raises(yaml.YAMLError, match="aliases expand"):
        yamlio.safe_load(_laughs(10, "top"))
    with pytest.raises(yaml.YAMLError, match="recursive"):
        yamlio.safe_load("a: &a [1, *a]\n")
    assert time.monotonic() - t0 < 1.0
    assert yamlio.safe_load(_laughs(2, "top"))["top"][0][0][0] == "lol"  # small alias use is fine


def test_loop_and_train_files_use_the_same_loader(tmp_path):
    loop_text = (REPO / "pipelines" / "rlaif_tiny.yaml").read_text().replace(
        "prompts: data/", f"prompts: {REPO}/pipelines/data/")
    f = tmp_path / "loop.yaml"
    f.write_text(loop_text.replace("name: rlaif_tiny", "name: rlaif_tiny\nseed: 1\nseed: 2", 1))
    one_line_error(cli("loop", str(f), "--out", str(tmp_path / "out")), "loop.yaml", "duplicate key 'seed'")
    assert not (tmp_path / "out").exists()
    g = tmp_path / "sft.yaml"
    g.write_text(_laughs(10, "model"))
    one_line_error(cli("train", "sft", "--config", str(g)), "sft.yaml", "aliases expand")


# -- 6. names that would leave runs/ ---------------------------------------------------
@pytest.mark.parametrize("name", ["../../x", "/abs/x", "'.'", "'..'", "a/b", ".hidden", "'-x'", "'a b'"])
def test_pipeline_name_must_be_plain(pdir, name):
    one_line_error(validate(pdir, PIPELINE.replace("name: t", f"name: {name}")), "pipe.yaml", "name:",
                   "plain name")


def test_plain_names_pass(pdir):
    assert validate(pdir, PIPELINE.replace("name: t", "name: my-run_1.v2")).returncode == 0


def test_loop_name_must_be_plain(tmp_path):
    text = (REPO / "pipelines" / "rlaif_tiny.yaml").read_text().replace(
        "prompts: data/", f"prompts: {REPO}/pipelines/data/").replace("name: rlaif_tiny", "name: ../../escape", 1)
    f = tmp_path / "loop.yaml"
    f.write_text(text)
    one_line_error(cli("loop", str(f), "--out", str(tmp_path / "out")), "loop.yaml", "name:", "plain name")
    assert not (tmp_path / "out").exists()


# -- 7. trainer configs ------------------------------------------------------------------
@pytest.fixture
def tdir(tmp_path: Path) -> Path:
    (tmp_path / "model").mkdir()  # an existing folder: the config check passes, nothing loads it
    (tmp_path / "data.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    (tmp_path / "empty.jsonl").write_text("")
    return tmp_path


def train(tdir: Path, extra: str = "", dataset: str = "data.jsonl", model: str | None = None):
    f = tdir / "sft.yaml"
    f.write_text(f"model: {model or tdir / 'model'}\ndataset: {tdir / dataset}\noutput_dir: {tdir / 'out'}\n{extra}\n")
    return cli("train", "sft", "--config", str(f))


@pytest.mark.parametrize("extra,field,what", [
    ("grad_accum: 0", "grad_accum", ">= 1"),
    ("max_length: 0", "max_length", ">= 1"),
    ("batch_size: 0", "batch_size", ">= 1"),
    ("logging_steps: 0", "logging_steps", ">= 1"),
    ("learning_rate: 0", "learning_rate", "> 0"),
])
def test_train_counts_and_rates(tdir, extra, field, what):
    one_line_error(train(tdir, extra), "sft.yaml", f"{field}:", what)
    assert not (tdir / "out" / "metrics.jsonl").exists()


@pytest.mark.parametrize("extra,field,what", [
    ({"max_steps": 0}, "max_steps", ">= 1"),
    ({"save_steps": 0}, "save_steps", ">= 1"),
    ({"save_total_limit": 0}, "save_total_limit", ">= 1"),
    ({"max_prompt_length": -1}, "max_prompt_length", ">= 1"),
    ({"warmup_steps": -1}, "warmup_steps", ">= 0"),
    ({"learning_rate": -0.1}, "learning_rate", "> 0"),
    ({"num_epochs": 0}, "num_epochs", "> 0"),
    ({"max_grad_norm": float("nan")}, "max_grad_norm", "finite"),
    ({"adam_betas": [0.9, 1.5]}, "adam_betas", "[0, 1)"),
    ({"adam_betas": [0.9]}, "adam_betas", "[0, 1)"),
])
def test_train_bounds_in_config_loader(extra, field, what):
    # the same checks as above, without a subprocess each (the CLI path is covered there)
    from synthfb.train.config import ConfigError, load_config
    from synthfb.train.sft import SFTConfig

    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, {"model": "m", "dataset": "d", "output_dir": "o", **extra}, where="sft.yaml")
    assert str(e.value).startswith(f"sft.yaml: {field}: ") and what in str(e.value)


@pytest.mark.parametrize("model", ["./no/such/model", "/no/such/model"])
def test_train_missing_local_model_folder(tdir, model):
    one_line_error(train(tdir, model=model), "sft.yaml", "model:", repr(model), "local folder", "does not exist")


def test_hub_ids_stay_allowed():
    from synthfb.train.config import ConfigError, load_config, looks_like_path
    from synthfb.train.sft import SFTConfig

    cfg = load_config(SFTConfig, {"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "dataset": "d", "output_dir": "o"})
    assert cfg.model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    for missing in ("../missing-model", "runs/a/b", "~/no/such/model"):
        with pytest.raises(ConfigError, match=f"model: local folder {missing!r} does not exist"):
            load_config(SFTConfig, {"model": missing, "dataset": "d", "output_dir": "o"})
    assert not looks_like_path("user/name") and looks_like_path("./x") and looks_like_path("a/b/c")


def test_train_on_empty_dataset(tdir):
    one_line_error(train(tdir, dataset="empty.jsonl"), "empty.jsonl", "empty (0 rows)")


def test_rm_ppo_dpo_fields_checked_too():
    from synthfb.train.config import ConfigError, load_config
    from synthfb.train.dpo import DPOConfig
    from synthfb.train.ppo import PPOConfig

    base = {"model": "m", "dataset": "d", "output_dir": "o"}
    with pytest.raises(ConfigError, match="ref_batch_size: must be >= 1"):
        load_config(DPOConfig, {**base, "ref_batch_size": 0})
    with pytest.raises(ConfigError, match="learning_rate: must be > 0"):
        load_config(DPOConfig, {**base, "learning_rate": 0})
    with pytest.raises(ConfigError, match="reward_model: local folder"):
        load_config(PPOConfig, {**base, "reward_model": "./no/rm"})
    for k, v in (("ppo_epochs", 0), ("rollout_batch_size", 0), ("samples_per_prompt", 0), ("max_new_tokens", 0),
                 ("top_p", 0), ("top_p", 1.5), ("gamma", 2)):
        with pytest.raises(ConfigError, match=f"{k}: must be"):
            load_config(PPOConfig, {**base, "reward_function": "x:y", k: v})


# -- 8. where files are looked up; what the data card copies ---------------------------
def test_working_directory_is_not_searched(pdir, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("cwd")
    (elsewhere / "only-here.jinja").write_text("{{ instruction }}")
    r = validate(pdir, PIPELINE.replace("p.jinja", "only-here.jinja"), cwd=elsewhere)
    one_line_error(r, "stages[1].prompt", "'only-here.jinja' not found")
    assert str(elsewhere) not in r.stderr


def test_shipped_prompts_and_default_data_files_resolve_from_anywhere(pdir):
    # a pipeline outside the checkout: shipped template names and the defaults of
    # `constitution` and `formats` still find synthfb's own files
    text = PIPELINE.replace("prompt: p.jinja", "prompt: respond.jinja") + (
        "  - stage: cai_revise\n    response_column: response\n    rounds: 1\n"
        "  - stage: realign_classify\n")
    r = validate(pdir, text, cwd=pdir)
    assert r.returncode == 0, r.stderr


def test_every_shipped_pipeline_still_validates():
    for f in sorted((REPO / "pipelines").glob("*.yaml")):
        if "rounds" in yaml.safe_load(f.read_text()):
            continue  # loop files: tests/test_pipeline_validation.py loads them
        r = cli("validate", str(f), cwd=Path("/"))
        assert r.returncode == 0, (f, r.stderr)


def _generate_record(pdir: Path, **config) -> dict:
    from synthfb.stages import STAGES

    st = STAGES["generate"].from_dict(config, pdir)
    return {"index": 1, "kind": "generate", "config": json.loads(json.dumps(dataclasses.asdict(st.config))),
            "template_sha256": st.template_sha256, "templates": st.templates_used()}


def test_card_copies_only_the_templates_the_run_used(pdir):
    from synthfb.cards.builder import _prompt_files

    (pdir / "secret.txt").write_text("API_KEY=hunter2")
    rec = _generate_record(pdir, prompt="p.jinja", system="secret.txt", input_column="notes.txt")
    got = _prompt_files(rec, pdir)
    assert [(p["field"], p["file"], p["text"]) for p in got] == [("prompt", "p.jinja", "Answer: {{ instruction }}")]
    assert got[0]["sha256"] == rec["template_sha256"]
    # the file changed since the run: listed, text left empty
    (pdir / "p.jinja").write_text("Answer differently: {{ instruction }}")
    assert [p["text"] for p in _prompt_files(rec, pdir)] == [""]
    # a recorded hash that the file does not have: nothing copied
    (pdir / "p.jinja").write_text("API_KEY=hunter2")
    rec_other = dict(rec, templates=[dict(x, sha256="0" * 64) for x in rec["templates"]])
    assert all(p["text"] == "" for p in _prompt_files(rec_other, pdir))
    # no template recorded (the stage used none): nothing listed
    assert _prompt_files(dict(rec, templates=[]), pdir) == []
    assert _prompt_files(_generate_record(pdir, system="secret.txt"), pdir) == []


def test_card_lists_each_template_of_a_multi_template_stage(pdir):
    from synthfb.cards.builder import _prompt_files
    from synthfb.stages import STAGES

    st = STAGES["self_instruct_instances"].from_dict({}, pdir)
    rec = {"index": 2, "kind": st.kind, "config": json.loads(json.dumps(dataclasses.asdict(st.config))),
           "template_sha256": st.template_sha256, "templates": st.templates_used()}
    got = _prompt_files(rec, pdir)
    assert [p["field"] for p in got] == ["input_first_prompt", "output_first_prompt"]
    assert all(p["text"] and hashlib.sha256(p["text"].encode()).hexdigest() == p["sha256"] for p in got)
