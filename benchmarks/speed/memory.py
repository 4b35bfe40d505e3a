"""Memory and scale: embed_score and finetune's data preparation on 2,000 and on 20,000 rows, peak resident size.

Each size runs in a fresh process (benchmarks/speed/memory_probe.py), so a peak is that run's alone. The rows
repeat the Kubeflow corpus's chunks, a chunk's rows adjacent (as generate_queries writes them), so embed_score's
work stays near one encoding per chunk while its input and output grow tenfold. finetune's input is embed_score-like
output: a 384-float anchor vector per row, three mined negatives, every row kept; its prepared dataset is memory-mapped
from a temporary file, so the probe also reads it once through and reports what is then resident, anonymous memory
apart from the file's pages (see memory_probe.py).
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.speed import Row, benchmark
from benchmarks.speed.data import PROJECT_ROOT, triplet_rows, write_split_folder

VECTOR_DIMENSION = 384


def probe(*args: str) -> dict:
    """Run the probe in a fresh process; its JSON line."""
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.speed.memory_probe", *args], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise RuntimeError(f"memory probe {args[0]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def scored_table(frame):
    """An embed_score + mine_negatives-like train split (vectors as list<double>, like the stage writes them)."""
    import pyarrow as pa

    rows = len(frame)
    anchors = list(frame["anchor"])
    distinct = list(dict.fromkeys(anchors))
    position = {text: i for i, text in enumerate(distinct)}
    values = np.random.default_rng(0).random(rows * VECTOR_DIMENSION)
    offsets = np.arange(0, rows * VECTOR_DIMENSION + 1, VECTOR_DIMENSION, dtype=np.int32)
    negatives = [[distinct[(position[text] + j) % len(distinct)] for j in (1, 2, 3)] for text in anchors]
    return pa.table({**{name: pa.array(frame[name], from_pandas=True) for name in ("anchor", "positive", "negative",
                                                                          "generation_status")},
                     "filter_status": pa.array(["kept"] * rows), "hard_negatives": pa.array(negatives),
                     "anchor-vector": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))})


def measure(sizes: tuple[int, int], chunk_count: int) -> list[Row]:
    """Peaks of both data paths at both sizes."""
    import pyarrow.parquet as pq

    peaks = {}
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as work:
        for rows in sizes:
            frame = triplet_rows(rows, chunk_count=chunk_count * rows // sizes[-1] or 1)
            source = write_split_folder(frame, Path(work) / f"in-{rows}")
            peaks["embed", rows] = probe("embed", str(source), str(Path(work) / f"out-{rows}"))
            scored = Path(work) / f"scored-{rows}"
            scored.mkdir()
            pq.write_table(scored_table(frame), scored / "train.parquet")
            peaks["finetune", rows] = probe("finetune-data", str(scored))
    small, large = sizes
    result = []
    for stage, label in (("embed", "embed_score"), ("finetune", "finetune data preparation")):
        low, high = peaks[stage, small], peaks[stage, large]
        note = (f"peak at {large:,} rows / peak at {small:,} (target <= 2x); above the ready process "
                f"({low['ready_mb']:.0f} MB after imports{' and model load' if stage == 'embed' else ''}): "
                f"{high['peak_mb'] - high['ready_mb']:.0f} MB vs {low['peak_mb'] - low['ready_mb']:.0f} MB")
        if stage == "finetune":
            note += (f"; resident after one read of every prepared row ({high['rows']:,} vs {low['rows']:,}): "
                     f"anonymous {high['read_anon_mb']:.0f} vs {low['read_anon_mb']:.0f} MB, file-backed (the "
                     f"memory-mapped dataset's pages read, which the kernel may drop, and the libraries) "
                     f"{high['read_file_mb']:.0f} vs {low['read_file_mb']:.0f} MB")
        result.append(Row(f"{label} peak memory, {large:,} vs {small:,} rows", high["peak_mb"], low["peak_mb"],
                          "MB", note=note))
    return result


@benchmark("memory")
def memory(quick: bool) -> list[Row]:
    """2,000 vs 20,000 rows (quick: 20 vs 200) over the corpus's chunks."""
    return measure((20, 200), 20) if quick else measure((2000, 20000), 1087)
