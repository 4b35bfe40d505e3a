"""finetune's training rows: chosen from the scored train split, built and written batch by batch.

The training rows are read from the scored split in batches and written, batch by batch, to an Arrow file in a
temporary folder of the task's local temp dir; the trainer reads it memory-mapped, and the folder is removed when
training ends or fails. So the stage's memory does not grow with the number of rows; its temp disk does.
"""

import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from components.common import (
    ANCHOR,
    FILTER_STATUS,
    GENERATION_STATUS,
    HARD_NEGATIVES,
    NEGATIVE,
    POSITIVE,
    StageError,
    get_logger,
    split_path,
    training_rows,
    valid_pairs,
)
from components.parquet_stream import input_schema, iter_frames

log = get_logger("finetune")

DEFAULT_SEED = 42
NEGATIVE_MODES = ("mined", "in-batch", "llm")
# Mined, positive-aware negatives are the issue-9 default; the generated negative lowered NDCG@10 on the embedded
# 135M LLM's data (README: it is often as close to the chunk as the positive), so "llm" stays an option.
DEFAULT_NEGATIVES = "mined"

TRAINING_DATA = "training.arrow"  # the prepared dataset, in a temporary folder while the stage trains
# Rows per batch read from the scored split. A training row carries 2 + k texts of up to a chunk's length, so 1,024
# rows are ~10 MB of text; the allocators keep a few batches' worth resident. Measured (memory benchmark data):
# 4,096-row batches peaked ~200 MB above the imports, 1,024-row ones ~100 MB, the same at 20,000 and 60,000 rows.
TRAINING_STREAM_ROWS = 1024

QUERY_COLUMN, DOCUMENT_COLUMN, HARD_NEGATIVE_COLUMN = "query", "document", "hard_negative"
MINED_COLUMN = "negative_{}"  # negative_1 ... negative_k in mined mode
# What the training rows are chosen and built from; the scored split's other columns (vectors) are never read.
TRAINING_COLUMNS = (ANCHOR, POSITIVE, NEGATIVE, GENERATION_STATUS, FILTER_STATUS, HARD_NEGATIVES)

def negative_mode(negatives: str, hard_negatives: bool = False) -> str:
    """The negatives mode, with the deprecated `finetune_hard_negatives=true` meaning "llm" as it always did."""
    if negatives not in NEGATIVE_MODES:
        raise StageError(f"finetune_negatives must be one of {', '.join(NEGATIVE_MODES)}, not {negatives!r}.")
    if hard_negatives and negatives != "llm":
        log.warning("finetune_hard_negatives=true is deprecated: using finetune_negatives='llm' instead of %r",
                    negatives)
        return "llm"
    return negatives


def _as_list(value) -> list:
    # Parquet hands list cells back as numpy arrays, and a row without negatives as None.
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    return [text for text in value if isinstance(text, str) and text.strip()]


class SplitScan:
    """What the train split's rows add up to, gathered batch by batch (`add`): the counts and, for mined negatives,
    the split's distinct chunks (the fill-in pool, each with its position in first-appearance order) and the width
    (the most mined negatives any training row has). The rows themselves are not kept."""

    def __init__(self, keep_pool: bool):
        self.keep_pool, self.pool, self.width = keep_pool, {}, 0
        self.counts = {"train_rows": 0, "valid_train_rows": 0, "training_rows": 0}

    def add(self, frame, rows) -> None:
        """Count a batch of the split (`rows`: its training rows) and remember its new chunks."""
        self.counts["train_rows"] += len(frame)
        self.counts["valid_train_rows"] += len(valid_pairs(frame))
        self.counts["training_rows"] += len(rows)
        if not self.keep_pool:
            return
        for text in frame[ANCHOR]:
            if isinstance(text, str) and text not in self.pool:
                self.pool[text] = len(self.pool)
        self.width = max(self.width, max((len(_as_list(value)) for value in rows[HARD_NEGATIVES]), default=0))


def _pool_position(pick: int, excluded: list[int]) -> int:
    """The pool position of the `pick`-th chunk that is not excluded (`excluded`: ascending pool positions)."""
    position = pick
    for skipped in excluded:
        if skipped > position:
            break
        position += 1
    return position


class FillIns:
    """Completes each training row's mined negatives to `width`, rows in the split's order.

    A row with fewer than `width` mined negatives (the margin removed candidates, or a small split) gets the missing
    ones filled with random other chunks of the same split, seeded so a rerun trains on the same tuples: the loss
    needs every row to have the same number of negatives. A fill-in is never the row's own chunk nor one of its
    negatives already. The picks index the pool without the excluded chunks; they are mapped to pool positions
    instead of building that list, so a row costs its own negatives, not the pool's size.
    """

    def __init__(self, pool: dict[str, int], width: int, seed: int):
        import numpy as np

        self.chunks, self.position, self.width = list(pool), pool, width
        self.rng = np.random.default_rng(seed)
        self.counts = {"hard_negative_columns": width, "rows_filled": 0, "negatives_filled": 0}

    def complete(self, negatives: list[str], own) -> list[str]:
        """`negatives` (a row's mined ones), extended to `width`."""
        need = self.width - len(negatives)
        if need <= 0:
            return negatives
        excluded = sorted({self.position[text] for text in (own, *negatives) if text in self.position})
        allowed = len(self.chunks) - len(excluded)
        if not allowed:
            raise StageError(f"The train split has {len(self.chunks)} distinct chunks: too few to give a row "
                             f"{self.width} negatives other than its own chunk. Use more documents or "
                             "finetune_negatives='in-batch'.")
        # Repeats only when the split has fewer other chunks than a row needs.
        picks = self.rng.choice(allowed, size=need, replace=allowed < need)
        negatives.extend(self.chunks[_pool_position(int(pick), excluded)] for pick in picks)
        self.counts["rows_filled"] += 1
        self.counts["negatives_filled"] += need
        return negatives


def training_batch(rows, schema, fill: FillIns | None):
    """The loss's columns (`schema`: strings, in the loss's order) for a batch of training rows, as a record batch."""
    import pyarrow as pa

    columns = {QUERY_COLUMN: list(rows[POSITIVE]), DOCUMENT_COLUMN: list(rows[ANCHOR])}
    if HARD_NEGATIVE_COLUMN in schema.names:
        columns[HARD_NEGATIVE_COLUMN] = list(rows[NEGATIVE])
    if fill is not None:
        tuples = [fill.complete(_as_list(value), own) for value, own in zip(rows[HARD_NEGATIVES], rows[ANCHOR])]
        columns.update((MINED_COLUMN.format(i + 1), [negatives[i] for negatives in tuples])
                       for i in range(fill.width))
    return pa.record_batch([pa.array(columns[name], type=pa.string()) for name in schema.names], schema=schema)


def prepare_training_data(frames: Callable[[], Iterable[Any]], columns, negatives: str = DEFAULT_NEGATIVES,
                          seed: int = DEFAULT_SEED, folder: str | os.PathLike | None = None):
    """(the columns the loss sees, in its order: query, document[, negatives...]; counts) from the train split's
    frames. Only training_rows train: valid rows that passed every filter of mine_negatives.

    `frames()` gives the split's frames (batches of rows) afresh on each call; `columns` are the split's columns.
    The dataset is written batch by batch as an Arrow file in `folder` and memory-mapped from there, so its size
    on disk, not in memory, grows with the split (the caller removes the folder after training); without a folder
    it is built in memory (small inputs and tests). Mined negatives take two passes over the frames: the fill-in
    pool and the number of negative columns must be known before the first row is written.
    """
    import pyarrow as pa
    from datasets import Dataset as HFDataset

    mined = negatives == "mined"
    if mined and HARD_NEGATIVES not in columns:
        raise StageError(f"finetune_negatives='mined' needs the '{HARD_NEGATIVES}' column written by "
                         "mine_negatives, and the train split has none. Run mine_negatives first, or set "
                         "finetune_negatives to 'in-batch' or 'llm'.")
    scan = SplitScan(keep_pool=mined)
    if mined:
        for frame in frames():
            if len(frame):
                scan.add(frame, training_rows(frame))
    names, fill = [QUERY_COLUMN, DOCUMENT_COLUMN], None
    if negatives == "llm":
        names.append(HARD_NEGATIVE_COLUMN)
    elif mined:
        fill = FillIns(scan.pool, scan.width, seed)
        names.extend(MINED_COLUMN.format(i + 1) for i in range(scan.width))
    schema = pa.schema([(name, pa.string()) for name in names])
    path = None if folder is None else os.path.join(folder, TRAINING_DATA)
    sink = pa.BufferOutputStream() if path is None else pa.OSFile(path, "wb")
    try:
        with pa.ipc.new_stream(sink, schema) as writer:
            for frame in frames():
                if not len(frame):
                    continue
                rows = training_rows(frame)
                if not mined:  # counted here: one pass is enough without mined negatives
                    scan.add(frame, rows)
                if len(rows):
                    writer.write_batch(training_batch(rows, schema, fill))
    finally:
        if path is not None:
            sink.close()
    counts = {**scan.counts, "hard_negative_columns": len(names) - 2, **(fill.counts if fill else {})}
    # Datasets reads the stream format it writes itself; from a file it memory-maps, so only pages read are resident.
    dataset = HFDataset.from_buffer(sink.getvalue()) if path is None else HFDataset.from_file(path)
    return dataset, counts


def training_dataset(frame, negatives: str = DEFAULT_NEGATIVES, seed: int = DEFAULT_SEED):
    """(the columns the loss sees; counts) from a train split already in memory, built in memory."""
    return prepare_training_data(lambda: [frame], list(frame.columns), negatives, seed)



def load_training_data(scored_dir, negatives: str, seed: int, batch_size: int,
                       stream_rows: int = TRAINING_STREAM_ROWS, folder: str | os.PathLike | None = None):
    """(dataset, counts, batch size): the train split's training rows; at least 2 of them, batch no larger.

    The split is read `stream_rows` rows at a time and only the columns training needs (never the vectors); the
    dataset goes to an Arrow file in `folder` (see prepare_training_data), or into memory without one.
    """
    path = split_path(scored_dir, "train")
    if not path.exists():
        raise StageError(f"Expected {path} from the previous stage, but it does not exist.")
    present = input_schema(path).names
    wanted = [name for name in TRAINING_COLUMNS if name in present]
    dataset, counts = prepare_training_data(lambda: iter_frames(path, stream_rows, columns=wanted), present,
                                            negatives, seed, folder)
    if len(dataset) < 2:
        raise StageError(f"The train split has {len(dataset)} training rows (of {counts['train_rows']}: failed "
                         "generations, empty fields and rows dropped by mine_negatives' filters are left out); "
                         "finetuning needs at least 2. Generate more data or relax the filters.")
    if batch_size > len(dataset):
        log.warning("batch size %d is more than the %d training rows; using %d", batch_size, len(dataset),
                    len(dataset))
    return dataset, counts, min(batch_size, len(dataset))


@contextmanager
def temporary_training_data(scored_dir, negatives: str, seed: int, batch_size: int,
                            stream_rows: int = TRAINING_STREAM_ROWS) -> Iterator[tuple[Any, dict[str, int], int]]:
    """load_training_data with the dataset on disk, in a folder of the task's local temp dir removed on exit (also
    on error). Keep the trainer inside the block: the dataset is memory-mapped from that folder.

    The folder is made by `tempfile` (`$TMPDIR`, else /tmp): in a pipeline task that is the container's own
    ephemeral disk, and the file is about the size of the training texts (rows x (2 + negative columns) texts).
    """
    with tempfile.TemporaryDirectory(prefix="finetune-data-") as folder:
        yield load_training_data(scored_dir, negatives, seed, batch_size, stream_rows, folder)


