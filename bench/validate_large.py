"""`synthfb validate` on a large pipeline file: the native fast path vs the strict loader, in one run.

A pipeline file whose generate stage carries N small mappings (``{id, name, ok, score}``) inside its
``json_schema`` (the shape of the 77 MB file in issue 13). Each side runs ``synthfb validate FILE`` in a fresh
subprocess (imports, load, pipeline checks, peak RSS its own): once as installed (``yaml_rs`` reads the file:
:func:`synthfb.data.yamlio.load_text`), once with the fast path switched off (``SYNTHFB_YAML_FAST=0``: the
strict PyYAML loader on libyaml). Both must say ok. The last line is the ratio strict/fast.

    python bench/validate_large.py [--mappings 1100000]   # 1.1M mappings: about 76 MB
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def write_file(path: Path, n: int) -> None:
    head = ["name: big", "backend: vllm", "model: tiny", "stages:", "  - stage: load",
            f"    path: {REPO / 'pipelines' / 'seeds' / 'quickstart.jsonl'}", "  - stage: generate",
            f"    prompt: {REPO / 'prompts' / 'respond.jinja'}", "    output_column: response", "    json_schema:",
            "      type: object", "      x-examples:"]
    with open(path, "w") as f:
        f.write("\n".join(head) + "\n")
        for i in range(n):
            f.write(f"        - {{id: {i}, name: item{i}, ok: true, score: {i / 7:.3f}}}\n")


def validate(path: Path, fast: bool) -> tuple[float, float, str]:
    """(seconds, peak RSS MiB, the command's output line) of `synthfb validate path` in a fresh process."""
    env = {**os.environ, "SYNTHFB_YAML_FAST": "1" if fast else "0"}
    code = ("import resource, sys; from synthfb.cli import main; rc = main(['validate', sys.argv[1]]); "
            "print('maxrss_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); "
            "sys.exit(rc)")
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"validate failed ({'fast' if fast else 'strict'}): {p.stderr.strip()[-500:]}")
    rss = next(int(x.split()[1]) for x in p.stderr.splitlines() if x.startswith("maxrss_kib"))
    return dt, rss / 1024, p.stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mappings", type=int, default=1_100_000)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="validate-large-") as tmp:
        path = Path(tmp) / "big.yaml"
        write_file(path, a.mappings)
        mb = path.stat().st_size / 1e6
        print(f"{path.name}: {mb:.1f} MB, {a.mappings} mappings", flush=True)
        fast = validate(path, True)
        print(f"fast (yaml_rs)    {fast[0]:7.1f} s  peak {fast[1]:7.0f} MiB  {fast[2]}", flush=True)
        strict = validate(path, False)
        print(f"strict (libyaml)  {strict[0]:7.1f} s  peak {strict[1]:7.0f} MiB  {strict[2]}", flush=True)
    print(f"validate strict/fast: {strict[0] / fast[0]:.1f}x faster with the fast path ({mb:.0f} MB: "
          f"{fast[0]:.1f} s vs {strict[0]:.1f} s)")


if __name__ == "__main__":
    main()
