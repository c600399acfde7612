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


def write_text_if_changed(path: Path, text: str) -> Path:
    """Write ``text`` atomically unless the file already holds exactly it (a resumed
    step then sees the same file, with its fingerprint and modification time)."""
    path = Path(path)
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        atomic_write_bytes(path, text.encode("utf-8"))
    return path


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


class ChunkedTable:
    """The rows of a stage's chunk files as one table, read a slice at a time.

    What :func:`read_tables` returns: only the files' footers are read up
    front (row counts, schemas), so holding a stage's output costs no memory
    per row. It answers the part of ``pyarrow.Table`` the runner uses:
    ``num_rows``, ``schema`` / ``column_names`` (the files' schemas unified,
    all-null columns promoted), ``slice(offset, length)`` (reads only the files
    it overlaps), ``column(name)``, ``to_pylist()``, ``to_batches()`` (file by
    file) and ``read()`` (everything, as one ``pyarrow.Table``). Every piece
    it returns has the unified schema: a column some file lacks is null there.
    """

    def __init__(self, paths: list[Path]):
        self.paths = [Path(p) for p in paths]
        counts = [pq.read_metadata(p).num_rows for p in self.paths]
        self._starts = [0]
        for n in counts:
            self._starts.append(self._starts[-1] + n)
        self.num_rows = self._starts[-1]
        schemas = [pq.read_schema(p) for p, n in zip(self.paths, counts) if n]
        self.schema = (pa.unify_schemas([s.remove_metadata() for s in schemas], promote_options="permissive")
                       if schemas else pa.schema([]))

    @property
    def column_names(self) -> list[str]:
        return list(self.schema.names)

    def __len__(self) -> int:
        return self.num_rows

    def _file(self, i: int, columns: list[str] | None = None) -> pa.Table:
        schema = self.schema if columns is None else pa.schema([self.schema.field(c) for c in columns])
        have = pq.read_schema(self.paths[i]).names
        t = pq.read_table(self.paths[i], columns=None if columns is None else [c for c in columns if c in have])
        cols = []
        for f in schema:
            if f.name in t.column_names:
                c = t.column(f.name)
                cols.append(c if c.type == f.type else c.cast(f.type))
            else:
                cols.append(pa.nulls(t.num_rows, f.type))
        return pa.Table.from_arrays(cols, schema=schema)

    def slice(self, offset: int = 0, length: int | None = None) -> pa.Table:
        """Rows ``offset`` .. ``offset + length`` as a ``pyarrow.Table``."""
        end = self.num_rows if length is None else min(self.num_rows, offset + length)
        parts = []
        for i in range(len(self.paths)):
            lo, hi = self._starts[i], self._starts[i + 1]
            if hi <= offset or lo >= end or hi == lo:
                continue
            t = self._file(i)
            parts.append(t.slice(max(0, offset - lo), min(hi, end) - max(lo, offset)))
        if not parts:
            return self.schema.empty_table()
        return parts[0] if len(parts) == 1 else pa.concat_tables(parts)

    def to_batches(self):
        """One ``pyarrow.Table`` per non-empty file, in order."""
        for i in range(len(self.paths)):
            if self._starts[i + 1] > self._starts[i]:
                yield self._file(i)

    def column(self, name: str) -> pa.ChunkedArray:
        """One column of every file (reads that column only)."""
        parts = [self._file(i, [name]).column(0) for i in range(len(self.paths)) if self._starts[i + 1] > self._starts[i]]
        return pa.chunked_array([c for p in parts for c in p.chunks], self.schema.field(name).type)

    def read(self) -> pa.Table:
        """Every row as one ``pyarrow.Table`` (memory grows with the rows)."""
        return self.slice(0)

    def to_pylist(self) -> list[dict[str, Any]]:
        return self.read().to_pylist()


def read_tables(paths: list[Path]) -> ChunkedTable | None:
    """The Parquet files as one lazily read :class:`ChunkedTable` (schemas
    unified; all-null columns promoted); None when they hold no row."""
    t = ChunkedTable(paths)
    return t if t.num_rows else None


def write_dataset(table: pa.Table | ChunkedTable, path: Path, max_shard_bytes: int = 500 * 2**20) -> None:
    """``table`` as a ``datasets`` folder at ``path`` (what ``save_to_disk``
    writes, read back by ``datasets.load_from_disk``), written a chunk file at
    a time: memory does not grow with the rows. Shards of at most about
    ``max_shard_bytes`` (``save_to_disk``'s 500 MB default)."""
    import hashlib

    from datasets import DatasetInfo, Features
    from datasets.arrow_writer import ArrowWriter
    from datasets.utils.py_utils import asdict

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    features = Features.from_arrow_schema(table.schema)
    pieces = table.to_batches() if isinstance(table, ChunkedTable) else [table]
    files: list[str] = []
    writer = None
    written = 0
    fp = hashlib.sha256()

    def close():
        nonlocal writer
        if writer is not None:
            writer.finalize()
            writer.close()
            writer = None

    for piece in pieces:
        if writer is None or written >= max_shard_bytes:
            close()
            files.append(f"shard-{len(files):05d}.arrow")
            writer = ArrowWriter(features=features, path=str(path / files[-1]))
            written = 0
        writer.write_table(piece)
        written += piece.nbytes
        fp.update(f"{piece.num_rows}:{piece.nbytes};".encode())
    if writer is None:  # no row: one empty shard, as save_to_disk writes
        files.append("shard-00000.arrow")
        writer = ArrowWriter(features=features, path=str(path / files[-1]))
        writer.write_table(table.schema.empty_table())
    close()
    names = []
    for i, f in enumerate(files):
        names.append(f"data-{i:05d}-of-{len(files):05d}.arrow")
        os.replace(path / f, path / names[-1])
    fp.update(str(table.schema).encode())
    state = {"_data_files": [{"filename": n} for n in names], "_fingerprint": fp.hexdigest()[:16],
             "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
             "_split": None}
    (path / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    info = asdict(DatasetInfo(features=features))
    (path / "dataset_info.json").write_text(json.dumps({k: info[k] for k in sorted(info)}, indent=2))


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


def _read_jsonl_blocks(p: Path, block: int = 8192) -> pa.Table:
    """A JSON Lines file as a table, ``block`` lines at a time: only one
    block's Python objects are alive at once (not the whole file's), and the
    blocks' tables are joined with permissive type promotion. Any problem is
    raised raw; :func:`read_user_file` then reads the file the slow way to
    name the line."""
    tables, rows = [], []
    with open(p, "rb") as f:
        for n, line in enumerate(f, 1):
            text = line.decode("utf-8-sig" if n == 1 else "utf-8")
            if not text.strip():
                continue
            r = json.loads(text)
            if not isinstance(r, dict):
                raise InputError("not an object")
            rows.append(r)
            if len(rows) == block:
                tables.append(rows_to_table(rows, str(p)))
                rows = []
    if rows or not tables:
        tables.append(rows_to_table(rows, str(p)))
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="permissive")


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
    if suffix == ".jsonl":
        try:
            return _read_jsonl_blocks(p)
        except (InputError, pa.ArrowInvalid, pa.ArrowTypeError, UnicodeDecodeError, json.JSONDecodeError):
            pass  # read again below, row by row, for the error that names the line and column
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
