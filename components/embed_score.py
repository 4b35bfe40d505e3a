"""The embed_score stage: embed anchor, positive and negative once each and score the triplets.

The model is loaded once; every distinct text is encoded once (anchors are not encoded twice), with
normalised embeddings, so cosine similarity is a dot product. CUDA in half precision when present.
"""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    get_logger,
    is_text,
    load_model,
    read_splits,
    resolve_embedding_model,
    stage_component,
    write_json,
    write_splits,
)
from components.settings import setting

log = get_logger("embed_score")


@dataclass(frozen=True)
class EmbedScoreSettings:
    """The base embedding model (also what finetune starts from and evaluate compares against)."""

    embedding_model: str = setting(CLUSTER_EMBEDDING_MODEL, "local path, Hub id, or the embedded default "
                                   f"{EMBEDDED_EMBEDDING_MODEL}", local=EMBEDDED_EMBEDDING_MODEL)
    embedding_batch_size: int = setting(64, "texts per encoding batch", minimum=1)


def embed_texts(model, texts: list[str], batch_size: int = 64):
    """Encode distinct texts once; return (index by text, normalised float32 matrix)."""
    import numpy as np

    unique = list(dict.fromkeys(texts))
    if not unique:
        return {}, np.zeros((0, model.get_embedding_dimension()), dtype=np.float32)
    log.info("encoding %d distinct texts", len(unique))
    vectors = model.encode(unique, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                           show_progress_bar=False)
    return {text: i for i, text in enumerate(unique)}, vectors.astype(np.float32)


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
    frame[ANCHOR_VECTOR] = [vectors[i].tolist() for i in anchors]
    anchor_texts = list(frame[ANCHOR])
    encoded = model.tokenizer(anchor_texts, add_special_tokens=True)["input_ids"] if len(frame) else []
    counts = [len(ids) for ids in encoded]
    frame["token_count"] = np.array(counts, dtype=np.int64)
    frame["exceeds_model_window"] = frame["token_count"] > model.max_seq_length
    return frame


def embed_score(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    embedding_model: str,
    device: str = "auto",
    batch_size: int = 64,
) -> dict[str, Any]:
    """Embed and score both splits; write them and stats.json."""

    frames = read_splits(input_dir)
    _, model_label = resolve_embedding_model(embedding_model)
    model = load_model(embedding_model, device)
    texts = [text for frame in frames.values() for column in (ANCHOR, POSITIVE, NEGATIVE)
             for text in frame[column] if is_text(text)]
    index, vectors = embed_texts(model, texts, batch_size)
    scored = {split: score_frame(frame, index, vectors, model) for split, frame in frames.items()}
    for frame in scored.values():
        frame["embedding_model"] = model_label
    write_splits(scored, output_dir)
    stats: dict[str, Any] = {
        "embedding_model": model_label,
        "dimension": int(model.get_embedding_dimension()),
        "max_seq_length": int(model.max_seq_length),
        "device": str(model.device),
        "distinct_texts": len(index),
        "splits": {},
    }
    for split, frame in scored.items():
        stats["splits"][split] = split_stats(frame)
    write_json(Path(output_dir) / "stats.json", stats)
    log.info("scored %s rows with %s on %s (dimension %d, %d distinct texts)",
             {split: len(frame) for split, frame in scored.items()}, model_label, stats["device"], stats["dimension"],
             len(index))
    return stats


def split_stats(frame: Any) -> dict[str, Any]:
    """A scored split's statistics: rows, rows past the model's window, mean similarities, positive closer."""
    import numpy as np

    stats: dict[str, Any] = {"rows": int(len(frame)), "exceeds_model_window": int(frame["exceeds_model_window"].sum())}
    for column in (SIM_POS_NEG, SIM_ANCHOR_POS, SIM_ANCHOR_NEG):
        values = frame[column].dropna().to_numpy()
        stats[column] = {"mean": float(values.mean()) if len(values) else None, "count": int(len(values))}
    if len(frame):
        both = frame[[SIM_ANCHOR_POS, SIM_ANCHOR_NEG]].dropna()
        closer = both[SIM_ANCHOR_POS] > both[SIM_ANCHOR_NEG]
        stats["positive_closer_than_negative"] = float(np.mean(closer)) if len(both) else None
    return stats


@stage_component("embed_score")
def embed_score_component(triplets: Input[Dataset], embedding_model: str, embedding_batch_size: int,
                          scored: Output[Dataset]):
    """Embed anchor/positive/negative with the base model and add similarities and the anchor vector."""
    from components.embed_score import EmbedScoreSettings, embed_score
    from components.settings import from_arguments

    settings = from_arguments(EmbedScoreSettings, locals())
    stats = embed_score(triplets.path, scored.path, settings.embedding_model, batch_size=settings.embedding_batch_size)
    scored.metadata.update({"embedding_model": stats["embedding_model"], "dimension": stats["dimension"],
                            "device": stats["device"]})
