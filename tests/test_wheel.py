"""The wheel is a real package: it carries the prompt templates, the data-card
templates and the shipped pipelines (as ``synthfb/_shipped/``), and an
installed copy validates every shipped pipeline and loop file on its own,
without the checkout.

The build runs on a copy of the checkout's package files (so nothing is
written into the checkout), offline: ``--no-build-isolation --no-index`` with
the venv's setuptools. No model is loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("prompts", "data_cards", "pipelines")
# What a build needs from the checkout; everything else (tests, bench, venvs, runs, build output) stays behind.
BUILD_INPUTS = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "synthfb", *SHIPPED)
JUNK = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", "*.egg-info", ".DS_Store")
# The venv's installed dependencies (datasets, yaml, jinja2, ...), put on the path explicitly: the
# subprocesses run with -S, so no .pth file (in particular the editable install's finder, which maps
# `synthfb` to this checkout) is processed.
DEPS = sysconfig.get_paths()["purelib"]
# -P (3.11+): the script's folder / the cwd is not put first on sys.path (both are temp folders anyway)
NO_SAFE_PATH = ["-P"] if sys.version_info >= (3, 11) else []

pytestmark = pytest.mark.timeout(300)


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo")}


def _shipped_files() -> set[str]:
    """Every file of the shipped folders in the checkout, as ``name/relative/path``."""
    return {f"{name}/{f}" for name in SHIPPED for f in _files(ROOT / name)}


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 120) -> str:
    r = subprocess.run(cmd, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-6000:]}"
    return r.stdout


def _pip(*args: str, cwd: Path) -> str:
    return _run([sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", *args], cwd)


def _isolated_env(*path: Path | str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_", "SYNTHFB_"))}
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (*path, DEPS))
    env["PYTHONNOUSERSITE"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    return env


def _python(script: Path, *args: str, path: list[Path | str], cwd: Path) -> str:
    """Run ``script`` with -S: no site, so no .pth file runs; sys.path is ``path`` and the venv's deps."""
    env = _isolated_env(*path)
    env["SYNTHFB_HOME"] = str(cwd / "home")
    return _run([sys.executable, "-S", *NO_SAFE_PATH, str(script), *args], cwd, env)


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """A copy of the checkout's build inputs, the wheel built from it, and the wheel installed with --target."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        p = ROOT / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=JUNK)
        elif p.exists():
            shutil.copy2(p, src / name)
    _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(tmp / "dist"), str(src), cwd=tmp)
    (wheel,) = (tmp / "dist").glob("synthfb-*.whl")
    site = tmp / "site"
    _pip("install", "--no-deps", "--no-index", "-q", "--no-compile", "--target", str(site), str(wheel), cwd=tmp)
    work = tmp / "work"  # the cwd of every installed-copy check: outside the checkout and the copy
    work.mkdir()
    return {"tmp": tmp, "src": src, "wheel": wheel, "site": site, "work": work}


def test_wheel_carries_the_shipped_folders(build):
    names = set(zipfile.ZipFile(build["wheel"]).namelist())
    shipped = {n.removeprefix("synthfb/_shipped/") for n in names if n.startswith("synthfb/_shipped/")}
    expected = _shipped_files()
    assert expected - shipped == set(), "shipped files missing from the wheel"
    assert shipped - expected == set(), "files in the wheel's synthfb/_shipped/ that are not in the checkout"
    # the ones a prompted stage, a card and a shipped pipeline need, by name
    jinja = {f"prompts/{p.name}" for p in (ROOT / "prompts").glob("*.jinja")}
    assert len(jinja) >= 10 and jinja <= shipped
    assert {"data_cards/card.md.jinja", "data_cards/card_metadata.schema.json"} <= shipped
    yamls = {f"pipelines/{p.relative_to(ROOT / 'pipelines').as_posix()}" for p in (ROOT / "pipelines").rglob("*.yaml")}
    assert {"pipelines/quickstart.yaml", "pipelines/rlaif_tiny.yaml", "pipelines/data/constitution.yaml",
            "pipelines/data/realign_formats.yaml"} <= yamls <= shipped
    assert {f"pipelines/{p.relative_to(ROOT / 'pipelines').as_posix()}"
            for p in (ROOT / "pipelines").rglob("*.jsonl")} <= shipped
    # the code: every module of the checkout's package
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "synthfb").rglob("*.py")
               if "__pycache__" not in p.parts}
    assert modules - names == set(), "synthfb modules missing from the wheel"
    assert not any(n.endswith((".pyc", ".pyo")) or "__pycache__" in n for n in names)
    # the stage-kind entry points travel in the metadata
    ep = zipfile.ZipFile(build["wheel"]).read("synthfb-0.1.0.dist-info/entry_points.txt").decode()
    assert "[synthfb.stages]" in ep and "builtin = synthfb.stages" in ep


# Runs in the installed copy (sys.path: the --target folder, then the venv's dependencies; no .pth).
VALIDATE = r'''
import json, sys
from pathlib import Path

site = Path(sys.argv[1]).resolve()
work = Path.cwd().resolve()
out = {}

def under(p, root):
    return Path(p).resolve().is_relative_to(root)

import synthfb
assert under(synthfb.__file__, site), f"synthfb imported from {synthfb.__file__}, not from {site}"

from synthfb.data.shipped import shipped_dir, SHIPPED
for name in SHIPPED:
    d = shipped_dir(name)
    assert d.is_dir() and d.resolve() == site / "synthfb" / "_shipped" / name, (name, d)

# the stage kinds come through the entry-point group, from the installed metadata
import importlib.metadata as md
dist = md.distribution("synthfb")
assert under(dist.locate_file("synthfb"), site), dist.locate_file("synthfb")
eps = [ep for ep in md.entry_points(group="synthfb.stages") if ep.name == "builtin"]
assert eps and eps[0].value == "synthfb.stages", eps
assert under(eps[0].load().__file__, site)
from synthfb.engine.stage import stage_kinds
kinds = stage_kinds()
for k in ("load", "generate", "realign_classify", "cai_revise", "cai_label", "judge_pairs", "onpolicy_pairs"):
    assert k in kinds, (k, sorted(kinds))
out["kinds"] = sorted(kinds)

# the data card templates
from synthfb.cards import builder
assert builder.TEMPLATE_PATH.is_file() and under(builder.TEMPLATE_PATH, site)
assert builder.SCHEMA_PATH.is_file() and under(builder.SCHEMA_PATH, site)

# every shipped pipeline and loop file
import yaml
from synthfb.engine import Pipeline
from synthfb.loop.config import load_loop
pipelines, loops = [], []
for path in sorted(shipped_dir("pipelines").glob("*.yaml")):
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if "rounds" in data or "pairs" in data:
        cfg = load_loop(path)
        assert cfg.prompts and cfg.eval.prompts
        loops.append(path.name)
    else:
        p = Pipeline.from_yaml(path)
        p.check_columns()
        pipelines.append(path.name)
out["pipelines"], out["loops"] = pipelines, loops

# a user's pipeline outside any synthfb folder: shipped prompt templates by name, and the
# stages' shipped defaults (realign formats, CAI constitution) come from the installed copy
data = shipped_dir("pipelines") / "data"
user = work / "user_pipeline.yaml"
user.write_text(f"""
name: user_defaults
backend: vllm
model: default
stages:
  - stage: load
    path: {data / 'realign_examples.jsonl'}
    require: [instruction, output]
  - stage: realign_classify
  - stage: generate
    prompt: respond.jinja
    output_column: response
  - stage: cai_revise
    prompt_column: instruction
    response_column: response
""", encoding="utf-8")
p = Pipeline.from_yaml(user)
p.check_columns()
from synthfb.llm.prompts import PromptTemplate
for name in sorted(q.name for q in shipped_dir("prompts").glob("*.jinja")):
    assert under(PromptTemplate.load(name, work).source, site / "synthfb" / "_shipped" / "prompts"), name

# nothing of synthfb came from anywhere but the installed copy
stray = {m: getattr(mod, "__file__", None) for m, mod in list(sys.modules.items())
         if m.split(".")[0] == "synthfb" and getattr(mod, "__file__", None) and not under(mod.__file__, site)}
assert not stray, stray
print(json.dumps(out))
'''


def test_installed_copy_validates_every_shipped_file(build):
    site, work = build["site"], build["work"]
    script = work / "validate.py"
    script.write_text(VALIDATE, encoding="utf-8")
    out = json.loads(_python(script, str(site), path=[site], cwd=work).strip().splitlines()[-1])
    expected = sorted(p.name for p in (ROOT / "pipelines").glob("*.yaml"))
    assert sorted(out["pipelines"] + out["loops"]) == expected
    assert "quickstart.yaml" in out["pipelines"] and "rlaif_tiny.yaml" in out["loops"]


def test_cli_validates_a_shipped_pipeline_from_the_installed_copy(build):
    site, work = build["site"], build["work"]
    quickstart = site / "synthfb" / "_shipped" / "pipelines" / "quickstart.yaml"
    env = _isolated_env(site)
    env["SYNTHFB_HOME"] = str(work / "home")
    out = _run([sys.executable, "-S", *NO_SAFE_PATH, "-m", "synthfb.cli", "validate", str(quickstart)], work, env)
    assert f"{quickstart}: ok" in out and "generate" in out, out


def test_sdist_carries_the_shipped_folders_and_builds_the_same_wheel(build):
    tmp, src = build["tmp"], build["src"]
    sdist_dir = tmp / "sdist"
    script = ("import sys; from setuptools import build_meta as b; "
              "print(b.build_sdist(sys.argv[1]))")
    name = _run([sys.executable, "-c", script, str(sdist_dir)], src).strip().splitlines()[-1]
    sdist = sdist_dir / name
    with tarfile.open(sdist) as tar:
        top = tar.getnames()[0].split("/")[0]
        members = {n.removeprefix(top + "/") for n in tar.getnames()}
    assert _shipped_files() <= members
    assert {"setup.py", "pyproject.toml", "MANIFEST.in"} <= members
    _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(tmp / "dist2"), str(sdist),
         cwd=tmp)
    (wheel2,) = (tmp / "dist2").glob("synthfb-*.whl")
    assert set(zipfile.ZipFile(wheel2).namelist()) == set(zipfile.ZipFile(build["wheel"]).namelist())


EDITABLE = r'''
import site, sys
from pathlib import Path

src = Path(sys.argv[2]).resolve()
# the editable install's .pth imports its finder module, which maps synthfb to src; the target goes
# first, ahead of the venv's own finder module of the same name (the venv's editable install)
sys.path.insert(0, sys.argv[1])
site.addsitedir(sys.argv[1])
import synthfb
from synthfb.data.shipped import shipped_dir, SHIPPED
from synthfb.llm.prompts import PromptTemplate
assert Path(synthfb.__file__).resolve().is_relative_to(src), synthfb.__file__
for name in SHIPPED:
    assert shipped_dir(name).resolve() == src / name, (name, shipped_dir(name))
assert Path(PromptTemplate.load("respond.jinja", Path.cwd()).source).resolve() == src / "prompts" / "respond.jinja"
print("ok")
'''


def test_editable_install_uses_the_checkout_folders(build):
    """``pip install -e .`` (install.sh): nothing is copied; shipped_dir falls back to the repo's folders."""
    tmp, src, work = build["tmp"], build["src"], build["work"]
    out_dir = tmp / "editable"
    script = ("import sys; from setuptools import build_meta as b; "
              "print(b.build_editable(sys.argv[1]))")
    name = _run([sys.executable, "-c", script, str(out_dir)], src).strip().splitlines()[-1]
    wheel = out_dir / name
    assert not [n for n in zipfile.ZipFile(wheel).namelist() if "_shipped" in n]
    assert not (src / "synthfb" / "_shipped").exists()
    target = tmp / "editable_site"
    _pip("install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheel), cwd=tmp)
    script_path = work / "editable_check.py"
    script_path.write_text(EDITABLE, encoding="utf-8")
    assert _python(script_path, str(target), str(src), path=[], cwd=work).strip().endswith("ok")
