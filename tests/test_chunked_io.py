"""Stage outputs read lazily from chunk files, and the dataset written a chunk at a time.

References: ``pa.concat_tables(..., promote_options="permissive")`` of the
same files (what the runner held in memory before) and
``datasets.Dataset.save_to_disk`` of that table, read back with
``datasets.load_from_disk``.
"""

from __future__ import annotations

import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from synthfb.data.io import ChunkedTable, read_tables, read_user_file, write_dataset


@pytest.fixture
def chunk_files(tmp_path):
    parts = [
        pa.table({"row_id": ["a", "b", "c"], "x": [1, 2, 3], "note": [None, None, None]}),
        pa.table({"row_id": pa.array([], pa.string())}),  # an empty chunk (a filter dropped all)
        pa.table({"row_id": ["d", "e"], "x": [4.5, None], "note": ["n", None],
                  "msgs": [[{"role": "user", "content": "hi"}], None]}),
        pa.table({"row_id": ["f"], "x": [6], "note": [None]}),
    ]
    paths = []
    for i, t in enumerate(parts):
        paths.append(tmp_path / f"chunk-{i:05d}.parquet")
        pq.write_table(t, paths[-1])
    ref = pa.concat_tables([pq.read_table(p) for p in paths], promote_options="permissive")
    return paths, ref


def test_chunked_table_matches_concatenation(chunk_files):
    paths, ref = chunk_files
    t = read_tables(paths)
    assert isinstance(t, ChunkedTable)
    assert t.num_rows == ref.num_rows == 6
    assert t.schema == ref.schema
    assert t.to_pylist() == ref.to_pylist()
    for off in range(7):
        for n in (1, 2, 4, 10):
            assert t.slice(off, n).to_pylist() == ref.slice(off, n).to_pylist(), (off, n)
            assert t.slice(off, n).schema == ref.schema
    assert t.column("x").to_pylist() == ref.column("x").to_pylist()
    assert t.column("msgs").type == ref.schema.field("msgs").type
    assert read_tables(paths[1:2]) is None


@pytest.mark.parametrize("shard_bytes", [500 * 2**20, 1])
def test_write_dataset_reads_back_like_save_to_disk(chunk_files, tmp_path, shard_bytes):
    paths, ref = chunk_files
    write_dataset(read_tables(paths), tmp_path / "ours", max_shard_bytes=shard_bytes)
    datasets.Dataset(datasets.table.InMemoryTable(ref)).save_to_disk(str(tmp_path / "theirs"))
    ours, theirs = datasets.load_from_disk(str(tmp_path / "ours")), datasets.load_from_disk(str(tmp_path / "theirs"))
    assert ours.features == theirs.features
    assert ours.to_list() == theirs.to_list()
    if shard_bytes == 1:
        assert len(list((tmp_path / "ours").glob("data-*.arrow"))) == 3  # one per non-empty chunk
    empty = pa.table({"row_id": pa.array([], pa.string()), "x": pa.array([], pa.int64())})
    write_dataset(empty, tmp_path / "empty")
    back = datasets.load_from_disk(str(tmp_path / "empty"))
    assert back.num_rows == 0 and back.column_names == ["row_id", "x"]


def test_jsonl_read_in_blocks_equals_one_pass(tmp_path, monkeypatch):
    from synthfb.data import io

    rows = [{"a": i, "b": f"t{i}"} if i % 3 else {"a": i * 0.5, "c": [i]} for i in range(50)]
    f = tmp_path / "rows.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ref = io.rows_to_table(rows, "ref")
    monkeypatch.setattr(io, "_read_jsonl_blocks", lambda p, block=7, f=io._read_jsonl_blocks: f(p, block))
    got = read_user_file(f)
    assert got.to_pylist() == ref.to_pylist()
    # a type clash across blocks still gets the row-by-row error naming the column and row
    f.write_text("".join(json.dumps({"a": i}) + "\n" for i in range(20)) + json.dumps({"a": "x"}) + "\n")
    with pytest.raises(io.InputError, match=r"column 'a': values of different types \(row 21 is str"):
        read_user_file(f)
