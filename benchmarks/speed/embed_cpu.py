"""embed_score on CPU against the seed's `format_data` approach, on 1,000 rows of the Kubeflow corpus.

The seed's way, reimplemented here as it ran: for every 1,000 rows it built the SentenceTransformer again, encoded
the anchor with the positive and again with the negative (so every anchor twice), scored each pair with its own
scikit-learn `cosine_similarity` call, in fp32 without normalising. Ours is the real stage (`embed_score`, through
benchmarks/stages.py), its model load included. Both run in this process on the same rows and threads.
"""

import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.speed import Row, benchmark
from benchmarks.speed.data import triplet_rows, write_split_folder
from components.common import SIM_ANCHOR_NEG, SIM_ANCHOR_POS, SIM_POS_NEG, is_text

SEED_BATCH_ROWS = 1000
SIM_COLUMNS = (SIM_POS_NEG, SIM_ANCHOR_POS, SIM_ANCHOR_NEG)


def seed_format_data(frame, model_path: str) -> dict[str, np.ndarray]:
    """The seed's scoring: model per 1,000 rows, anchor encoded twice, one sklearn cosine per pair, fp32."""
    from sentence_transformers import SentenceTransformer
    from sklearn.metrics.pairwise import cosine_similarity

    scores = {column: [] for column in SIM_COLUMNS}
    for start in range(0, len(frame), SEED_BATCH_ROWS):
        batch = frame.iloc[start:start + SEED_BATCH_ROWS]
        model = SentenceTransformer(model_path, device="cpu")

        def encode(column):
            return model.encode([text if is_text(text) else "" for text in batch[column]])

        anchors_for_positive, positives = encode("anchor"), encode("positive")
        anchors_for_negative, negatives = encode("anchor"), encode("negative")
        for i, (positive, negative) in enumerate(zip(batch["positive"], batch["negative"])):
            has_positive, has_negative = is_text(positive), is_text(negative)
            scores[SIM_ANCHOR_POS].append(cosine_similarity([anchors_for_positive[i]], [positives[i]])[0][0]
                                          if has_positive else np.nan)
            scores[SIM_ANCHOR_NEG].append(cosine_similarity([anchors_for_negative[i]], [negatives[i]])[0][0]
                                          if has_negative else np.nan)
            scores[SIM_POS_NEG].append(cosine_similarity([positives[i]], [negatives[i]])[0][0]
                                       if has_positive and has_negative else np.nan)
    return {column: np.array(values, dtype=np.float64) for column, values in scores.items()}


def largest_difference(ours, seed: dict[str, np.ndarray]) -> float:
    """The largest |score difference| over the three similarities (rows scored by both)."""
    largest = 0.0
    for column in SIM_COLUMNS:
        both = ~np.isnan(seed[column]) & ~np.isnan(ours[column].to_numpy())
        if both.any():
            largest = max(largest, float(np.abs(seed[column][both] - ours[column].to_numpy()[both]).max()))
    return largest


def compare(rows: int, queries_per_chunk: int, label: str) -> Row:
    """Time the seed's way and the stage on the same rows; rows/s and the largest score difference."""
    import pandas as pd

    from benchmarks import stages
    from components.common import resolve_embedding_model

    frame = triplet_rows(rows, queries_per_chunk)
    model_path, _ = resolve_embedding_model(stages.EMBEDDING_MODEL)
    with tempfile.TemporaryDirectory(prefix="bench-embed-") as work:
        source = write_split_folder(frame, Path(work) / "in")
        started, cpu = time.perf_counter(), time.process_time()
        seed = seed_format_data(frame, model_path)
        seed_seconds, seed_cpu = time.perf_counter() - started, time.process_time() - cpu
        started, cpu = time.perf_counter(), time.process_time()
        stages.embed(source, Path(work) / "out")
        our_seconds, our_cpu = time.perf_counter() - started, time.process_time() - cpu
        ours = pd.read_parquet(Path(work) / "out" / "train.parquet")
    difference = largest_difference(ours, seed)
    verdict = "ok" if difference <= 1e-4 else "ABOVE 1e-4"
    note = (f"{label}; {frame['anchor'].nunique()} distinct chunks; wall: stage {our_seconds:.1f} s, seed "
            f"{seed_seconds:.1f} s; CPU time (less moved by other load): stage {our_cpu:.1f} s, seed {seed_cpu:.1f} s, "
            f"{seed_cpu / our_cpu:.2f}x; max abs score difference {difference:.1e} ({verdict})")
    return Row(f"embed_score CPU, {rows:,} rows, {queries_per_chunk} per chunk", rows / our_seconds,
               rows / seed_seconds, "rows/s", note=note)


@benchmark("embed_score_cpu")
def embed_score_cpu(quick: bool) -> list[Row]:
    """1,000 rows at one query per chunk (the local default) and at three (the cluster default)."""
    rows = 24 if quick else 1000
    return [compare(rows, 1, "one query per chunk (local default)"),
            compare(rows, 3, "three queries per chunk (cluster default)")]
