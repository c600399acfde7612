"""One configuration system (issue #12 item 4): pipelines, loop files and
trainer configs are config dataclasses checked by one schema builder and one
validator with one error format, ``synthfb validate`` takes pipeline and loop
files, and one method registry serves ``synthfb train`` and ``synthfb loop``.

Nothing here loads a model or trains."""

from __future__ import annotations

import ast
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from synthfb.cli import main
from synthfb.data import config as dconfig

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted((REPO / "pipelines").glob("*.yaml"))
LOOP = (REPO / "pipelines" / "rlaif_tiny.yaml").read_text()
LOOP_PPO = (REPO / "pipelines" / "rlaif_tiny_ppo.yaml").read_text()


def validate_cli(capsys, path: Path) -> tuple[int, str, str]:
    rc = main(["validate", str(path)])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line(capsys, path: Path) -> str:
    """``synthfb validate PATH`` fails with exit 2 and one stderr line."""
    rc, out, err = validate_cli(capsys, path)
    assert rc == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"synthfb: error: {path}: "), err
    return lines[0]


def loop_file(tmp_path: Path, text: str = LOOP, *edits: tuple[str, str]) -> Path:
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new, 1)
    f = tmp_path / "loop.yaml"
    f.write_text(text.replace("prompts: data/", f"prompts: {REPO}/pipelines/data/"))
    return f


# --- synthfb validate: pipeline and loop files -------------------------------------------------

@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_validate_accepts_every_shipped_file(capsys, path):
    rc, out, err = validate_cli(capsys, path)
    assert rc == 0, err
    kind = "pipeline" if "stages" in yaml.safe_load(path.read_text()) else "loop"
    assert out.startswith(f"{kind} file {path}: ok ("), out


def test_validate_covers_loops_and_pipelines():
    kinds = ["stages" in yaml.safe_load(p.read_text()) for p in SHIPPED]
    assert kinds.count(True) >= 9 and kinds.count(False) >= 4


def test_validate_reports_the_loop(capsys):
    rc, out, _ = validate_cli(capsys, REPO / "pipelines" / "rlaif_tiny.yaml")
    assert rc == 0 and "(2 rounds, method dpo, pairs stages: onpolicy_pairs;" in out
    rc, out, _ = validate_cli(capsys, REPO / "pipelines" / "rlaif_tiny_ppo.yaml")
    assert rc == 0 and "method rm_ppo (rm -> ppo)" in out


def test_validate_cli_subprocess_loop_file():
    r = subprocess.run([sys.executable, "-m", "synthfb.cli", "validate", "pipelines/rlaif_tiny.yaml"],
                       check=False, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith("loop file pipelines/rlaif_tiny.yaml: ok (2 rounds, method dpo")


@pytest.mark.parametrize("edits,expected", [
    ((("rounds: 2", "rounds: two"),), "rounds: expected integer, got str 'two'"),
    ((("rounds: 2", "rounds: 0"),), "rounds: must be >= 1, got 0"),
    ((("limit: 4", "limit: 4\nroundz: 3"),), "(top level): unknown field(s) ['roundz'] (did you mean `rounds`?)"),
    ((("  max_steps: 2", "  max_steps: 0"),), "train.max_steps: must be >= 1, got 0"),
    ((("  max_steps: 2", "  max_stepz: 2"),), "train: unknown field(s) ['max_stepz'] (did you mean `max_steps`?)"),
    ((("  learning_rate: 1.0e-3", "  learning_rate: fast"),), "train.learning_rate: expected number, got str 'fast'"),
    ((("  beta: 0.1", "  beta: -1"),), "train: field `beta` must be > 0"),
    ((("  max_steps: 2", "  model: other"),), "train.model: set by the loop"),
    ((("      n: 3", "      n: many"),), "pairs.stages[0].n: expected integer, got str 'many'"),
    ((("  chunk_size: 2 ", "  chunk_size: 0 "),), "pairs.chunk_size: must be >= 1, got 0"),
    ((("  judge_prompt: heldout_judge.jinja", "  options: [' (A)']"),),
     "eval.options: expected exactly 2 items, got 1"),
    ((("name: rlaif_tiny", "name: ../x"),), "name: '../x' is not allowed; expected a plain name"),
    ((("method: rm_ppo", "method: ppo"),), "method: 'ppo' is not one of ['dpo', 'kto', "),
])
def test_loop_file_errors_are_one_line_naming_the_field(tmp_path, capsys, edits, expected):
    text = LOOP_PPO if any("rm_ppo" in old for old, _ in edits) else LOOP
    f = loop_file(tmp_path, text, *edits)
    line = one_line(capsys, f)
    assert expected in line, line


def test_loop_file_without_eval_is_still_a_loop_file(tmp_path, capsys):
    line = one_line(capsys, loop_file(tmp_path, LOOP[:LOOP.index("\neval:")] + "\n"))
    assert line.endswith(": eval: required field is missing (held-out prompts: each round's policy against the "
                         "round-0 policy)"), line


@pytest.mark.parametrize("edits,expected", [
    ((("  kl_coef: 0.05", "  kl_coef: -1"),), "ppo.kl_coef: must be >= 0, got -1"),
    ((("  kl_coef: 0.05", "  top_p: 1.5"),), "ppo.top_p: must be <= 1, got 1.5"),
    ((("  max_steps: 3\n", "  model: ./no/such/rm\n"),), "rm.model: local folder './no/such/rm' does not exist"),
    ((("  max_steps: 3\n", "  max_steps: 3\n  adam_betas: [0.9, 1.5]\n"),),
     "rm.adam_betas: expected two numbers in [0, 1), got [0.9, 1.5]"),
    ((("method: rm_ppo", "method: dpo"),), "rm: not used by method 'dpo'"),
])
def test_rm_ppo_loop_file_errors(tmp_path, capsys, edits, expected):
    line = one_line(capsys, loop_file(tmp_path, LOOP_PPO, *edits))
    assert expected in line, line


def test_pipeline_errors_use_the_same_format(tmp_path, capsys):
    (tmp_path / "seeds.jsonl").write_text('{"instruction": "a"}\n')
    f = tmp_path / "pipe.yaml"
    f.write_text("name: t\nstages:\n  - stage: load\n    path: seeds.jsonl\n    id_colum: id\n")
    line = one_line(capsys, f)
    assert line.endswith("stages[0]: unknown field(s) ['id_colum'] (did you mean `id_column`?); expected some of "
                         "['dedupe', 'id_column', 'limit', 'path', 'require']"), line
    f.write_text("name: t\n")  # neither stages nor loop keys: a pipeline missing its stages
    assert "stages: required field is missing" in one_line(capsys, f)
    f.write_text("name: t\nstages: [{stage: load, path: seeds.jsonl}]\nname: u\n")
    assert "duplicate key 'name'" in one_line(capsys, f)


# --- trainer configs: the shared builder and validator ----------------------------------------

def test_train_bounds_come_from_the_shared_schema():
    from synthfb.train.config import ConfigError, config_schema, load_config
    from synthfb.train.dpo import DPOConfig
    from synthfb.train.ppo import PPOConfig
    from synthfb.train.sft import SFTConfig

    assert issubclass(ConfigError, dconfig.ConfigError)
    props = config_schema(SFTConfig)["properties"]
    assert props["max_steps"]["minimum"] == 1 and props["warmup_steps"]["minimum"] == 0
    assert props["learning_rate"]["exclusiveMinimum"] == 0
    assert props["max_steps"]["description"].startswith("optimizer steps")
    assert set(config_schema(SFTConfig)["required"]) == {"model", "dataset", "output_dir"}
    pp = config_schema(PPOConfig)["properties"]
    assert pp["top_p"]["exclusiveMinimum"] == 0 and pp["top_p"]["maximum"] == 1
    base = {"model": "m", "dataset": "d", "output_dir": "o"}
    for cls, extra in ((SFTConfig, {"max_steps": 0}), (SFTConfig, {"learning_rate": 0}),
                       (DPOConfig, {"ref_batch_size": 0}), (PPOConfig, {"gamma": 2}),
                       (SFTConfig, {"max_grad_norm": float("inf")}), (SFTConfig, {"adam_betas": [1, 0]}),
                       (SFTConfig, {"lerning_rate": 1e-5})):
        data = {**base, **extra}
        with pytest.raises(dconfig.ConfigError) as shared:
            dconfig.validate(data, dconfig.dataclass_schema(cls), "sft.yaml")
        with pytest.raises(ConfigError) as loaded:
            load_config(cls, data, where="sft.yaml")
        assert str(loaded.value) == str(shared.value), (extra, str(loaded.value))
        assert "\n" not in str(loaded.value)


def test_train_cli_errors_one_line(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    f = tmp_path / "sft.yaml"
    f.write_text(f"model: {tmp_path / 'model'}\ndataset: d.jsonl\noutput_dir: {tmp_path / 'out'}\nmax_steps: 0\n")
    assert main(["train", "sft", "--config", str(f)]) == 2
    assert capsys.readouterr().err.strip() == f"synthfb: error: {f}: max_steps: must be >= 1, got 0"
    f.write_text(f"model: {tmp_path / 'model'}\ndataset: d.jsonl\noutput_dir: {tmp_path / 'out'}\n")
    assert main(["train", "sft", "--config", str(f), "--set", "learning_rate=fast"]) == 2
    assert capsys.readouterr().err.strip() == (
        "synthfb: error: --set learning_rate=fast: learning_rate: expected number, got str 'fast'")
    assert main(["train", "sft", "--config", str(f), "--set", "max_steps"]) == 2
    assert "expected FIELD=VALUE" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_train_cli_sets_are_checked_together(tmp_path, capsys):
    """`--set ranked=true --set center_rewards_coef=0` is valid in either order (the config is checked once,
    after every override); a conflict left in place is still a one-line error naming the overrides."""
    from synthfb.train.config import load_config
    from synthfb.train.rm import RMConfig

    (tmp_path / "model").mkdir()
    f = tmp_path / "rm.yaml"
    f.write_text(f"model: {tmp_path / 'model'}\ndataset: d.jsonl\noutput_dir: {tmp_path / 'out'}\n"
                 "center_rewards_coef: 0.01\n")
    assert main(["train", "rm", "--config", str(f), "--set", "ranked=true"]) == 2
    assert capsys.readouterr().err.strip() == ("synthfb: error: --set ranked=true: field `center_rewards_coef` is for "
                                               "pairs; ranked lists (ranked: true) do not use it")
    # the later override lifts the conflict; the error left is the one in the whole set (max_steps)
    assert main(["train", "rm", "--config", str(f), "--set", "ranked=true", "--set", "center_rewards_coef=0",
                 "--set", "max_steps=0"]) == 2
    assert capsys.readouterr().err.strip() == ("synthfb: error: --set ranked=true center_rewards_coef=0 max_steps=0: "
                                               "max_steps: must be >= 1, got 0")
    base = {"model": str(tmp_path / "model"), "dataset": "d.jsonl", "output_dir": str(tmp_path / "out")}
    assert load_config(RMConfig, {**base, "ranked": True, "center_rewards_coef": 0}).ranked
    assert not (tmp_path / "out").exists()


@dataclasses.dataclass
class Inner:
    k: int = dconfig.option(1, "a count", ge=1)


@dataclasses.dataclass
class Outer:
    rate: float = dconfig.option(help="a rate", gt=0, le=1)
    inner: Inner = dconfig.option(help="nested")
    n: int | None = dconfig.option(None, "optional count", ge=1)
    tags: dict[str, int] = dconfig.option({}, "counts by name")


def test_dataclass_schema_bounds_and_nesting():
    schema = dconfig.dataclass_schema(Outer)
    assert schema["required"] == ["rate", "inner"]
    ok = {"rate": 0.5, "n": None, "inner": {"k": 2}, "tags": {"a": 1}}
    dconfig.validate(ok, schema, "x.yaml")
    built = dconfig.build(Outer, {**ok, "rate": 1})
    assert built.rate == 1.0 and isinstance(built.rate, float) and built.inner == Inner(2)
    for bad, msg in (({"rate": 0}, "rate: must be > 0, got 0"), ({"rate": 2}, "rate: must be <= 1, got 2"),
                     ({"n": 0}, "n: must be >= 1, got 0"), ({"inner": {"k": 0}}, "inner.k: must be >= 1, got 0"),
                     ({"inner": {"kk": 1}}, "inner: unknown field(s) ['kk'] (did you mean `k`?)"),
                     ({"tags": {"a": "x"}}, "tags.a: expected integer, got str 'x'"),
                     ({"rate": float("nan")}, "rate: expected a finite number, got nan"),
                     ({"n": 2.0}, "n: expected integer or null, got float 2.0")):
        with pytest.raises(dconfig.ConfigError) as e:
            dconfig.validate({**ok, **bad}, schema, "x.yaml", prefix=[])
        assert str(e.value).startswith(f"x.yaml: {msg}"), str(e.value)


# --- one method registry for `synthfb train` and `synthfb loop` --------------------------------

def _help(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "synthfb.cli", *args, "--help"], check=False, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_one_registry_for_train_and_loop():
    from synthfb.loop.config import METHODS, loop_schema
    from synthfb.train import methods

    trainers = methods.trainers()
    text = _help("train")
    listed = re.findall(r"^    ([a-z_]+) {2,}", text, flags=re.MULTILINE)  # the TRAINER sub-commands
    assert listed == list(trainers) == ["sft", "rm", "dpo", "kto", "ppo"]
    for name, m in trainers.items():
        assert m.help in " ".join(text.replace("-\n", "-").split()).replace("- ", "-")
    # the loop's methods are registry entries whose steps are the trainers `synthfb train` runs
    assert list(METHODS) == list(methods.loop_methods()) == loop_schema()["properties"]["method"]["enum"]
    assert set(METHODS) <= set(methods.METHODS)
    for name in METHODS:
        steps = methods.get(name).step_methods()
        assert steps and all(s.name in listed for s in steps) and steps[-1].produces == "policy"
    loop_help = " ".join(_help("loop").split())
    assert all(f"{name}: " in loop_help for name in METHODS)
    # each trainer section of a loop file is validated against the same config class `synthfb train` uses
    for section, m in methods.loop_sections().items():
        assert section in loop_schema()["properties"] and m.config is trainers[m.name].config


def test_loop_code_names_no_method():
    """Which trainer the loop calls comes from the registry: no `method == "rm_ppo"`-style branches."""
    from synthfb.train.methods import METHODS

    for name in ("train.py", "runner.py", "cli.py", "config.py"):
        tree = ast.parse((REPO / "synthfb" / "loop" / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                consts = [c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                assert not set(consts) & set(METHODS), f"synthfb/loop/{name}:{node.lineno} compares with a method name"


def test_registry_is_import_light():
    code = ("import sys, synthfb.train.methods as m, synthfb.loop.config; "
            "assert 'torch' not in sys.modules, 'torch imported'; print(sorted(m.METHODS))")
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


def test_shipped_files_by_name(tmp_path, capsys, monkeypatch):
    """`synthfb validate quickstart` / `rlaif_tiny.yaml` from any folder name the
    shipped files; a path that exists always wins; an unknown name is an error."""
    monkeypatch.chdir(tmp_path)
    assert main(["validate", "quickstart"]) == 0
    assert "pipelines/quickstart.yaml: ok" in capsys.readouterr().out
    assert main(["validate", "rlaif_tiny.yaml"]) == 0
    assert capsys.readouterr().out.startswith("loop file ")
    (tmp_path / "quickstart").write_text("name: [")
    assert main(["validate", "quickstart"]) == 2  # the user's own file, not the shipped one
    capsys.readouterr()
    assert main(["validate", "no_such_pipeline"]) == 2
    assert "no_such_pipeline" in capsys.readouterr().err
