"""Publish a finished run as a dataset folder with its card, or to the Hub."""

from __future__ import annotations

import os
from pathlib import Path

from ..data.io import atomic_write_bytes
from ..data.owned import FolderError, OwnedFolder, publish_target
from .builder import Card, CardError, build_card, load_run


def write_card(run_dir: str | Path, card: Card | None = None) -> Path:
    """Write README.md and plots/ into the run folder itself (a synthfb run
    folder only: its marker is checked and its lock held while writing)."""
    run_dir = Path(run_dir)
    with _owned(run_dir, "run", "existing"):
        card = card or build_card(run_dir, data_path="dataset/*.arrow")
        for rel, data in card.plots.items():
            atomic_write_bytes(run_dir / rel, data)
        atomic_write_bytes(run_dir / "README.md", card.text().encode())
    return run_dir / "README.md"


def _owned(path: Path, kind: str, mode: str) -> OwnedFolder:
    try:
        return OwnedFolder(path, kind, mode).acquire()
    except FolderError as e:
        raise CardError(str(e)) from None


def publish_dir(run_dir: str | Path, to: str | Path, *, license: str | None = None) -> Path:
    """Write ``to/`` with README.md (card), data/train-00000-of-00001.parquet
    and plots/, so that ``datasets.load_dataset(to)`` loads it.

    ``to`` must be a new or empty folder, or one synthfb published before; in
    the latter only what synthfb wrote there is replaced (see
    :mod:`synthfb.data.owned`). A run is never published into itself or into
    a folder that contains it."""
    run_dir = Path(run_dir)
    try:
        to = publish_target(to)
    except FolderError as e:
        raise CardError(str(e)) from None
    run_abs = Path(os.path.abspath(run_dir))
    if to == run_abs or to in run_abs.parents:
        raise CardError(f"--to {to}: would publish over the run folder {run_dir} itself; choose a new folder")
    _, ds = load_run(run_dir)
    if len(ds) == 0:
        raise CardError(f"{run_dir}: the run kept 0 rows; there is nothing to publish")
    card = build_card(run_dir, license=license, data_path="data/train-*.parquet")
    folder = _owned(to, "publish", "replace")  # cleared of an earlier publish's entries only, under its lock
    try:
        tmp = to / f".publish.partial-{os.getpid()}"
        (tmp / "data").mkdir(parents=True)
        ds.to_parquet(str(tmp / "data" / "train-00000-of-00001.parquet"))
        for rel, data in card.plots.items():
            atomic_write_bytes(tmp / rel, data)
        atomic_write_bytes(tmp / "README.md", card.text().encode())
        for entry in sorted(tmp.iterdir()):
            os.replace(entry, to / entry.name)
        tmp.rmdir()
    finally:
        folder.release()
    return to


def publish_hub(run_dir: str | Path, repo_id: str, *, license: str | None = None, private: bool = True,
                token_env: str = "HF_TOKEN", staging: str | Path | None = None) -> str:
    """Publish to the Hugging Face Hub: the same folder as ``publish_dir``,
    uploaded with ``huggingface_hub`` (token from ``$token_env``)."""
    from huggingface_hub import HfApi

    staging = Path(staging) if staging else Path(run_dir) / "publish"
    publish_dir(run_dir, staging, license=license)
    token = os.environ.get(token_env)
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(staging), repo_id=repo_id, repo_type="dataset",
                             ignore_patterns=[".synthfb.*"], commit_message="Publish synthfb dataset with data card")
    return str(getattr(info, "commit_url", info))
