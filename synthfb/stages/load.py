"""Source stage: read seed data from a file and give every row an id."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterator

import pyarrow as pa

from ..data import ROW_ID
from ..data.io import InputError, read_user_file
from ..engine.stage import SourceStage, StageContext, config_field
from ..llm.prompts import find_file


@dataclass
class LoadConfig:
    path: str = field(metadata={"help": "data file (.jsonl/.json/.csv/.parquet) or save_to_disk folder"})
    id_column: str | None = field(default=None, metadata={"help": "column holding unique row ids (default: content hash)"})
    require: list[str] = field(default_factory=list, metadata={"help": "columns that must be present and non-empty"})
    limit: int | None = field(default=None, metadata={"help": "keep only the first N rows"})
    dedupe: bool = field(default=True, metadata={"help": "drop exact duplicate rows (counted); false keeps them under distinct ids"})


class LoadStage(SourceStage):
    """Reads a data file; adds ``row_id`` (the id column, or a content hash);
    drops exact duplicates (counted as ``duplicate_rows``)."""

    kind = "load"
    Config = LoadConfig
    reserved_column_fields = ("id_column",)  # a file written by synthfb keeps its `row_id`s

    def _path(self):
        return find_file(self.config.path, self.base_dir, "data file")

    def check(self) -> None:
        with config_field("path"):
            self._path()

    def fingerprint(self) -> dict[str, Any]:
        fp = super().fingerprint()
        p = self._path()
        h = hashlib.sha256()
        files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
        for f in files:
            with open(f, "rb") as fh:  # in blocks: a large seed file is not held whole
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        fp["content_sha256"] = h.hexdigest()
        fp["config"]["path"] = str(p.name)
        return fp

    def output_columns(self, input_columns: list[str]) -> list[str]:
        return [ROW_ID] + [c for c in self.read_columns() if c != ROW_ID]

    def read_columns(self) -> list[str]:
        table = self._table()
        if table.num_rows == 0:  # said here, before the column check makes it look like a schema problem
            raise InputError(f"{self._path()}: the dataset is empty (0 rows)")
        return list(table.column_names)

    def _table(self) -> pa.Table:
        if not hasattr(self, "_cached"):
            self._cached = read_user_file(self._path())
        return self._cached

    def read(self, ctx: StageContext) -> Iterator[dict[str, Any]]:
        path = self._path()
        table = self._table()
        if self.config.limit is not None:
            table = table.slice(0, self.config.limit)
        if table.num_rows == 0:
            raise InputError(f"{path}: the dataset is empty (0 rows)")
        missing = [c for c in self.config.require if c not in table.column_names]
        if missing:
            raise InputError(f"{path}: missing required column(s) {missing}; the file has {table.column_names}")
        # a generator, a batch of rows at a time: the runner writes chunks as they come, so only the
        # Arrow table and the ids seen (for dedupe) grow with the file, not a dict per row
        return self._rows(table, path, ctx)

    def _rows(self, table: pa.Table, path, ctx: StageContext):
        seen: set[str] = set()
        rows = (row for batch in table.to_batches(max_chunksize=4096) for row in batch.to_pylist())
        for i, row in enumerate(rows):
            for c in self.config.require:
                v = row.get(c)
                if v is None or (isinstance(v, str) and not v.strip()):
                    raise InputError(f"{path}: row {i + 1}: required column {c!r} is empty")
            if self.config.id_column:
                if self.config.id_column not in row:
                    raise InputError(f"{path}: id column {self.config.id_column!r} not found")
                rid = str(row[self.config.id_column])
            else:
                rid = hashlib.sha256(json.dumps(row, sort_keys=True, default=str).encode()).hexdigest()[:16]
            if rid in seen:
                if self.config.id_column:
                    raise InputError(f"{path}: row {i + 1}: duplicate id {rid!r} in column {self.config.id_column!r}")
                if self.config.dedupe:
                    ctx.stats.add("duplicate_rows")
                    continue
                rid = f"{rid}-{i}"
            seen.add(rid)
            row.pop(ROW_ID, None)
            yield {ROW_ID: rid, **row}
        self.__dict__.pop("_cached", None)  # read: the file's table is not kept for the rest of the run
