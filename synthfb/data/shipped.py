"""Where the files that come with synthfb are: prompt templates, data-card
templates, the shipped pipeline and loop files and their data.

In a checkout (and an editable install) they are the repository's top-level
folders ``prompts/``, ``data_cards/`` and ``pipelines/``; in an installed
wheel they are package data under ``synthfb/_shipped/`` (copied there by the
``build_py`` hook in ``setup.py``, which reads SHIPPED from this file; the
source tree never has a ``synthfb/_shipped/``). Code that needs one of these
files goes through :func:`shipped_dir`, never through a path relative to the
package's own location.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent
REPO_ROOT = PACKAGE_DIR.parent
SHIPPED = ("prompts", "data_cards", "pipelines")


def shipped_dir(name: str) -> Path:
    """The folder ``name`` (one of SHIPPED) of the files synthfb ships."""
    if name not in SHIPPED:
        raise ValueError(f"unknown shipped folder {name!r}; expected one of {SHIPPED}")
    for d in (PACKAGE_DIR / "_shipped" / name, REPO_ROOT / name):
        if d.is_dir():
            return d
    return PACKAGE_DIR / "_shipped" / name


def config_path(arg: str) -> str:
    """A pipeline or loop file named on the command line: the path itself,
    or, when no such file exists and ``arg`` is a plain name (``quickstart``,
    ``rlaif_tiny.yaml``), the shipped file of that name."""
    p = Path(arg)
    if p.exists() or "/" in arg or "\\" in arg or not arg or arg.startswith("."):
        return arg
    shipped = shipped_dir("pipelines") / (arg if arg.endswith((".yaml", ".yml")) else f"{arg}.yaml")
    return str(shipped) if shipped.is_file() else arg
