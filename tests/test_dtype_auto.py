"""`dtype: auto`: resolved per machine, shipped everywhere, recorded as resolved;
and model identity in run records and cards without local paths."""

from __future__ import annotations

import dataclasses
import inspect
import json
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ has no __init__.py
from fakes import FakeGenerator

from synthfb.engine import Pipeline, Runner
from synthfb.llm.models import cpu_has_native_bf16, resolve_dtype

REPO = Path(__file__).resolve().parent.parent

# /proc/cpuinfo excerpts (flags lines shortened; real layout: "key\t: value")
AVX2_ONLY = ("processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu vme sse sse2 ssse3 fma avx avx2 avx512f "
             "avx512bw avx512vl avx512_vnni\n\nprocessor\t: 1\nflags\t\t: fpu sse sse2 avx avx2\n")
AVX512_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512_bf16 avx512_vnni\n"
AMX = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f amx_bf16 amx_tile amx_int8\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics bf16 i8mm\n"
ARM_PLAIN = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32\n"
# a flag that merely contains "bf16" as part of another word is not native bf16
LOOKALIKE = "processor\t: 0\nflags\t\t: fpu avx2 xbf16x avx512_bf16_lookalike\nmodel name\t: bf16 edition\n"


@pytest.mark.parametrize("cpuinfo,native", [(AVX2_ONLY, False), (AVX512_BF16, True), (AMX, True), (ARM_BF16, True),
                                            (ARM_PLAIN, False), (LOOKALIKE, False), ("", False)])
def test_native_bf16_from_cpuinfo(cpuinfo, native):
    assert cpu_has_native_bf16(cpuinfo) is native
    assert resolve_dtype("auto", device="cpu", cpuinfo=cpuinfo) == ("bfloat16" if native else "float32")


def test_auto_on_gpu_and_explicit_values():
    assert resolve_dtype("auto", device="cuda", gpu_bf16=True) == "bfloat16"
    assert resolve_dtype("auto", device="cuda:0", gpu_bf16=False) == "float16"  # pre-Ampere GPUs have no bf16
    assert resolve_dtype(None, device="cpu", cpuinfo=AVX2_ONLY) == "float32"
    for given, want in [("float32", "float32"), ("float", "float32"), ("bf16", "bfloat16"), ("BFloat16", "bfloat16"),
                        ("half", "float16"), ("float16", "float16")]:
        # an explicit dtype is kept on any machine
        assert resolve_dtype(given, device="cpu", cpuinfo=AVX2_ONLY) == want
        assert resolve_dtype(given, device="cuda", gpu_bf16=True) == want
    with pytest.raises(ValueError, match="dtype 'int8'"):
        resolve_dtype("int8")


def test_this_machine_resolves_from_its_own_flags():
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.split(":")[0].strip() in ("flags", "Features"):
            flags |= set(line.split(":", 1)[1].split())
    native = bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    assert resolve_dtype("auto", device="cpu") == ("bfloat16" if native else "float32")


def test_backends_default_to_auto():
    from synthfb.llm.hf_backend import TransformersGenerator
    from synthfb.llm.vllm_backend import VLLMGenerator

    for cls in (VLLMGenerator, TransformersGenerator):
        assert inspect.signature(cls.__init__).parameters["dtype"].default == "auto", cls


def _dtype_values(obj, where=""):
    """Every (place, value) of a key named dtype in a parsed YAML document."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "dtype":
                yield f"{where}.{k}".lstrip("."), v
            yield from _dtype_values(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _dtype_values(v, f"{where}[{i}]")


SHIPPED = sorted((REPO / "pipelines").rglob("*.yaml"))


def test_every_shipped_file_is_checked():
    names = {p.relative_to(REPO / "pipelines").as_posix() for p in SHIPPED}
    assert {"quickstart.yaml", "rlaif_smol.yaml", "recipe_smol.yaml", "train/dpo_tiny.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(REPO / "pipelines").as_posix())
def test_no_shipped_file_pins_bf16(path):
    text = path.read_text()
    data = yaml.safe_load(text)
    for where, value in _dtype_values(data):
        assert str(value).lower() not in ("bfloat16", "bf16"), f"{path.name}: {where} pins {value}"
    # the engine's dtype (pipeline and loop files) is left to `auto`
    engine = (data or {}).get("backend_options", {}) if isinstance(data, dict) else {}
    if "dtype" in engine:
        assert engine["dtype"] == "auto", f"{path.name}: backend_options.dtype is {engine['dtype']}"
    for name, opts in ((data or {}).get("models") or {}).items() if isinstance(data, dict) else []:
        assert (opts or {}).get("dtype", "auto") == "auto", f"{path.name}: models.{name}.dtype"


def _quick_pipeline(tmp_path: Path, model: str) -> Pipeline:
    (tmp_path / "seeds.jsonl").write_text("".join(json.dumps({"instruction": f"Say {w}."}) + "\n"
                                                  for w in ("hello", "bye", "thanks")))
    return Pipeline.from_dict({
        "name": "ident", "backend": "vllm", "model": model, "backend_options": {"dtype": "auto"},
        "stages": [{"stage": "load", "path": "seeds.jsonl"},
                   {"stage": "generate", "input_column": "instruction", "sampling": {"max_tokens": 8}}],
    }, tmp_path)


def test_run_record_has_the_resolved_dtype_and_no_model_path(tmp_path, monkeypatch):
    """A model in a local folder, given by absolute path: run.json and the
    card name it by folder name + revision and carry the engine's resolved
    dtype, never the folder's absolute path."""
    folder = tmp_path / "models" / "my-local-model"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    fake = FakeGenerator(default="ok", name=str(folder), revision="sha256:0123456789abcdef", backend="vllm")
    fake.info = dataclasses.replace(fake.info, path=str(folder))  # as a local engine reports it
    fake.dtype = resolve_dtype("auto", device="cpu", cpuinfo=AVX2_ONLY)  # what a loaded engine reports
    res = Runner(_quick_pipeline(tmp_path, str(folder)), tmp_path / "run", generators={str(folder): fake},
                 progress=False).run()
    record = json.loads((res.out_dir / "run.json").read_text())
    model = record["stages"][1]["model"]
    assert model == {"name": "my-local-model", "revision": "sha256:0123456789abcdef", "backend": "vllm",
                     "dtype": "float32"}
    card = (res.out_dir / "README.md").read_text()
    assert "| `my-local-model` | generator | vllm | float32 | `sha256:0123456789abcdef` |" in card
    assert record["config"]["model"] == "my-local-model"  # the config as recorded names the folder too
    assert str(folder) not in json.dumps(record) and str(folder) not in card


def _checkpoint_folder(tmp_path: Path) -> Path:
    """A folder that resolves as a local checkpoint (no engine is started)."""
    folder = tmp_path / "ckpt" / "tiny-llama"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return folder


def test_unloaded_model_identity_predicts_the_dtype(tmp_path):
    """Before an engine starts (fingerprints, records of reused stages) the
    identity resolves `auto` for this machine, names the folder, and never
    holds its path."""
    tiny_model = _checkpoint_folder(tmp_path)
    runner = Runner(_quick_pipeline(tmp_path, str(tiny_model)), tmp_path / "run", progress=False)
    ident = runner.model_identity(None)
    assert ident["name"] == tiny_model.name and ident["dtype"] == resolve_dtype("auto", device="cpu")
    assert str(tiny_model) not in json.dumps(ident) and ident["revision"].startswith("sha256:")


def test_cpu_engine_env_defaults_and_user_settings_win():
    from synthfb.llm.vllm_backend import RESERVE_NO_CPU_UP_TO, cpu_engine_env

    # small idle machine: no reserved core, 1 GiB KV cache
    assert cpu_engine_env(1.0, {}, cpus=2, load=0.3) == {"VLLM_CPU_KVCACHE_SPACE": "1",
                                                         "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    # busy (load >= cores) or large: vLLM's own default (one reserved core)
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in cpu_engine_env(1.0, {}, cpus=2, load=2.5)
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in cpu_engine_env(1.0, {}, cpus=RESERVE_NO_CPU_UP_TO + 1, load=0.0)
    # whatever the user set stays as it is
    assert cpu_engine_env(4.0, {"VLLM_CPU_KVCACHE_SPACE": "8", "VLLM_CPU_NUM_OF_RESERVED_CPU": "1"},
                          cpus=2, load=0.0) == {}
    assert cpu_engine_env(2.5, {"VLLM_CPU_OMP_THREADS_BIND": "0-1"}, cpus=2, load=0.0) == {
        "VLLM_CPU_KVCACHE_SPACE": "2"}


def test_a_bad_dtype_is_a_one_line_pipeline_error(tmp_path):
    from synthfb.engine import PipelineError

    p = _quick_pipeline(tmp_path, str(_checkpoint_folder(tmp_path)))
    p.backend_options["dtype"] = "int4"
    with pytest.raises(PipelineError, match="dtype 'int4': expected one of auto, float32, bfloat16, float16"):
        Runner(p, tmp_path / "run", progress=False).run()
