"""Records, column conventions and dataset I/O (imports nothing else of ours)."""

ROW_ID = "row_id"
PROVENANCE = "provenance"
