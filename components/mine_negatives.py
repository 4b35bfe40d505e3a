"""The mine_negatives stage: filter the generated queries and mine hard negatives from the corpus.

Every row of embed_score's output comes out again, marked: `filter_status` says "kept" or why it was dropped, so
the report and Argilla still show dropped rows; training and evaluation read only kept rows
(components.common.training_rows). Per split, only among that split's chunks:
- round-trip (Promptagator, InPars): `roundtrip_rank`, the rank of the row's own chunk for its positive among the
  split's distinct chunks with the base model; a rank above `roundtrip_k` drops the row;
- near-duplicates: a positive whose cosine with an earlier kept positive of the same chunk reaches the threshold;
- hard negatives: sentence-transformers' `mine_hard_negatives` (NV-Retriever's TopK-PercPos: the closest chunks,
  minus those scoring within a relative margin of the positive's score), for every valid row, kept or not. A train
  row never gets a test chunk, so nothing of the test set leaks into training.
"""

import glob
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kfp.dsl import Dataset, Input, Output

from components.common import (
    ANCHOR,
    CHUNK_ID,
    DOCUMENT_PROMPT_NAMES,
    FILTER_STATUS,
    HARD_NEGATIVE_IDS,
    HARD_NEGATIVES,
    KEPT,
    MARGIN_REMOVED,
    POSITIVE,
    QUERY_PROMPT_NAMES,
    ROUNDTRIP_RANK,
    StageError,
    get_logger,
    is_text,
    load_model,
    model_prompt,
    read_json,
    read_splits,
    resolve_embedding_model,
    stage_component,
    valid_pairs,
    write_json,
    write_splits,
)
from components.settings import setting

log = get_logger("mine_negatives")

FAILED = "dropped: generation failed"
NEAR_DUPLICATE = "dropped: near-duplicate"
ROUNDTRIP_DROPPED = "dropped: roundtrip rank {rank}"
# Query rows scored against a whole split at a time: bounds the score matrix at SCORE_BATCH x chunks.
SCORE_BATCH = 1024
# Normalised vectors of the same text can score 0.99999994 with each other; a threshold of 1 still means "identical".
COSINE_TOLERANCE = 1e-6


@dataclass(frozen=True)
class MineNegativesSettings:
    """The filters of the generated queries and the mining of hard negatives."""

    miner_model: str = setting("", "model that mines the hard negatives: local path or Hub id; empty: the "
                               "embedding_model")
    num_hard_negatives: int = setting(3, "hard negatives mined per row", minimum=1, maximum=100)
    mining_range: int = setting(10, "how many of the chunks closest to the query are candidates", minimum=1,
                               maximum=10000)
    mining_margin: float = setting(0.05, "relative margin: a candidate scoring above the positive's score minus "
                                   "this fraction of it is not a negative (it is probably also relevant)",
                                   minimum=0.0, maximum=1.0)
    roundtrip_k: int = setting(10, "keep a row only if its own chunk ranks in the top k for its query among "
                               "the split's chunks (base model); 0: no round-trip filter", minimum=0,
                               maximum=10000)
    near_duplicate_threshold: float = setting(0.95, "cosine (base model) at which a query duplicates an earlier "
                                              "kept query of the same chunk", minimum=0.0, maximum=1.0)


@dataclass
class SplitIndex:
    """A split's distinct chunk texts and distinct queries, and where each valid row points into them."""

    valid: Any  # bool per row
    corpus: list[str]  # distinct chunk texts
    chunk_of_text: dict[str, Any]  # chunk text -> its (first) chunk_id
    chunks_per_text: Any  # int per corpus text: how many chunk_ids carry it (more than 1 only for odd inputs)
    queries: list[str]  # distinct positives of the valid rows
    row_query: Any  # per valid row: its positive's index in `queries`
    row_text: Any  # per valid row: its chunk's index in `corpus`
    row_chunk: list[Any]  # per valid row: its chunk_id


@dataclass
class Vectors:
    """One model's normalised float32 vectors of a split's distinct queries and chunk texts."""

    queries: Any
    corpus: Any


def index_split(frame) -> SplitIndex:
    """Index a split; chunks are told apart by chunk_id (the chunk text for data without one)."""
    import numpy as np

    keys = frame[CHUNK_ID] if CHUNK_ID in frame.columns else frame[ANCHOR]
    chunk_texts = {key: text for key, text in zip(keys, frame[ANCHOR]) if is_text(text)}
    corpus = list(dict.fromkeys(chunk_texts.values()))
    text_index = {text: i for i, text in enumerate(corpus)}
    chunks_per_text = np.zeros(len(corpus), dtype=np.int64)
    chunk_of_text: dict[str, Any] = {}
    for key, text in chunk_texts.items():
        chunks_per_text[text_index[text]] += 1
        chunk_of_text.setdefault(text, key)
    valid = np.zeros(len(frame), dtype=bool)
    valid[frame.index.get_indexer(valid_pairs(frame).index)] = True
    valid &= frame[ANCHOR].map(is_text).to_numpy(dtype=bool)
    positives = list(frame[POSITIVE][valid])
    queries = list(dict.fromkeys(positives))
    query_index = {text: i for i, text in enumerate(queries)}
    return SplitIndex(
        valid=valid, corpus=corpus, chunk_of_text=chunk_of_text, chunks_per_text=chunks_per_text, queries=queries,
        row_query=np.array([query_index[text] for text in positives], dtype=np.int64),
        row_text=np.array([text_index[text] for text in frame[ANCHOR][valid]], dtype=np.int64),
        row_chunk=list(keys[valid]))


def prompts(model) -> dict[str, str]:
    """The model's own query and document prompts ("" where it defines none)."""
    return {"query": model_prompt(model, *QUERY_PROMPT_NAMES), "document": model_prompt(model, *DOCUMENT_PROMPT_NAMES)}


def encode(model, index: SplitIndex, batch_size: int) -> Vectors:
    """Encode each distinct query and chunk text once, with the model's prompts, normalised."""
    import numpy as np

    prompt = prompts(model)
    options = {"batch_size": batch_size, "normalize_embeddings": True, "convert_to_numpy": True,
               "show_progress_bar": False}
    queries = model.encode_query(index.queries, prompt=prompt["query"], **options)
    corpus = model.encode_document(index.corpus, prompt=prompt["document"], **options)
    return Vectors(np.asarray(queries, dtype=np.float32), np.asarray(corpus, dtype=np.float32))


def mine(model, index: SplitIndex, settings: MineNegativesSettings, batch_size: int):
    """Run `mine_hard_negatives` over the split's distinct (query, chunk) pairs with the split's chunks as corpus.

    Returns ({(query, chunk text): [negative texts, best first]}, the vectors it encoded, [(query, negative, score)]).
    A query shared by several chunks counts all of them as positives (none becomes its negative) and the margin
    follows the lowest of their scores. The vectors come from its embedding cache, so nothing is encoded twice.
    """
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    pairs = list(dict.fromkeys(zip((index.queries[q] for q in index.row_query),
                                   (index.corpus[t] for t in index.row_text))))
    dataset = Dataset.from_dict({"query": [query for query, _ in pairs], "chunk": [chunk for _, chunk in pairs]})
    prompt = prompts(model)
    with tempfile.TemporaryDirectory(prefix="mine-negatives-") as cache:
        mined = mine_hard_negatives(
            dataset, model, anchor_column_name="query", positive_column_name="chunk", corpus=index.corpus,
            range_max=settings.mining_range, relative_margin=settings.mining_margin,
            num_negatives=settings.num_hard_negatives, sampling_strategy="top", query_prompt=prompt["query"],
            corpus_prompt=prompt["document"], output_format="triplet", output_scores=True, batch_size=batch_size,
            use_faiss=False, verbose=False, cache_folder=cache)
        vectors = Vectors(cached_vectors(cache, "query", len(index.queries)),
                          cached_vectors(cache, "corpus", len(index.corpus)))
    negatives: dict[tuple[str, str], list[str]] = {}
    scored = []
    for query, chunk, negative, scores in zip(mined["query"], mined["chunk"], mined["negative"], mined["scores"]):
        negatives.setdefault((query, chunk), []).append(negative)
        scored.append((query, negative, scores[1]))
    return negatives, vectors, scored


def cached_vectors(folder: str, kind: str, rows: int):
    """The vectors mine_hard_negatives saved in its cache folder (one file per kind: the folder is fresh)."""
    import numpy as np

    files = glob.glob(os.path.join(folder, f"{kind}_embeddings_*.npy"))
    vectors = np.load(files[0]).astype(np.float32) if len(files) == 1 else None
    if vectors is None or vectors.shape[0] != rows:
        raise StageError(f"mine_hard_negatives left {len(files)} {kind} embedding files (shape "
                         f"{None if vectors is None else vectors.shape}, expected {rows} rows); this sentence-"
                         "transformers version caches differently from 6.2.")
    return vectors


def scores_in_batches(model, queries, corpus):
    """Yield (first row, similarity matrix of SCORE_BATCH queries x the corpus) with the model's own similarity."""
    import torch

    corpus = torch.from_numpy(corpus)
    for start in range(0, len(queries), SCORE_BATCH):
        yield start, model.similarity(torch.from_numpy(queries[start:start + SCORE_BATCH]), corpus).numpy()


def roundtrip_ranks(model, index: SplitIndex, vectors: Vectors):
    """Per valid row: 1 + the number of the split's chunks (by chunk_id) that score strictly above its own."""
    import numpy as np

    ranks = np.zeros(len(index.row_query), dtype=np.int64)
    for start, scores in scores_in_batches(model, vectors.queries[index.row_query], vectors.corpus):
        rows = np.arange(len(scores))
        own = scores[rows, index.row_text[start:start + len(scores)]]
        ranks[start:start + len(scores)] = 1 + (scores > own[:, None]).astype(np.int64) @ index.chunks_per_text
    return ranks


def margin_removed(model, index: SplitIndex, vectors: Vectors, settings: MineNegativesSettings):
    """Per distinct query: how many of its `mining_range` closest non-positive chunks score above the margin.

    The threshold is mine_hard_negatives' own: the lowest positive score of the query minus `mining_margin` times
    its magnitude; the positives are the chunks of every valid row with that query.
    """
    import numpy as np

    pairs = np.unique(np.stack([index.row_query, index.row_text], axis=1), axis=0)
    removed = np.zeros(len(index.queries), dtype=np.int64)
    depth = min(settings.mining_range, len(index.corpus))
    for start, scores in scores_in_batches(model, vectors.queries, vectors.corpus):
        mine = pairs[(pairs[:, 0] >= start) & (pairs[:, 0] < start + len(scores))]
        rows, texts = mine[:, 0] - start, mine[:, 1]
        lowest = np.full(len(scores), np.inf, dtype=np.float32)
        np.minimum.at(lowest, rows, scores[rows, texts])
        threshold = lowest - np.abs(lowest) * settings.mining_margin
        scores[rows, texts] = -np.inf
        closest = -np.partition(-scores, depth - 1, axis=1)[:, :depth]
        removed[start:start + len(scores)] = (closest > threshold[:, None]).sum(axis=1)
    return removed


def check_scores(model, index: SplitIndex, vectors: Vectors, scored: list) -> None:
    """The cached vectors must reproduce the miner's own scores, or margin_removed would count the wrong thing."""
    import numpy as np
    import torch

    if not scored:
        return
    query_index = {text: i for i, text in enumerate(index.queries)}
    text_index = {text: i for i, text in enumerate(index.corpus)}
    queries = vectors.queries[[query_index[query] for query, _, _ in scored]]
    negatives = vectors.corpus[[text_index[negative] for _, negative, _ in scored]]
    ours = model.similarity_pairwise(torch.from_numpy(queries), torch.from_numpy(negatives)).numpy()
    gap = float(np.max(np.abs(ours - np.array([score for _, _, score in scored], dtype=np.float32))))
    if gap > 1e-2:
        raise StageError(f"The cached embeddings do not match mine_hard_negatives' scores (gap {gap:.4f}); this "
                         "sentence-transformers version orders its cache differently from 6.2.")


def near_duplicates(index: SplitIndex, vectors: Vectors, candidates, threshold: float):
    """Per valid row: True when it is a candidate whose positive has cosine >= threshold with an earlier kept
    (candidate, not itself a duplicate) positive of the same chunk."""
    import numpy as np

    duplicate = np.zeros(len(index.row_query), dtype=bool)
    kept: dict[Any, list[int]] = {}
    for row, (query, chunk) in enumerate(zip(index.row_query, index.row_chunk)):
        if not candidates[row]:
            continue
        earlier = kept.setdefault(chunk, [])
        if earlier and float(np.max(vectors.queries[earlier] @ vectors.queries[query])) >= threshold - COSINE_TOLERANCE:
            duplicate[row] = True
        else:
            earlier.append(query)
    return duplicate


def mark_split(frame, settings: MineNegativesSettings, base, miner, batch_size: int):
    """The split with the contract columns added (components.common), and its statistics."""
    import numpy as np
    import pandas as pd

    frame = frame.reset_index(drop=True)
    index = index_split(frame)
    rows = len(index.row_query)
    ranks, removed_per_query = np.zeros(rows, dtype=np.int64), np.zeros(len(index.queries), dtype=np.int64)
    negatives: dict[tuple[str, str], list[str]] = {}
    if rows:
        negatives, mined_vectors, scored = mine(miner, index, settings, batch_size)
        check_scores(miner, index, mined_vectors, scored)
        removed_per_query = margin_removed(miner, index, mined_vectors, settings)
        base_vectors = mined_vectors if miner is base else encode(base, index, batch_size)
        ranks = roundtrip_ranks(base, index, base_vectors)
    passed = (ranks <= settings.roundtrip_k) if settings.roundtrip_k else np.ones(rows, dtype=bool)
    duplicate = near_duplicates(index, base_vectors, passed, settings.near_duplicate_threshold) if rows else passed
    status = [KEPT if ok and not dup else (NEAR_DUPLICATE if ok else ROUNDTRIP_DROPPED.format(rank=rank))
              for ok, dup, rank in zip(passed, duplicate, ranks)]
    texts = [negatives.get((index.queries[q], index.corpus[t]), []) for q, t in zip(index.row_query, index.row_text)]

    out = frame.copy()
    out[ROUNDTRIP_RANK] = pd.array([pd.NA] * len(frame), dtype="Int64")
    out.loc[index.valid, ROUNDTRIP_RANK] = ranks
    out[FILTER_STATUS] = FAILED
    out.loc[index.valid, FILTER_STATUS] = status
    valid_rows = np.flatnonzero(index.valid)
    mined = {row: found for row, found in zip(valid_rows, texts)}
    out[HARD_NEGATIVES] = [list(mined.get(row, [])) for row in range(len(frame))]
    out[HARD_NEGATIVE_IDS] = [[index.chunk_of_text[text] for text in found] for found in out[HARD_NEGATIVES]]
    out[MARGIN_REMOVED] = 0
    out.loc[index.valid, MARGIN_REMOVED] = removed_per_query[index.row_query]
    out[MARGIN_REMOVED] = out[MARGIN_REMOVED].astype("int64")
    return out, split_stats(out, index, settings, ranks, passed, duplicate, texts)


def split_stats(frame, index: SplitIndex, settings: MineNegativesSettings, ranks, passed, duplicate,
                texts) -> dict[str, Any]:
    """What each filter kept and dropped, the round-trip ranks and what the mining found, for one split."""
    import numpy as np

    found = np.array([len(negatives) for negatives in texts], dtype=np.int64)
    rows = len(ranks)
    return {
        "rows": len(frame),
        "chunks": int(index.chunks_per_text.sum()),
        "valid_rows": rows,
        "distinct_queries": len(index.queries),
        "filters": {
            "generation_failed": {"dropped": int(len(frame) - rows)},
            "roundtrip": {"checked": rows, "kept": int(passed.sum()), "dropped": int(rows - passed.sum()),
                          "k": settings.roundtrip_k},
            "near_duplicate": {"checked": int(passed.sum()), "dropped": int(duplicate.sum()),
                               "threshold": settings.near_duplicate_threshold},
            "kept": int((frame[FILTER_STATUS] == KEPT).sum()),
        },
        "roundtrip_rank": {
            "median": float(np.median(ranks)) if rows else None,
            "share_rank_1": float(np.mean(ranks == 1)) if rows else None,
            "share_within_k": float(np.mean(ranks <= settings.roundtrip_k)) if rows and settings.roundtrip_k else None,
        },
        "mining": {
            "rows_mined": rows,
            "negatives": int(found.sum()),
            "rows_with_fewer_negatives": int((found < settings.num_hard_negatives).sum()),
            "rows_without_negatives": int((found == 0).sum()),
            "margin_removed": int(frame[MARGIN_REMOVED].sum()),
        },
    }


def check_settings(settings: MineNegativesSettings) -> None:
    """Refuse settings that cannot work together (each is range-checked on its own already)."""
    if settings.num_hard_negatives > settings.mining_range:
        raise StageError(f"num_hard_negatives ({settings.num_hard_negatives}) must not exceed mining_range "
                         f"({settings.mining_range}): the negatives are picked among that many closest chunks.")


def mine_negatives(
    scored_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    embedding_model: str,
    settings: MineNegativesSettings = MineNegativesSettings(),
    device: str = "auto",
    batch_size: int = 64,
) -> dict[str, Any]:
    """Filter and mine both splits of embed_score's output; write them and stats.json (embed_score's statistics
    carried forward, this stage's under "mine_negatives"); return this stage's statistics."""
    check_settings(settings)
    frames = read_splits(scored_dir)
    _, base_label = resolve_embedding_model(embedding_model)
    miner_name = settings.miner_model or embedding_model
    miner_path, miner_label = resolve_embedding_model(miner_name)
    base = load_model(embedding_model, device)
    # The same model mines and filters: its vectors from the mining serve the round-trip too (encoded once).
    miner = base if miner_path == resolve_embedding_model(embedding_model)[0] else load_model(miner_name, device)
    marked, per_split = {}, {}
    for split, frame in frames.items():
        marked[split], per_split[split] = mark_split(frame, settings, base, miner, batch_size)
        log.info("%s: %s", split, per_split[split])
    write_splits(marked, output_dir)
    stats = {"embedding_model": base_label, "miner_model": miner_label, "device": str(base.device),
             "settings": asdict(settings), "splits": per_split}
    upstream = Path(scored_dir) / "stats.json"
    write_json(Path(output_dir) / "stats.json",
               {**(read_json(upstream) if upstream.exists() else {}), "mine_negatives": stats})
    return stats


@stage_component("mine_negatives")
def mine_negatives_component(scored: Input[Dataset], embedding_model: str, miner_model: str, num_hard_negatives: int,
                             mining_range: int, mining_margin: float, roundtrip_k: int,
                             near_duplicate_threshold: float, mined: Output[Dataset]):
    """Round-trip and near-duplicate filters, and hard negatives mined from each split's own chunks."""
    from components.mine_negatives import MineNegativesSettings, mine_negatives
    from components.settings import from_arguments

    settings = from_arguments(MineNegativesSettings, locals())
    stats = mine_negatives(scored.path, mined.path, embedding_model, settings)
    mined.metadata.update({"miner_model": stats["miner_model"], **{
        f"{split}_kept": values["filters"]["kept"] for split, values in stats["splits"].items()}})
