"""`synthfb validate` on a large pipeline file: time relative to libyaml's own load.

A pipeline file of tens of thousands of small mappings (here inside a
generate stage's ``json_schema``) must validate in about the time
``yaml.load(..., yaml.CSafeLoader)`` takes to read it, not minutes: the
strict loader (duplicate keys, alias bombs) must not fall back to the
pure-Python parser or walk the document more than linearly. Compared with a
baseline measured on the same file in the same process, so the bound holds
on a slow or busy machine.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from synthfb.data import yamlio

REPO = Path(__file__).resolve().parent.parent


def _big_pipeline(path: Path, n: int) -> None:
    lines = [
        "name: big", "backend: vllm", "model: tiny", "stages:",
        "  - stage: load", f"    path: {REPO / 'pipelines' / 'seeds' / 'quickstart.jsonl'}",
        "  - stage: generate", f"    prompt: {REPO / 'prompts' / 'respond.jinja'}", "    output_column: response",
        "    json_schema:", "      type: object", "      x-examples:",
    ]
    lines += [f"        - {{id: {i}, name: item{i}, ok: true, score: {i / 7:.3f}}}" for i in range(n)]
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.skipif(not getattr(yaml, "__with_libyaml__", False), reason="PyYAML built without libyaml")
def test_validate_large_file_close_to_libyaml_load_time(tmp_path):
    from synthfb.engine import Pipeline

    f = tmp_path / "big.yaml"
    n = 12_000  # 108k nodes: more than MAX_NODES, with no alias at all
    _big_pipeline(f, n)
    assert n * 9 > yamlio.MAX_NODES  # the old limit refused such a file
    text = f.read_text()

    def baseline() -> float:
        t = time.perf_counter()
        yaml.load(text, Loader=yaml.CSafeLoader)
        return time.perf_counter() - t

    def ours() -> float:
        t = time.perf_counter()
        data = yamlio.load_file(f, "pipeline file")
        pipe = Pipeline.from_dict(data, tmp_path, str(f))
        pipe.check_columns()
        dt = time.perf_counter() - t
        assert len(pipe.stages[1].config.json_schema["x-examples"]) == n
        return dt

    # alternate, best of two each: a busy machine slows both sides alike
    base, mine = min(baseline(), baseline()), min(ours(), ours())
    assert mine < 5 * base, f"validate took {mine:.2f} s, {mine / base:.1f}x libyaml's plain load ({base:.2f} s)"


def test_strict_checks_still_hold_with_the_fast_loader():
    # same values as yaml.safe_load, including YAML 1.1 booleans and our exponent floats
    text = "a: 1e-5\nb: '1e-5'\nc: 1.0\nd: yes\ne: [x, ~, 0x10]\nf: {g: 2}\n"
    assert yamlio.safe_load(text) == {**yaml.safe_load(text), "a": 1e-5}
    with pytest.raises(yaml.YAMLError, match=r"duplicate key 'x' \(first on line 2\)"):
        yamlio.safe_load("top: 1\nx: 1\ny: 2\nx: 3\n")
    with pytest.raises(yaml.YAMLError, match="duplicate key 'k'"):
        yamlio.safe_load("outer:\n  - {k: 1, k: 2}\n")
    # a merge key may be overridden by an explicit key; that is not a duplicate
    assert yamlio.safe_load("base: &b {k: 1, j: 2}\nuse: {<<: *b, k: 3}\n")["use"] == {"k": 3, "j": 2}
    # an alias bomb is still refused, a large file written out in full is not
    laughs = "l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
        f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]\n" for i in range(1, 7))
    with pytest.raises(yaml.YAMLError, match="aliases expand this document"):
        yamlio.safe_load(laughs)
    big = "items:\n" + "".join(f"  - {{a: {i}, b: {i}}}\n" for i in range(yamlio.MAX_NODES // 4))
    assert len(yamlio.safe_load(big)["items"]) == yamlio.MAX_NODES // 4
    # aliases that add few nodes are fine even in a document larger than the limit
    assert yamlio.safe_load(big + "x: &x [1, 2]\ny: *x\n")["y"] == [1, 2]
