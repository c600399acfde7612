"""Build hook: the files synthfb ships go into the wheel as package data.

The prompt templates, data-card templates and shipped pipelines live in the
repository's top-level folders ``prompts/``, ``data_cards/`` and
``pipelines/`` (that is where they are edited, and where a checkout or an
editable install finds them). When a wheel is built, ``build_py`` copies the
three folders into ``synthfb/_shipped/`` of the build tree, where
``synthfb.data.shipped.shipped_dir`` looks first in an installed wheel. No copy
is ever written into the source tree.

An editable install (``pip install -e .``) copies nothing: there
``shipped_dir`` falls back to the repository's own folders. Everything else
about the package is in pyproject.toml.
"""

from __future__ import annotations

import runpy
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
# The folder names come from the one module that looks them up (a plain module:
# run from its file, so building does not import the synthfb package).
SHIPPED: tuple[str, ...] = tuple(runpy.run_path(str(ROOT / "synthfb" / "data" / "shipped.py"))["SHIPPED"])
TARGET = ("synthfb", "_shipped")
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", ".DS_Store", ".ipynb_checkpoints", "*~")


class build_py_with_shipped(build_py):
    """``build_py`` that also copies the shipped folders into the build tree."""

    def _shipped_dest(self) -> Path:
        return Path(self.build_lib, *TARGET)

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        dest = self._shipped_dest()
        shutil.rmtree(dest, ignore_errors=True)  # no stale files from an earlier build
        for name in SHIPPED:
            src = ROOT / name
            if not src.is_dir():
                raise FileNotFoundError(f"shipped folder {name}/ is missing from {ROOT} (is this a full checkout "
                                        f"or sdist?)")
            shutil.copytree(src, dest / name, ignore=IGNORE)
            self.announce(f"copied {name}/ -> {dest / name}", level=2)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        if getattr(self, "editable_mode", False):
            return outputs
        dest = self._shipped_dest()
        return outputs + sorted(str(p) for p in dest.rglob("*") if p.is_file()) if dest.is_dir() else outputs


setup(cmdclass={"build_py": build_py_with_shipped})
