"""finetune: training rows only (valid and kept by the filters), the three negatives modes (mined n-tuples with
seeded fill-ins), a real (tiny) training run per mode that yields a loadable Matryoshka model, fixed seeds, and a
diverged run that fails the stage."""

import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from components.common import StageError, matryoshka_dims, resolve_embedding_model, training_rows, valid_pairs
from components.finetune import TRAINING_STATS, build_loss, check_finite, column_prompts, finetune, train
from components.finetune_data import (
    _as_list,
    load_training_data,
    negative_mode,
    temporary_training_data,
    training_dataset,
)

QUERY_PROMPT = "query: "


def test_matryoshka_dims_always_include_the_full_dimension():
    assert matryoshka_dims(384) == [384, 256, 128, 64]
    assert matryoshka_dims(1024) == [1024, 768, 512, 256, 128, 64]
    assert matryoshka_dims(300) == [300, 256, 128, 64]
    assert matryoshka_dims(32) == [32]


def triplet_frame(kubeflow_docs, rows: int, invalid: int = 0, dropped: int = 0, negatives: int = 2) -> pd.DataFrame:
    """`rows` kept triplets from real chunks (short, to keep CPU time small), then `invalid` broken ones, then
    `dropped` valid rows that a filter of mine_negatives dropped. Row i's mined negatives are the next chunks, fewer
    of them for every third row (as when the margin removed candidates)."""
    total = rows + invalid + dropped
    texts = [text[:240] for text in pd.read_parquet(kubeflow_docs / "train.parquet")["page_content"].iloc[:total]]
    frame = pd.DataFrame({
        "anchor": texts,
        "positive": [f"what does this say: {' '.join(t.split()[2:9])}?" for t in texts],
        "negative": [f"how do I bake bread number {i}?" for i in range(total)],
        "generation_status": "generated",
        "chunk_id": [f"c{i}" for i in range(total)],
        "filter_status": "kept",
        "hard_negatives": [[texts[(i + j) % total] for j in range(1, negatives + 1 - (i % 3 == 0))]
                           for i in range(total)],
    })
    # The ways a row can be unusable: generation failed, or a field is empty, whitespace or missing.
    broken = [("failed", "a query", "a negative"), ("generated", "", "a negative"), ("generated", "a query", "  "),
              ("cached", None, "a negative"), ("generated", "a query", None)]
    for offset in range(invalid):
        status, positive, negative = broken[offset % len(broken)]
        frame.loc[rows + offset, ["generation_status", "positive", "negative"]] = [status, positive, negative]
    for offset in range(dropped):
        frame.loc[rows + invalid + offset, "filter_status"] = ("dropped: roundtrip rank 12", "dropped: near-duplicate",
                                                               "dropped: generation failed")[offset % 3]
    return frame


@pytest.mark.parametrize("mode", ["mined", "llm", "in-batch"])
def test_failed_empty_and_filtered_rows_never_reach_training(kubeflow_docs, mode):
    frame = triplet_frame(kubeflow_docs, rows=6, invalid=5, dropped=3)
    dataset, counts = training_dataset(frame, mode, seed=1)
    assert dataset["query"] == list(frame["positive"][:6])
    assert dataset["document"] == list(frame["anchor"][:6])
    assert counts["training_rows"] == 6 and counts["valid_train_rows"] == 9 and counts["train_rows"] == 14
    extra = {"mined": ["negative_1", "negative_2"], "llm": ["hard_negative"], "in-batch": []}[mode]
    assert dataset.column_names == ["query", "document", *extra]
    if mode == "llm":
        assert dataset["hard_negative"] == list(frame["negative"][:6])


def test_a_frame_from_before_mine_negatives_trains_on_every_valid_row(kubeflow_docs):
    frame = triplet_frame(kubeflow_docs, rows=4, invalid=2).drop(columns=["filter_status", "hard_negatives"])
    dataset, _ = training_dataset(frame, "in-batch")
    assert len(dataset) == 4
    with pytest.raises(StageError, match="needs the 'hard_negatives' column.*mine_negatives"):
        training_dataset(frame, "mined")


def test_mined_mode_builds_full_n_tuples_and_fills_with_other_chunks_of_the_split(kubeflow_docs):
    frame = triplet_frame(kubeflow_docs, rows=30, negatives=3)
    dataset, counts = training_dataset(frame, "mined", seed=5)
    assert dataset.column_names == ["query", "document", "negative_1", "negative_2", "negative_3"]
    assert counts["hard_negative_columns"] == 3 and counts["rows_filled"] == 10 and counts["negatives_filled"] == 10
    chunks = set(frame["anchor"])
    for index, row in enumerate(dataset):
        negatives = [row["negative_1"], row["negative_2"], row["negative_3"]]
        mined = list(frame["hard_negatives"][index])
        assert negatives[:len(mined)] == mined  # the mined ones first, in their order
        assert row["document"] not in negatives  # never the row's own chunk
        assert len(set(negatives)) == 3 and set(negatives) <= chunks  # distinct chunks of this split
    again, _ = training_dataset(frame, "mined", seed=5)
    assert again.to_dict() == dataset.to_dict()  # seeded: the same tuples on a rerun
    other, _ = training_dataset(frame, "mined", seed=6)
    assert other.to_dict() != dataset.to_dict()


def test_fill_ins_never_take_the_own_chunk_even_when_the_split_is_tiny(kubeflow_docs):
    frame = triplet_frame(kubeflow_docs, rows=3, negatives=2)
    frame["hard_negatives"] = [[frame["anchor"][1], frame["anchor"][2]], [], []]
    dataset, counts = training_dataset(frame, "mined", seed=0)
    assert counts["rows_filled"] == 2 and counts["negatives_filled"] == 4
    for row in dataset:
        assert row["document"] not in (row["negative_1"], row["negative_2"])
    frame = frame.iloc[:1].copy()
    frame["hard_negatives"] = [[]]
    dataset, counts = training_dataset(frame, "mined")
    assert dataset.column_names == ["query", "document"] and counts["hard_negative_columns"] == 0  # none mined
    # One distinct chunk in the split: nothing but the own chunk could fill, so the stage says what to change.
    frame = pd.concat([frame, frame], ignore_index=True)
    frame["hard_negatives"] = [["a chunk of the split that no row has"], []]
    with pytest.raises(StageError, match="1 distinct chunks.*finetune_negatives='in-batch'"):
        training_dataset(frame, "mined")


def previous_training_columns(frame, negatives: str, seed: int) -> tuple[dict[str, list], dict[str, int]]:
    """The loss's columns and the counts as finetune built them before its dataset went to disk, kept here as the
    reference: the whole split in memory, each fill-in picked from a list of the pool without the excluded chunks."""
    rows = training_rows(frame)
    pool = list(dict.fromkeys(text for text in frame["anchor"] if isinstance(text, str)))
    columns = {"query": list(rows["positive"]), "document": list(rows["anchor"])}
    counts = {"train_rows": len(frame), "valid_train_rows": len(valid_pairs(frame)), "training_rows": len(rows),
              "hard_negative_columns": 0}
    if negatives == "llm":
        columns["hard_negative"] = list(rows["negative"])
        counts["hard_negative_columns"] = 1
    elif negatives == "mined":
        mined = [_as_list(value) for value in rows["hard_negatives"]]
        width = max((len(row) for row in mined), default=0)
        rng = np.random.default_rng(seed)
        filled_rows = filled = 0
        for row, own in zip(mined, rows["anchor"]):
            need = width - len(row)
            if need <= 0:
                continue
            excluded = {own, *row}
            allowed = [text for text in pool if text not in excluded]
            picks = rng.choice(len(allowed), size=need, replace=len(allowed) < need)
            row.extend(allowed[index] for index in picks)
            filled_rows, filled = filled_rows + 1, filled + need
        columns.update({f"negative_{i + 1}": [row[i] for row in mined] for i in range(width)})
        counts.update(hard_negative_columns=width, rows_filled=filled_rows, negatives_filled=filled)
    return columns, counts


def varied_split(kubeflow_docs) -> pd.DataFrame:
    """A scored train split with what preparation meets: two queries per chunk (adjacent rows), rows with 3, 2, 1 or
    no mined negatives (missing, too), a mined negative that is no row's chunk, failed, empty and dropped rows."""
    frame = triplet_frame(kubeflow_docs, rows=60, invalid=10, dropped=9, negatives=3)
    frame["anchor"] = [frame["anchor"][i - i % 2] for i in range(len(frame))]
    mined = [list(negatives) for negatives in frame["hard_negatives"]]
    for i in range(0, len(frame), 7):
        mined[i] = []
    for i in range(3, len(frame), 11):
        mined[i] = ["a chunk that no row of this split has", *mined[i][:1]]
    mined[5] = None
    frame["hard_negatives"] = mined
    frame["anchor-vector"] = [[0.25] * 4] * len(frame)
    return frame


@pytest.mark.parametrize("mode", ["mined", "llm", "in-batch"])
def test_the_prepared_dataset_on_disk_holds_the_rows_the_previous_in_memory_build_gave(tmp_path, kubeflow_docs,
                                                                                         monkeypatch, mode):
    """Rows, their order, the columns and their types, the seeded fill-ins and the counts are those of the
    previous code; the dataset is an Arrow file in a folder of the temp dir, which is gone after the block."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    varied_split(kubeflow_docs).to_parquet(tmp_path / "train.parquet", index=False)
    split = pd.read_parquet(tmp_path / "train.parquet")  # as the stage reads it: list cells as numpy arrays
    expected, expected_counts = previous_training_columns(split, mode, seed=11)
    if mode == "mined":  # the case this test is about: many rows filled, so the random picks must line up
        assert expected_counts["rows_filled"] >= 20 and expected_counts["hard_negative_columns"] == 3
    with temporary_training_data(tmp_path, mode, seed=11, batch_size=8, stream_rows=7) as (dataset, counts, _):
        files = [Path(entry["filename"]) for entry in dataset.cache_files]
        assert len(files) == 1 and files[0].parent.parent == scratch  # on disk, in the task's temp dir
        assert dataset.column_names == list(expected) and dataset.to_dict() == expected
        assert counts == expected_counts
        from datasets import Dataset

        assert dataset.features == Dataset.from_dict(expected).features  # all strings, as before
        in_memory, memory_counts = training_dataset(split, mode, seed=11)
        assert in_memory.cache_files == [] and in_memory.to_dict() == expected and memory_counts == expected_counts
    assert not files[0].parent.exists()


def test_the_temporary_dataset_is_removed_when_preparation_or_training_fails(tmp_path, kubeflow_docs, monkeypatch):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    frame = triplet_frame(kubeflow_docs, rows=4)
    frame.to_parquet(tmp_path / "train.parquet", index=False)
    with pytest.raises(RuntimeError, match="training failed"):
        with temporary_training_data(tmp_path, "mined", seed=0, batch_size=2) as (dataset, _, _):
            assert Path(dataset.cache_files[0]["filename"]).exists()
            raise RuntimeError("training failed")
    assert list(scratch.iterdir()) == []
    # Fill-ins that cannot be found fail while the file is being written: the partial file goes too.
    frame["anchor"] = frame["anchor"][0]
    frame["hard_negatives"] = [["a chunk that no row has"], [], [], []]
    frame.to_parquet(tmp_path / "train.parquet", index=False)
    with pytest.raises(StageError, match="1 distinct chunks"):
        with temporary_training_data(tmp_path, "mined", seed=0, batch_size=2, stream_rows=2):
            pass
    assert list(scratch.iterdir()) == []
    frame.head(0).to_parquet(tmp_path / "train.parquet", index=False)
    with pytest.raises(StageError, match="0 training rows"):
        with temporary_training_data(tmp_path, "in-batch", seed=0, batch_size=2):
            pass
    assert list(scratch.iterdir()) == []


def test_negatives_modes_and_the_deprecated_switch():
    assert negative_mode("mined") == "mined" and negative_mode("in-batch", False) == "in-batch"
    assert negative_mode("mined", True) == "llm"  # finetune_hard_negatives=true keeps its old meaning
    with pytest.raises(StageError, match="one of mined, in-batch, llm"):
        negative_mode("random")


@pytest.fixture(scope="module")
def prompted_base(tmp_path_factory):
    """The embedded MiniLM with a query prompt, as arctic-embed has, so the prompt path is exercised."""
    from sentence_transformers import SentenceTransformer

    path, _ = resolve_embedding_model("embedded:all-MiniLM-L6-v2")
    model = SentenceTransformer(path, device="cpu", prompts={"query": QUERY_PROMPT})
    folder = tmp_path_factory.mktemp("prompted-base")
    model.save(str(folder))
    return folder


def test_the_document_prompt_goes_on_the_document_and_every_negative_column(prompted_base):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(prompted_base), device="cpu", prompts={"query": "q: ", "document": "d: "})
    assert column_prompts(model, ["query", "document", "negative_1", "negative_2"]) == {
        "query": "q: ", "document": "d: ", "negative_1": "d: ", "negative_2": "d: "}
    assert column_prompts(SentenceTransformer(str(prompted_base), device="cpu"), ["query", "document"]) == {
        "query": QUERY_PROMPT}


@pytest.fixture(scope="module")
def scored(tmp_path_factory, kubeflow_docs):
    folder = tmp_path_factory.mktemp("scored")
    triplet_frame(kubeflow_docs, rows=16, invalid=5, dropped=4).to_parquet(folder / "train.parquet", index=False)
    triplet_frame(kubeflow_docs, rows=4).to_parquet(folder / "test.parquet", index=False)
    return folder


TINY = {"epochs": 1, "batch_size": 8, "learning_rate": 5e-5, "warmup_ratio": 0.1, "seed": 7}


@pytest.mark.parametrize("mode", ["mined", "llm", "in-batch"])
def test_training_data_read_in_small_batches_equals_the_whole_split(tmp_path, kubeflow_docs, mode):
    """finetune reads the scored train split a few rows at a time (only the columns it needs, never the vectors):
    the dataset and counts equal those built from the whole split in memory, mined fill-ins included."""
    frame = triplet_frame(kubeflow_docs, rows=16, invalid=5, dropped=4)
    frame["anchor-vector"] = [[0.5] * 4] * len(frame)
    frame.to_parquet(tmp_path / "train.parquet", index=False)
    whole, whole_counts = training_dataset(frame, mode, seed=3)
    streamed, counts, _ = load_training_data(tmp_path, mode, seed=3, batch_size=8, stream_rows=4)
    assert streamed.to_dict() == whole.to_dict() and counts == whole_counts
    assert counts["train_rows"] == 25 and counts["training_rows"] == 16


def test_an_empty_train_split_is_a_clear_error(tmp_path, kubeflow_docs):
    triplet_frame(kubeflow_docs, rows=2).head(0).to_parquet(tmp_path / "train.parquet", index=False)
    with pytest.raises(StageError, match="0 training rows"):
        load_training_data(tmp_path, "in-batch", seed=0, batch_size=8)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, scored, prompted_base):
    folder = tmp_path_factory.mktemp("tuned")
    stats = finetune(scored, folder, str(prompted_base), negatives="mined", **TINY)
    return folder, stats


def test_finetune_yields_a_loadable_model_with_the_full_and_matryoshka_dimensions(tuned, prompted_base):
    from sentence_transformers import SentenceTransformer

    folder, stats = tuned
    assert stats["training_rows"] == 16 and stats["valid_train_rows"] == 20 and stats["train_rows"] == 25
    assert stats["optimizer_steps"] == 2  # ceil(16 / 8) batches, one epoch: the dropped rows were not trained on
    assert stats["negatives"] == "mined" and stats["hard_negative_columns"] == 2
    assert stats["loss"] == "MatryoshkaLoss(MultipleNegativesRankingLoss)"  # on CPU; the cached loss on a GPU
    assert stats["matryoshka_dims"] == [384, 256, 128, 64] and stats["dimension"] == 384
    assert stats["query_prompt"] == QUERY_PROMPT and stats["precision"] == "fp32"
    assert all(np.isfinite(stats["loss_history"])) and len(stats["loss_history"]) == 2
    assert json.loads((folder / TRAINING_STATS).read_text())["seed"] == 7
    model = SentenceTransformer(str(folder), device="cpu")
    assert model.prompts["query"] == QUERY_PROMPT  # the finetuned model keeps the base model's query prompt
    vectors = model.encode(["how do I run a pipeline?"], convert_to_numpy=True)
    assert vectors.shape == (1, 384)
    base_model = SentenceTransformer(str(prompted_base), device="cpu")
    base = base_model.encode(["how do I run a pipeline?"], convert_to_numpy=True)
    assert not np.allclose(vectors, base)  # training changed the weights
    truncated = SentenceTransformer(str(folder), device="cpu", truncate_dim=64).encode(["x"], convert_to_numpy=True)
    assert truncated.shape == (1, 64)


@pytest.mark.parametrize("mode,columns", [("llm", 1), ("in-batch", 0)])
def test_the_other_negatives_modes_train_too(tmp_path, scored, prompted_base, mode, columns):
    stats = finetune(scored, tmp_path, str(prompted_base), negatives=mode, **{**TINY, "batch_size": 16})
    assert stats["negatives"] == mode and stats["hard_negative_columns"] == columns
    assert stats["optimizer_steps"] == 1 and (tmp_path / "model.safetensors").exists()


def test_the_gpu_loss_trains_mined_n_tuples_on_cpu_too(scored, prompted_base):
    """The cached loss a GPU run uses, inside MatryoshkaLoss, on mined n-tuples: one real optimizer step on CPU."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(prompted_base), device="cpu")
    dataset, _ = training_dataset(pd.read_parquet(scored / "train.parquet"), "mined", seed=7)
    loss = build_loss(model, [384, 64], cached=True, mini_batch_size=4)
    assert type(loss.loss).__name__ == "CachedMultipleNegativesRankingLoss"
    trained = train(model, dataset, loss, {**TINY, "batch_size": 16, "planned_steps": 1}, False, "fp32")
    assert trained["optimizer_steps"] == 1 and np.isfinite(trained["train_loss"])


@pytest.mark.slow
def test_same_seed_same_model(tmp_path, tuned, scored, prompted_base):
    from sentence_transformers import SentenceTransformer

    again = finetune(scored, tmp_path / "again", str(prompted_base), negatives="mined", **TINY)
    assert again["loss_history"] == tuned[1]["loss_history"]
    texts = ["how do I run a pipeline?", "Katib tunes hyperparameters."]
    first = SentenceTransformer(str(tuned[0]), device="cpu").encode(texts, convert_to_numpy=True)
    second = SentenceTransformer(str(tmp_path / "again"), device="cpu").encode(texts, convert_to_numpy=True)
    assert np.array_equal(first, second)


def test_non_finite_loss_or_weights_fail_with_the_advice_to_lower_the_learning_rate(prompted_base):
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(prompted_base), device="cpu")
    check_finite(model, [{"loss": 1.2}, {"learning_rate": 1e-5}], 1.1)  # a healthy run passes
    with pytest.raises(StageError, match="1 non-finite loss values.*Lower finetune_learning_rate"):
        check_finite(model, [{"loss": 1.2}, {"loss": float("nan")}], 1.1)
    with torch.no_grad():
        next(model.parameters()).fill_(float("inf"))
    with pytest.raises(StageError, match="non-finite weights in 1 tensors.*Lower finetune_learning_rate"):
        check_finite(model, [{"loss": 1.2}], 1.1)


def test_a_diverging_run_fails_the_stage_and_saves_no_model(tmp_path, scored, prompted_base):
    import torch
    from sentence_transformers import SentenceTransformer

    # A base whose attention weights are NaN: training on it yields a NaN loss, as a blown-up learning rate does.
    broken = SentenceTransformer(str(prompted_base), device="cpu")
    with torch.no_grad():
        for name, parameter in broken.named_parameters():
            if "attention.self.query.weight" in name:
                parameter.fill_(float("nan"))
    broken.save(str(tmp_path / "broken"))
    with pytest.raises(StageError, match="Finetuning diverged.*not saved.*Lower finetune_learning_rate"):
        finetune(scored, tmp_path / "model", str(tmp_path / "broken"), negatives="in-batch",
                 **{**TINY, "batch_size": 16})
    assert not (tmp_path / "model" / "model.safetensors").exists()


def test_too_few_training_rows_or_bad_settings_stop_with_the_reason(tmp_path, kubeflow_docs, prompted_base):
    folder = tmp_path / "scored"
    folder.mkdir()
    triplet_frame(kubeflow_docs, rows=1, invalid=2, dropped=1).to_parquet(folder / "train.parquet", index=False)
    triplet_frame(kubeflow_docs, rows=1).to_parquet(folder / "test.parquet", index=False)
    with pytest.raises(StageError, match="1 training rows \\(of 4.*dropped by mine_negatives"):
        finetune(folder, tmp_path / "model", str(prompted_base))
    with pytest.raises(StageError, match="batch_size=1"):
        finetune(folder, tmp_path / "model", str(prompted_base), batch_size=1)
