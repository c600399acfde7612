"""Publish a finished run as a dataset folder with its card, or to the Hub."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..data.io import atomic_write_bytes, replace_dir_atomic
from .builder import Card, build_card, load_run


def write_card(run_dir: str | Path, card: Card | None = None) -> Path:
    """Write README.md and plots/ into the run folder itself."""
    run_dir = Path(run_dir)
    card = card or build_card(run_dir, data_path="dataset/*.arrow")
    for rel, data in card.plots.items():
        atomic_write_bytes(run_dir / rel, data)
    atomic_write_bytes(run_dir / "README.md", card.text().encode())
    return run_dir / "README.md"


def publish_dir(run_dir: str | Path, to: str | Path, *, license: str | None = None) -> Path:
    """Write ``to/`` with README.md (card), data/train-00000-of-00001.parquet
    and plots/, so that ``datasets.load_dataset(to)`` loads it."""
    run_dir, to = Path(run_dir), Path(to)
    _, ds = load_run(run_dir)
    card = build_card(run_dir, license=license, data_path="data/train-*.parquet")
    tmp = to.with_name(f".{to.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "data").mkdir(parents=True)
    ds.to_parquet(str(tmp / "data" / "train-00000-of-00001.parquet"))
    for rel, data in card.plots.items():
        atomic_write_bytes(tmp / rel, data)
    (tmp / "README.md").write_text(card.text(), encoding="utf-8")
    replace_dir_atomic(tmp, to)
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
                             commit_message="Publish synthfb dataset with data card")
    return str(getattr(info, "commit_url", info))
