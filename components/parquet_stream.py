"""Read and write a split's parquet file in bounded batches of rows, so a stage's memory does not grow with the data.

`iter_frames` yields pandas frames of at most `batch_rows` rows (optionally only some columns); `FrameWriter` writes
frames one after another into one parquet file with a fixed schema and moves it into place only when complete, so a
killed task never leaves half a file (like `common.write_splits`).
"""

import os
import tempfile
from pathlib import Path
from typing import Iterator, Optional

# Rows per batch: large enough that per-batch overheads vanish, small enough that a batch's texts and vectors stay
# a few tens of MB even with 1,024-dimensional embeddings.
STREAM_ROWS = 4096


def input_schema(path: str | os.PathLike):
    """The arrow schema of a parquet file (its pandas metadata included)."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).schema_arrow


def iter_frames(path: str | os.PathLike, batch_rows: int = STREAM_ROWS,
                columns: Optional[list[str]] = None) -> Iterator["pandas.DataFrame"]:  # noqa: F821
    """The file's rows as pandas frames of at most `batch_rows` rows, converted as `pandas.read_parquet` would."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    schema = parquet.schema_arrow
    if columns is not None:
        schema = pa.schema([schema.field(name) for name in columns], metadata=schema.metadata)
    for batch in parquet.iter_batches(batch_size=batch_rows, columns=columns):
        # Through a table with the file's schema, so its pandas metadata restores the dtypes read_parquet gives.
        yield pa.Table.from_batches([batch], schema=schema).to_pandas()


class FrameWriter:
    """Write frames into one parquet file with `schema`; the file appears at `path` only after `close()`."""

    def __init__(self, path: str | os.PathLike, schema):
        import pyarrow.parquet as pq

        self.path, self.schema = Path(path), schema
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=self.path.parent, suffix=".tmp", delete=False) as handle:
            self._tmp = handle.name
        self._writer = pq.ParquetWriter(self._tmp, schema)

    def write(self, frame) -> None:
        """Append a frame's rows (its columns in the schema's order, cast to the schema's types)."""
        import pyarrow as pa

        table = pa.Table.from_pandas(frame[self.schema.names], schema=self.schema, preserve_index=False)
        self._writer.write_table(table)

    def close(self) -> None:
        """Finish the file and move it into place."""
        self._writer.close()
        os.replace(self._tmp, self.path)

    def __enter__(self) -> "FrameWriter":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()
            return
        self._writer.close()
        Path(self._tmp).unlink(missing_ok=True)
