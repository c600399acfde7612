"""A local BM25 snippet corpus (the ``bm25s`` package; ``pip install
'synthfb[retrieval]'``): ReAlign's retrieval augmentation from a file the
user gives instead of the paper's Google search (specs/methods.md 3.2).

The corpus is a data file (.jsonl, .json, .csv or .parquet) with a text
column and an optional id column (default: the row's 0-based position). The
index is built on first use and kept for the stage's lifetime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..data.io import InputError, read_user_file

BM25_PACKAGE = "bm25s"


class SnippetCorpus:
    """Snippets and their BM25 index (Lucene BM25, k1=1.5, b=0.75, English
    stopwords, no stemming). Errors name the file, the row and the column."""

    def __init__(self, path: str | Path, text_column: str = "text", id_column: str = "id"):
        self.path = Path(path)
        try:
            table = read_user_file(self.path)
        except InputError as e:
            raise ValueError(str(e)) from None
        cols = table.column_names
        if text_column not in cols:
            raise ValueError(f"{self.path}: no column {text_column!r} (columns: {cols})")
        texts = table.column(text_column).to_pylist()
        ids = table.column(id_column).to_pylist() if id_column in cols else list(range(len(texts)))
        if not texts:
            raise ValueError(f"{self.path}: the retrieval corpus is empty")
        seen: dict[Any, int] = {}
        for i, (t, k) in enumerate(zip(texts, ids)):
            if not isinstance(t, str) or not t.strip():
                raise ValueError(f"{self.path}: row {i}: column {text_column!r} must be non-empty text")
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise ValueError(f"{self.path}: row {i}: column {id_column!r} must be a string or an integer")
            if k in seen:
                raise ValueError(f"{self.path}: row {i}: id {k!r} repeats row {seen[k]}")
            seen[k] = i
        self.texts: list[str] = [t.strip() for t in texts]
        self.ids: list[str | int] = ids
        self._index: Any = None  # (tokenizer, retriever), built by _build on the first search

    def __len__(self) -> int:
        return len(self.texts)

    def _build(self) -> None:
        try:
            import bm25s
            from bm25s.tokenization import Tokenizer
        except ImportError:
            raise ValueError(f"retrieval needs the {BM25_PACKAGE!r} package: pip install 'synthfb[retrieval]'") from None
        tok = Tokenizer(stopwords="en")
        corpus = tok.tokenize(self.texts, update_vocab=True, return_as="ids", show_progress=False)
        bm = bm25s.BM25()
        bm.index(corpus, show_progress=False)
        self._index = (tok, bm)

    def search(self, query: str, k: int) -> list[tuple[int, float]]:
        """The ``k`` best snippets for ``query`` as (position, score), best
        first (ties: the earlier snippet); snippets sharing no term with the
        query (score 0) are left out."""
        if self._index is None:
            self._build()
        tok, bm = self._index
        q = tok.tokenize([query], update_vocab=False, return_as="ids", show_progress=False)
        if not q[0]:
            return []
        scores = bm.get_scores(q[0])
        order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))[:k]
        return [(i, float(scores[i])) for i in order if scores[i] > 0]
