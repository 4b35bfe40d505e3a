"""The embed_score stage: embed anchor, positive and negative once each and score the triplets.

The model is loaded once; the splits are read and written `stream_rows` rows at a time, so memory does not grow
with the data; within a batch every distinct text is encoded once (a chunk's anchor once for all its queries), with
normalised embeddings, so cosine similarity is a row-wise dot product. CUDA in half precision when present.
"""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from kfp.dsl import Dataset, Input, Output

from components.common import (
    ANCHOR,
    ANCHOR_VECTOR,
    CLUSTER_EMBEDDING_MODEL,
    EMBEDDED_EMBEDDING_MODEL,
    NEGATIVE,
    POSITIVE,
    SIM_ANCHOR_NEG,
    SIM_ANCHOR_POS,
    SIM_POS_NEG,
    SPLITS,
    StageError,
    get_logger,
    is_text,
    resolve_embedding_model,
    split_path,
    stage_component,
    write_json,
)
from components.embed_backends import BACKENDS, TORCH, load_encoder
from components.parquet_stream import STREAM_ROWS, FrameWriter, input_schema, iter_frames
from components.progress import ProgressReporter
from components.settings import setting

log = get_logger("embed_score")
# Texts are encoded this many batches at a time, so progress is reported while a large corpus is encoded.
BATCHES_PER_PROGRESS_STEP = 8
# anchor, positive, negative: the texts of a row.
TEXT_COLUMNS = 3


@dataclass(frozen=True)
class EmbedScoreSettings:
    """The base embedding model (also what finetune starts from and evaluate compares against)."""

    embedding_model: str = setting(CLUSTER_EMBEDDING_MODEL, "local path, Hub id, or the embedded default "
                                   f"{EMBEDDED_EMBEDDING_MODEL}", local=EMBEDDED_EMBEDDING_MODEL)
    # 256 was fastest on an H200 (docs/benchmarks.md: 22.6% of peak, against 17.7% at 64); 64 on a CPU.
    embedding_batch_size: int = setting(256, "texts per encoding batch", local=64, minimum=1, maximum=65536)
    # The exported backends run on the CPU only; docs/benchmarks.md has their speed and score differences.
    embedding_backend: str = setting(TORCH, "how embed_score runs the model: torch (CUDA fp16 on a GPU), or on the "
                                     "CPU onnx (ONNX Runtime, fp32) or openvino (bf16 where the CPU has it)",
                                     choices=BACKENDS)


def token_lengths(model, texts: list[str]) -> list[int]:
    """Each text's token count as the model sees it (special tokens in, cut at its window)."""
    window = int(model.max_seq_length or 512)
    ids = model.tokenizer(texts, add_special_tokens=True, truncation=True, max_length=window)["input_ids"]
    return [len(text_ids) for text_ids in ids]


def embed_texts(model, texts: list[str], batch_size: int = 64, progress: Optional[ProgressReporter] = None):
    """Encode distinct texts once; return (index by text, normalised float32 matrix).

    Batches are cut from the texts sorted by token count, longest first, so each pads to nearly its own length
    (sentence-transformers sorts only within one `encode` call, and by characters). `progress`, if given, advances
    by the texts encoded, a few batches at a time.
    """
    import numpy as np

    unique = list(dict.fromkeys(texts))
    vectors = np.zeros((len(unique), model.get_embedding_dimension()), dtype=np.float32)
    if not unique:
        return {}, vectors
    lengths = token_lengths(model, unique)
    order = sorted(range(len(unique)), key=lambda i: -lengths[i])
    for first in range(0, len(order), batch_size * BATCHES_PER_PROGRESS_STEP):
        for start in range(first, min(first + batch_size * BATCHES_PER_PROGRESS_STEP, len(order)), batch_size):
            batch = order[start:start + batch_size]
            vectors[batch] = model.encode([unique[i] for i in batch], batch_size=len(batch),
                                          normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
        if progress is not None:
            progress.advance(min(batch_size * BATCHES_PER_PROGRESS_STEP, len(order) - first))
    return {text: i for i, text in enumerate(unique)}, vectors


def score_frame(frame, index: dict[str, int], vectors, model) -> Any:
    """Add the three similarities, the anchor vector, token counts and the model-window flag to a split."""
    import numpy as np

    frame = frame.copy()

    def rows_of(column: str):
        return np.array([index.get(text, -1) if is_text(text) else -1 for text in frame[column]], dtype=np.int64)

    def similarity(left: np.ndarray, right: np.ndarray) -> np.ndarray:
        valid = (left >= 0) & (right >= 0)
        values = np.full(len(frame), np.nan, dtype=np.float64)
        if valid.any():
            values[valid] = np.einsum("ij,ij->i", vectors[left[valid]], vectors[right[valid]])
        # Normalised vectors: rounding can leave a cosine a hair outside [-1, 1].
        return np.clip(values, -1.0, 1.0)

    anchors, positives, negatives = rows_of(ANCHOR), rows_of(POSITIVE), rows_of(NEGATIVE)
    frame[SIM_POS_NEG] = similarity(positives, negatives)
    frame[SIM_ANCHOR_POS] = similarity(anchors, positives)
    frame[SIM_ANCHOR_NEG] = similarity(anchors, negatives)
    frame[ANCHOR_VECTOR] = [vectors[i].tolist() if i >= 0 else None for i in anchors]
    anchor_texts = [text if isinstance(text, str) else "" for text in frame[ANCHOR]]
    encoded = model.tokenizer(anchor_texts, add_special_tokens=True)["input_ids"] if len(frame) else []
    counts = [len(ids) for ids in encoded]
    frame["token_count"] = np.array(counts, dtype=np.int64)
    frame["exceeds_model_window"] = frame["token_count"] > model.max_seq_length
    return frame


def output_schema(source_schema):
    """The scored split's arrow schema: the input's columns, then the added ones, each with a fixed type, so every
    batch is written alike (a batch whose negatives are all missing must not make the column untyped)."""
    import pyarrow as pa

    added = {SIM_POS_NEG: pa.float64(), SIM_ANCHOR_POS: pa.float64(), SIM_ANCHOR_NEG: pa.float64(),
             ANCHOR_VECTOR: pa.list_(pa.float64()), "token_count": pa.int64(), "exceeds_model_window": pa.bool_(),
             "embedding_model": pa.large_string()}
    fields = [pa.field(field.name, added.get(field.name, field.type)) for field in source_schema]
    fields += [pa.field(name, kind) for name, kind in added.items() if name not in source_schema.names]
    return pa.schema(fields)


class SplitStats:
    """Counts and sums of one split, added up batch by batch, for stats.json."""

    def __init__(self):
        self.rows = self.exceeds = self.closer = self.both = 0
        self.sums = dict.fromkeys((SIM_POS_NEG, SIM_ANCHOR_POS, SIM_ANCHOR_NEG), 0.0)
        self.counts = dict.fromkeys(self.sums, 0)

    def add(self, frame) -> None:
        """Add a scored batch."""
        self.rows += len(frame)
        self.exceeds += int(frame["exceeds_model_window"].sum())
        for column in self.sums:
            values = frame[column].dropna()
            self.sums[column] += float(values.sum())
            self.counts[column] += len(values)
        both = frame[[SIM_ANCHOR_POS, SIM_ANCHOR_NEG]].dropna()
        self.both += len(both)
        self.closer += int((both[SIM_ANCHOR_POS] > both[SIM_ANCHOR_NEG]).sum())

    def as_dict(self) -> dict[str, Any]:
        """The split's entry in stats.json."""
        result: dict[str, Any] = {"rows": self.rows, "exceeds_model_window": self.exceeds}
        for column, total in self.sums.items():
            count = self.counts[column]
            result[column] = {"mean": total / count if count else None, "count": count}
        if self.rows:
            result["positive_closer_than_negative"] = self.closer / self.both if self.both else None
        return result


def split_stats(frame: Any) -> dict[str, Any]:
    """A whole scored split's entry in stats.json (the shards' merge recomputes it over all rows)."""
    stats = SplitStats()
    stats.add(frame)
    return stats.as_dict()


def score_split(model, source: Path, target: Path, model_label: str, batch_size: int,
                stream_rows: int, progress: ProgressReporter) -> tuple[dict[str, Any], int]:
    """Score one split's file `stream_rows` rows at a time; (its stats, texts encoded).

    `progress` counts the split's texts (three per row): encoded ones as they are encoded, repeated or empty ones
    when their batch is done.
    """
    stats, encoded = SplitStats(), 0
    with FrameWriter(target, output_schema(input_schema(source))) as writer:
        for frame in iter_frames(source, stream_rows):
            texts = [text for column in (ANCHOR, POSITIVE, NEGATIVE) for text in frame[column] if is_text(text)]
            index, vectors = embed_texts(model, texts, batch_size, progress)
            progress.advance(TEXT_COLUMNS * len(frame) - len(index))
            scored = score_frame(frame, index, vectors, model)
            scored["embedding_model"] = model_label
            writer.write(scored)
            stats.add(scored)
            encoded += len(index)
    return stats.as_dict(), encoded


def embed_score(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    embedding_model: str,
    device: str = "auto",
    batch_size: int = 64,
    stream_rows: int = STREAM_ROWS,
    backend: str = TORCH,
) -> dict[str, Any]:
    """Embed and score both splits, `stream_rows` rows at a time (memory stays bounded); write them and stats.json.

    Each batch encodes its distinct texts once: a chunk's rows are adjacent in generate_queries' output, so its
    anchor is encoded once unless a batch boundary falls between them.
    """
    sources = {split: split_path(input_dir, split) for split in SPLITS}
    missing = [str(path) for path in sources.values() if not path.exists()]
    if missing:
        raise StageError(f"Expected {', '.join(missing)} from the previous stage, but it does not exist.")
    _, model_label = resolve_embedding_model(embedding_model)
    model = load_encoder(embedding_model, device, backend)
    stats: dict[str, Any] = {
        "embedding_model": model_label,
        "dimension": int(model.get_embedding_dimension()),
        "max_seq_length": int(model.max_seq_length),
        "device": str(model.device),
        "embedding_backend": backend,
        "precision": getattr(model, "precision", "fp16" if str(model.device).startswith("cuda") else "fp32"),
        "encoded_texts": 0,
        "splits": {},
    }
    import pyarrow.parquet as pq

    # One count for the whole stage (a bar that does not restart per split or per streamed batch).
    total_texts = TEXT_COLUMNS * sum(pq.ParquetFile(source).metadata.num_rows for source in sources.values())
    progress = ProgressReporter("embed_score", total_texts, unit="texts", logger=log)
    for split, source in sources.items():
        stats["splits"][split], encoded = score_split(model, source, split_path(output_dir, split), model_label,
                                                      batch_size, stream_rows, progress)
        stats["encoded_texts"] += encoded
    write_json(Path(output_dir) / "stats.json", stats)
    log.info("scored %s rows with %s on %s (dimension %d, %d texts encoded)",
             {split: split_stats["rows"] for split, split_stats in stats["splits"].items()}, model_label,
             stats["device"], stats["dimension"], stats["encoded_texts"])
    return stats


@stage_component("embed_score")
def embed_score_component(triplets: Input[Dataset], embedding_model: str, embedding_batch_size: int,
                          embedding_backend: str, scored: Output[Dataset]):
    """Embed anchor/positive/negative with the base model and add similarities and the anchor vector."""
    from components.embed_score import EmbedScoreSettings, embed_score
    from components.settings import from_arguments

    settings = from_arguments(EmbedScoreSettings, locals())
    stats = embed_score(triplets.path, scored.path, settings.embedding_model, batch_size=settings.embedding_batch_size,
                        backend=settings.embedding_backend)
    scored.metadata.update({"embedding_model": stats["embedding_model"], "dimension": stats["dimension"],
                            "device": stats["device"], "embedding_backend": stats["embedding_backend"]})
