"""Shards: generate_queries and embed_score fanned out over `shards` parallel tasks, and their outputs merged.

The pipeline lists the shards (`shard_list_component`), runs generate_queries then embed_score once per shard inside
one `dsl.ParallelFor` (shard k keeps the chunks whose chunk_id hashes to k, so a chunk and all its queries stay in one
shard), and gathers every shard's output with `dsl.Collected` into `merge_triplets_component` and
`merge_scored_component`. A merge puts the rows back in load_docs' order, so N shards write what one writes, row for
row (the same LLM cache gives the same answers), and recomputes the stage's statistics over the merged rows.
"""

import os
from pathlib import Path
from typing import Any, List

from kfp.dsl import Dataset, Input, Output

from components.common import CHUNK_ID, read_json, read_splits, stage_component, write_json, write_splits


def merge_rows(part_dirs: list[str | os.PathLike], docs_dir: str | os.PathLike) -> dict[str, Any]:
    """Every shard's rows per split, in load_docs' chunk order (a chunk's own rows keep their order)."""
    import pandas as pd

    docs = read_splits(docs_dir)
    parts = [read_splits(part) for part in part_dirs]
    merged = {}
    for split, chunks in docs.items():
        position = {chunk_id: number for number, chunk_id in enumerate(chunks[CHUNK_ID])}
        frames = [part[split] for part in parts if split in part]
        frame = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
        order = frame[CHUNK_ID].map(position).sort_values(kind="stable").index
        merged[split] = frame.loc[order].reset_index(drop=True)
    return merged


def merge_triplets(part_dirs: list[str | os.PathLike], docs_dir: str | os.PathLike,
                   output_dir: str | os.PathLike) -> dict[str, Any]:
    """Merge generate_queries' shards; stats.json is summarised over all rows, the cost summed over the shards."""
    from components.generate_queries import parse_llm_spec, summarise

    frames = merge_rows(part_dirs, docs_dir)
    shard_stats = [read_json(Path(part) / "stats.json") for part in part_dirs]
    first = shard_stats[0]
    stats = summarise(frames, parse_llm_spec(first["settings"]["llm"]))
    costs = [part.get("estimated_cost_usd") for part in shard_stats]
    stats.update(price_per_million_tokens=first["price_per_million_tokens"],
                 estimated_cost_usd=None if None in costs else sum(costs), settings=first["settings"],
                 shards=len(part_dirs))
    limits = [part["llm_concurrency_limit"] for part in shard_stats if "llm_concurrency_limit" in part]
    if limits:
        stats["llm_concurrency_limit"] = limits[0] if len(limits) == 1 else limits
    return _write(frames, stats, output_dir)


def merge_scored(part_dirs: list[str | os.PathLike], docs_dir: str | os.PathLike,
                 output_dir: str | os.PathLike) -> dict[str, Any]:
    """Merge embed_score's shards; per-split statistics are recomputed over all rows."""
    from components.embed_score import split_stats

    frames = merge_rows(part_dirs, docs_dir)
    shard_stats = [read_json(Path(part) / "stats.json") for part in part_dirs]
    stats = {**shard_stats[0], "encoded_texts": sum(part["encoded_texts"] for part in shard_stats),
             "splits": {split: split_stats(frame) for split, frame in frames.items()}, "shards": len(part_dirs)}
    return _write(frames, stats, output_dir)


def _write(frames: dict[str, Any], stats: dict[str, Any], output_dir: str | os.PathLike) -> dict[str, Any]:
    write_splits(frames, output_dir)
    write_json(Path(output_dir) / "stats.json", stats)
    return stats


@stage_component("load_docs")
def shard_list_component(shards: int) -> List[int]:
    """The shard numbers 0..shards-1, the items of the pipeline's ParallelFor."""
    return list(range(max(1, shards)))


@stage_component("generate_queries")
def merge_triplets_component(parts: Input[List[Dataset]], docs: Input[Dataset], triplets: Output[Dataset]):
    """Gather every shard's generated queries into one dataset, in load_docs' order."""
    from components.shards import merge_triplets

    stats = merge_triplets([part.path for part in parts], docs.path, triplets.path)
    triplets.metadata.update({"rows": stats["rows"], "failed": stats["failed"], "llm": stats["llm"],
                              "shards": len(parts)})


@stage_component("embed_score")
def merge_scored_component(parts: Input[List[Dataset]], docs: Input[Dataset], scored: Output[Dataset]):
    """Gather every shard's scored triplets into one dataset, in load_docs' order."""
    from components.shards import merge_scored

    stats = merge_scored([part.path for part in parts], docs.path, scored.path)
    scored.metadata.update({"embedding_model": stats["embedding_model"], "dimension": stats["dimension"],
                            "device": stats["device"], "shards": len(parts)})
