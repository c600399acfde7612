"""Imports flow one way: data < llm < rank < train/cards < engine < stages < loop < cli.

Every ``import`` in every module of the package is checked, function-level
ones included (a late import is still a dependency).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "synthfb"

LAYERS = {"data": 0, "llm": 1, "rank": 2, "train": 3, "cards": 3, "engine": 4, "stages": 5, "loop": 6, "cli": 7}


def _layer_of(parts: list[str]) -> str | None:
    """``synthfb.engine.stage`` -> ``engine``; ``synthfb.cli`` -> ``cli``;
    ``synthfb`` / ``synthfb._shipped`` -> None (the package root)."""
    if len(parts) < 2 or parts[0] != "synthfb":
        return None
    return parts[1] if parts[1] in LAYERS else None


def _imports(path: Path) -> list[tuple[int, list[str]]]:
    mod = ["synthfb", *path.relative_to(PKG).with_suffix("").parts]
    if mod[-1] == "__init__":
        mod = mod[:-1]
    pkg = mod if path.name == "__init__.py" else mod[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split(".")) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - node.level + 1]
                target = base + (node.module.split(".") if node.module else [])
            else:
                target = (node.module or "").split(".")
            if node.module is None or (node.level and not node.module):
                out += [(node.lineno, target + [a.name]) for a in node.names]
            else:
                out.append((node.lineno, target))
    return out


def _violations() -> list[str]:
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        me = "cli" if rel.parts[0] == "cli.py" else (rel.parts[0] if len(rel.parts) > 1 else None)
        if me not in LAYERS:
            continue
        for line, target in _imports(path):
            other = _layer_of(target)
            if other is None or other == me:
                continue
            if LAYERS[other] >= LAYERS[me]:
                bad.append(f"synthfb/{rel}:{line}: {me} imports {'.'.join(target)} ({other})")
    return bad


def test_imports_flow_one_way():
    assert _violations() == []


def test_the_checker_sees_late_and_relative_imports(tmp_path, monkeypatch):
    # the checker itself: a late relative import upward is found
    fake = tmp_path / "synthfb"
    (fake / "engine").mkdir(parents=True)
    (fake / "stages").mkdir()
    (fake / "engine" / "x.py").write_text("def f():\n    from ..stages import STAGES\n    return STAGES\n")
    (fake / "stages" / "y.py").write_text("from ..engine import x\n")
    monkeypatch.setattr(sys.modules[__name__], "PKG", fake)
    assert _violations() == ["synthfb/engine/x.py:2: engine imports synthfb.stages (stages)"]
