"""The `shards` fan-out (d2e/fanout.py, components/shards.py): the split of the chunks, the merge's order, the
compiled graph of both targets, and a real kfp.local run whose merged output with 2 shards equals what the
stages write unsharded."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from components.common import ANCHOR_VECTOR, CHUNK_ID, EMBEDDED_EMBEDDING_MODEL, SPLITS, read_splits
from components.sharding import shard_of, shard_rows
from components.shards import merge_rows
from d2e.fanout import run_fan_out_locally
from d2e.targets import TARGETS
from pipeline import compile_pipeline
from tests.conftest import PROJECT_ROOT, write_chunk_folder
from tests.support.servers import FaultyOpenAIServer


def test_every_chunk_goes_to_exactly_one_shard_the_same_on_every_call():
    frame = pd.DataFrame({CHUNK_ID: [f"chunk-{number}" for number in range(200)], "text": range(200)})
    parts = [shard_rows(frame, shard, 4) for shard in range(4)]
    assert sorted(id_ for part in parts for id_ in part[CHUNK_ID]) == sorted(frame[CHUNK_ID])
    assert all(len(part) > 20 for part in parts)  # a hash spreads them
    assert [shard_of(f"chunk-{number}", 4) for number in range(20)] == \
           [shard_of(f"chunk-{number}", 4) for number in range(20)]
    assert shard_rows(frame, 0, 1) is frame


def test_the_merge_restores_load_docs_order_and_keeps_a_chunks_rows_in_order(tmp_path):
    chunks = pd.DataFrame({CHUNK_ID: ["c", "a", "b"], "text": ["C", "A", "B"]})
    docs = write_chunk_folder(tmp_path / "docs", chunks, chunks.iloc[:1])
    rows = pd.DataFrame({CHUNK_ID: ["c", "c", "a", "a", "b", "b"], "query": range(6)})
    parts = [write_chunk_folder(tmp_path / f"part{shard}", shard_rows(rows, shard, 2), shard_rows(rows.iloc[:2],
                                                                                                 shard, 2))
             for shard in range(2)]
    merged = merge_rows(parts, docs)
    assert merged["train"]["query"].tolist() == [0, 1, 2, 3, 4, 5]
    assert merged["test"]["query"].tolist() == [0, 1]


@pytest.mark.parametrize("target", TARGETS)
def test_generate_and_embed_run_inside_one_parallel_for_and_are_merged(target, tmp_path):
    path = compile_pipeline(tmp_path / "pipeline.yaml", target)
    spec = next(yaml.safe_load_all(path.read_text()))
    tasks = spec["root"]["dag"]["tasks"]
    loop = next(task for name, task in tasks.items() if name.startswith("for-loop"))
    assert loop["parameterIterator"]["items"]["inputParameter"].endswith("shard-list-component-Output")
    body = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    assert set(body) == {"generate-queries-component", "embed-score-component"}
    assert body["generate-queries-component"]["inputs"]["parameters"]["shard"]["componentInputParameter"]
    # Every parameter a task inside the loop reads reaches the loop (KFP 2.17 forgets the accelerator's by itself).
    loop_inputs = set(spec["components"][loop["componentRef"]["name"]]["inputDefinitions"]["parameters"])
    for task in body.values():
        for value in task["inputs"]["parameters"].values():
            assert value.get("componentInputParameter", next(iter(loop_inputs))) in loop_inputs
    for merge, output in (("merge-triplets-component", "triplets"), ("merge-scored-component", "scored")):
        assert tasks[merge]["inputs"]["artifacts"]["parts"]["taskOutputArtifact"]["producerTask"] == \
            loop["taskInfo"]["name"]
        assert tasks[merge]["inputs"]["artifacts"]["docs"]["taskOutputArtifact"]["producerTask"] == \
            "load-docs-component"
    mined_from = tasks["mine-negatives-component"]["inputs"]["artifacts"]["scored"]["taskOutputArtifact"]
    assert mined_from == {"outputArtifactKey": "scored", "producerTask": "merge-scored-component"}
    assert spec["root"]["inputDefinitions"]["parameters"]["shards"]["defaultValue"] == 1


SETTINGS = dict(llm="openai:test-model", queries_per_chunk=2, llm_concurrency=4,
                llm_prices='{"test-model": [1.0, 2.0]}')


def run_locally(root: Path, chunks: Path, server: FaultyOpenAIServer, shards: int) -> dict[str, pd.DataFrame]:
    """One kfp.local run of load_docs and the fan-out; the merged scored rows per split."""
    merged = run_fan_out_locally(root, dataset=str(chunks), llm_base_url=server.base_url,
                                 llm_cache_uri=str(root / "llm-cache"), embedding_model=EMBEDDED_EMBEDDING_MODEL,
                                 shards=shards, **SETTINGS)
    return read_splits(merged)


def run_unsharded(root: Path, chunks: Path, server: FaultyOpenAIServer) -> dict[str, pd.DataFrame]:
    """The same stages called in this process, one after the other, without KFP: what `shards=1` computes."""
    from components.embed_score import embed_score
    from components.generate_queries import GenerationSettings, generate_queries
    from components.load_docs import load_docs
    from components.settings import build

    load_docs(str(chunks), root / "docs")
    settings = build(GenerationSettings, {**SETTINGS, "llm_base_url": server.base_url,
                                          "llm_cache_uri": str(root / "llm-cache")})
    generate_queries(root / "docs", root / "triplets", settings)
    embed_score(root / "triplets", root / "scored", EMBEDDED_EMBEDDING_MODEL)
    return read_splits(root / "scored")


@pytest.mark.slow
@pytest.mark.timeout(2400)  # eight kfp.local tasks: about a minute alone, far more on a shared machine
def test_two_shards_write_what_the_unsharded_stages_write_row_for_row(tmp_path, small_chunks, monkeypatch):
    # The reference is the stages called directly, not a `shards=1` pipeline run: the end-to-end test runs the
    # whole pipeline with one shard, and a second kfp.local run here would cost six more task start-ups.
    monkeypatch.setenv("PYTHONPATH", str(PROJECT_ROOT))
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-local")
    server = FaultyOpenAIServer().start()
    try:
        one = run_unsharded(tmp_path / "one", small_chunks, server)
        two = run_locally(tmp_path / "two", small_chunks, server, shards=2)
    finally:
        server.stop()
    shard_outputs = list((tmp_path / "two").glob("*/for-loop-*-iteration-*/generate-queries-component/triplets"))
    assert len(shard_outputs) == 2
    assert all(len(pd.read_parquet(folder / "train.parquet")) for folder in shard_outputs)  # both shards worked
    for split in SPLITS:
        assert len(one[split]) == 2 * len(pd.read_parquet(small_chunks / f"{split}.parquet"))
        assert list(two[split].columns) == list(one[split].columns)
        assert two[split][CHUNK_ID].tolist() == one[split][CHUNK_ID].tolist()
        floats = [column for column in one[split].columns if one[split][column].dtype.kind == "f"]
        exact = [column for column in one[split].columns if column not in floats and column != ANCHOR_VECTOR]
        pd.testing.assert_frame_equal(two[split][exact], one[split][exact])
        # The same texts encoded in other batches: equal up to float rounding.
        pd.testing.assert_frame_equal(two[split][floats], one[split][floats], rtol=1e-5)
        np.testing.assert_allclose(np.stack(two[split][ANCHOR_VECTOR]), np.stack(one[split][ANCHOR_VECTOR]),
                                   atol=1e-5)


def test_print_is_given_back_when_overlapping_iterations_swapped_it():
    import builtins

    from kfp.local import logging_utils

    from d2e.console import print_restored

    original = builtins.print
    # What kfp.local does around each ParallelFor iteration, two overlapping in threads: each saves the print it finds
    # and puts it back, so when the first to start is the first to end, the second leaves its indenting print behind.
    first, second = logging_utils.indented_print(), logging_utils.indented_print()
    with print_restored():
        first.__enter__()
        second.__enter__()
        first.__exit__(None, None, None)
        second.__exit__(None, None, None)
        assert builtins.print is not original
    assert builtins.print is original
