"""Dataset I/O: reading user files, atomic writes, chunk files.

Everything written here goes to a temporary name first and is renamed into
place after an fsync, so a ``kill -9`` leaves either the old state or the new
one on disk, never a half-written file.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

READABLE = (".jsonl", ".json", ".csv", ".parquet")


class InputError(ValueError):
    """Bad user input: the message names the file, row or field."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def write_table_atomic(path: Path, table: pa.Table) -> None:
    """Write a Parquet file atomically (tmp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def read_tables(paths: list[Path]) -> pa.Table | None:
    """Concatenate Parquet files (schemas unified; all-null columns promoted)."""
    tables = [pq.read_table(p) for p in paths]
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return None
    if len(tables) == 1:
        return tables[0]
    return pa.concat_tables(tables, promote_options="permissive")


def rows_to_table(rows: list[dict[str, Any]], where: str) -> pa.Table:
    """Rows as a table whose columns are the union of every row's keys (in
    order of first appearance; a missing value is null). ``pa.Table.from_pylist``
    alone takes the columns of the first row and drops the rest silently."""
    columns: dict[str, None] = {}
    for r in rows:
        for k in r:
            columns.setdefault(k, None)
    data = {}
    for c in columns:
        values = [r.get(c) for r in rows]
        try:
            data[c] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            first = next((type(v).__name__ for v in values if v is not None), "null")
            bad = next((i for i, v in enumerate(values) if v is not None and type(v).__name__ != first), None)
            at = f" (row {bad + 1} is {type(values[bad]).__name__}, earlier rows {first})" if bad is not None else ""
            raise InputError(f"{where}: column {c!r}: values of different types{at}: {e}") from e
    return pa.table(data) if data else pa.Table.from_pylist(rows)


def read_user_file(path: str | Path) -> pa.Table:
    """Load a user's data file (.jsonl, .json, .csv, .parquet, or a
    ``save_to_disk`` folder) into an Arrow table, with errors that name the
    file and line."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: file not found")
    if p.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as e:
            raise InputError(f"{p}: not a dataset folder written by save_to_disk ({e})") from e
        if isinstance(ds, datasets.DatasetDict):
            if len(ds) != 1:
                raise InputError(f"{p}: holds splits {list(ds)}; point at one split's folder")
            ds = next(iter(ds.values()))
        return ds.data.table
    suffix = p.suffix.lower()
    if suffix not in READABLE:
        raise InputError(f"{p}: unsupported file type {suffix!r}; expected one of {', '.join(READABLE)}")
    if suffix == ".parquet":
        return pq.read_table(p)
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise InputError(f"{p}: line {line}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})") from e
    if suffix == ".csv":
        import csv
        import io

        rows = list(csv.DictReader(io.StringIO(text)))
        return rows_to_table(rows, str(p))
    if suffix == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{p}: line {e.lineno}: invalid JSON: {e.msg}") from e
        if isinstance(obj, dict) and len(obj) == 1 and isinstance(next(iter(obj.values())), list):
            obj = next(iter(obj.values()))
        if not isinstance(obj, list):
            raise InputError(f"{p}: expected a JSON list of objects")
        rows = obj
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise InputError(f"{p}: line {n}: invalid JSON: {e.msg}") from e
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise InputError(f"{p}: row {i + 1}: expected a JSON object, got {type(r).__name__}")
    return rows_to_table(rows, str(p))


def replace_dir_atomic(src: Path, dst: Path) -> None:
    """Move a finished folder into place, replacing an older one."""
    dst = Path(dst)
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    _fsync_dir(dst.parent)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)
