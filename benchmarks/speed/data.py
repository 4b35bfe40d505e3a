"""The data the speed benchmarks run on: Kubeflow documentation chunks with the fixture's generated queries."""

from functools import lru_cache
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
KUBEFLOW_DOCS = PROJECT_ROOT.parent / "shared" / "data" / "kubeflow-docs"
FIXTURE = PROJECT_ROOT / "benchmarks" / "data" / "kubeflow-queries.parquet"
METADATA = ("filename", "parent_section", "url", "token_count")


@lru_cache(maxsize=1)
def chunks() -> list[dict]:
    """Every chunk of the corpus once: the fixture's chunks first (they have their own generated queries), then the
    corpus's other chunks (train, then test), each with load_docs' metadata columns."""
    import pandas as pd

    fixture = pd.read_parquet(FIXTURE)
    seen = dict.fromkeys(fixture["anchor"])
    rows = fixture[["anchor", *METADATA]].to_dict("records")
    for split in ("train", "test"):
        corpus = pd.read_parquet(KUBEFLOW_DOCS / f"{split}.parquet").rename(columns={"page_content": "anchor"})
        rows += [row for row in corpus[["anchor", *METADATA]].to_dict("records") if row["anchor"] not in seen]
    return rows


@lru_cache(maxsize=1)
def query_pairs() -> list[tuple]:
    """The fixture's (positive, negative) pairs in its order, failed generations (None) included."""
    import pandas as pd

    fixture = pd.read_parquet(FIXTURE)
    return list(zip(fixture["positive"], fixture["negative"]))


def triplet_rows(rows: int, queries_per_chunk: int = 1, chunk_count: int = 0):
    """`rows` generate_queries-like rows: chunk i // queries_per_chunk as anchor (a chunk's rows adjacent, as the
    stage writes them), the fixture's query pairs in turn. `chunk_count` > 0 spreads the rows evenly over that many
    chunks instead (the memory benchmark's repeated corpus)."""
    import pandas as pd

    corpus, pairs = chunks(), query_pairs()
    if chunk_count:
        chunk_count = min(chunk_count, len(corpus))
        anchors = [corpus[i * chunk_count // rows] for i in range(rows)]
    else:
        anchors = [corpus[(i // queries_per_chunk) % len(corpus)] for i in range(rows)]
    frame = pd.DataFrame(anchors)
    frame["positive"] = [pairs[i % len(pairs)][0] for i in range(rows)]
    frame["negative"] = [pairs[i % len(pairs)][1] for i in range(rows)]
    frame["generation_status"] = ["failed" if positive is None else "generated" for positive in frame["positive"]]
    return frame


def write_split_folder(frame, folder: Path, test_frame=None) -> Path:
    """A stage input folder: `frame` as the train split, `test_frame` (else no rows) as the test split."""
    from components.common import write_splits

    write_splits({"train": frame, "test": frame.head(0) if test_frame is None else test_frame}, folder)
    return folder
