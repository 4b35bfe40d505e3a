"""embed_score on CPU against the seed's `format_data` approach, on 1,000 rows of the Kubeflow corpus.

The seed's way, reimplemented here as it ran: for every 1,000 rows it built the SentenceTransformer again, encoded
the anchor with the positive and again with the negative (so every anchor twice), scored each pair with its own
scikit-learn `cosine_similarity` call, in fp32 without normalising. Ours is the real stage (`embed_score`, through
benchmarks/stages.py), its model load included. Both run in this process on the same rows and threads.

At one query per chunk the stage runs again with each optional CPU backend (`embedding_backend` onnx, openvino)
on the same rows: its rows/s against the seed's and the torch stage's, and its largest score difference from the
seed's fp32 scores. The export to ONNX is timed apart, into an empty cache, and the stage then finds it there (as
every run after a machine's first does).
"""

import os
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np

from benchmarks.speed import Row, benchmark
from benchmarks.speed.data import triplet_rows, write_split_folder
from components.common import SIM_ANCHOR_NEG, SIM_ANCHOR_POS, SIM_POS_NEG, is_text
from components.embed_backends import EXPORT_CACHE_ENV

SEED_BATCH_ROWS = 1000
SIM_COLUMNS = (SIM_POS_NEG, SIM_ANCHOR_POS, SIM_ANCHOR_NEG)
BACKENDS = ("onnx", "openvino")
# The largest score difference from the seed's fp32 scores each precision may have: fp32 only reorders sums; bf16
# (OpenVINO on CPUs that have it) keeps 8 bits of mantissa.
TOLERANCE = {"fp32": 1e-4, "f32": 1e-4, "bfloat16": 1e-2}


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


def difference_note(difference: float, precision: str) -> str:
    """The note's score-difference clause; the smoke test reads the difference and the tolerance back."""
    tolerance = TOLERANCE.get(precision, 1e-4)
    verdict = "ok" if difference <= tolerance else "ABOVE"
    return f"max abs score difference {difference:.1e} ({precision}, tolerance {tolerance:.0e}: {verdict})"


def timed_stage(source: Path, target: Path, backend: str = "torch") -> dict:
    """Run the stage; its stats with the wall and CPU seconds it took and its train split's scores."""
    import pandas as pd

    from benchmarks import stages

    started, cpu = time.perf_counter(), time.process_time()
    stats = stages.embed(source, target, backend)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
    return {**stats, "seconds": seconds, "cpu_seconds": cpu_seconds,
            "scores": pd.read_parquet(target / "train.parquet")}


def export_seconds() -> float:
    """Seconds the ONNX export of the embedded model takes (into the export cache, which must be empty)."""
    from benchmarks import stages
    from components.common import load_model
    from components.embed_backends import exported_graph

    return exported_graph(load_model(stages.EMBEDDING_MODEL, "cpu"))[1]


def backend_row(backend: str, source: Path, work: Path, seed: dict, seed_seconds: float, torch: dict,
                export: float) -> Row:
    """The stage with an exported backend on the seed's rows: rows/s against the seed's, and against torch's."""
    run = timed_stage(source, work / backend, backend)
    rows, difference = len(run["scores"]), difference_note(largest_difference(run["scores"], seed), run["precision"])
    note = (f"`embedding_backend={backend}` ({run['precision']}, CPU); wall: stage {run['seconds']:.1f} s, torch "
            f"stage {torch['seconds']:.1f} s ({torch['seconds'] / run['seconds']:.2f}x), seed {seed_seconds:.1f} s; "
            f"CPU time: stage {run['cpu_seconds']:.1f} s, torch stage {torch['cpu_seconds']:.1f} s "
            f"({torch['cpu_seconds'] / run['cpu_seconds']:.2f}x); ONNX export {export:.1f} s once per model and "
            f"machine, not in these times; {difference}")
    return Row(f"embed_score CPU, {rows:,} rows, 1 per chunk, {backend}", rows / run["seconds"], rows / seed_seconds,
               "rows/s", note=note)


def compare(rows: int, queries_per_chunk: int, label: str, backends: tuple[str, ...] = ()) -> list[Row]:
    """Time the seed's way and the stage on the same rows (then each backend's stage); rows/s and the largest
    score difference."""
    from benchmarks import stages
    from components.common import resolve_embedding_model

    frame = triplet_rows(rows, queries_per_chunk)
    model_path, _ = resolve_embedding_model(stages.EMBEDDING_MODEL)
    with tempfile.TemporaryDirectory(prefix="bench-embed-") as work:
        source = write_split_folder(frame, Path(work) / "in")
        started, cpu = time.perf_counter(), time.process_time()
        seed = seed_format_data(frame, model_path)
        seed_seconds, seed_cpu = time.perf_counter() - started, time.process_time() - cpu
        ours = timed_stage(source, Path(work) / "out")
        note = (f"{label}; {frame['anchor'].nunique()} distinct chunks; wall: stage {ours['seconds']:.1f} s, seed "
                f"{seed_seconds:.1f} s; CPU time (less moved by other load): stage {ours['cpu_seconds']:.1f} s, seed "
                f"{seed_cpu:.1f} s, {seed_cpu / ours['cpu_seconds']:.2f}x; "
                f"{difference_note(largest_difference(ours['scores'], seed), ours['precision'])}")
        result = [Row(f"embed_score CPU, {rows:,} rows, {queries_per_chunk} per chunk", rows / ours["seconds"],
                      rows / seed_seconds, "rows/s", note=note)]
        if backends:
            # A fresh export cache: the export is timed once, then every backend's stage finds it.
            with mock.patch.dict(os.environ, {EXPORT_CACHE_ENV: str(Path(work) / "exports")}):
                export = export_seconds()
                result += [backend_row(backend, source, Path(work), seed, seed_seconds, ours, export)
                           for backend in backends]
    return result


@benchmark("embed_score_cpu")
def embed_score_cpu(quick: bool) -> list[Row]:
    """1,000 rows at one query per chunk (the local default; then each CPU backend) and at three (the cluster
    default)."""
    rows = 24 if quick else 1000
    return [*compare(rows, 1, "one query per chunk (local default)", BACKENDS),
            *compare(rows, 3, "three queries per chunk (cluster default)")]
