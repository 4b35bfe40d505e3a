"""finetune: valid rows only, a real (tiny) training run that yields a loadable Matryoshka model, fixed seeds."""

import json

import numpy as np
import pandas as pd
import pytest

from components.common import StageError, matryoshka_dims, resolve_embedding_model
from components.finetune import TRAINING_STATS, finetune, training_pairs

QUERY_PROMPT = "query: "


def test_matryoshka_dims_always_include_the_full_dimension():
    assert matryoshka_dims(384) == [384, 256, 128, 64]
    assert matryoshka_dims(1024) == [1024, 768, 512, 256, 128, 64]
    assert matryoshka_dims(300) == [300, 256, 128, 64]
    assert matryoshka_dims(32) == [32]


def triplet_frame(kubeflow_docs, rows: int, invalid: int) -> pd.DataFrame:
    """`rows` valid triplets from real chunks (short, to keep CPU time small), then `invalid` broken ones."""
    texts = [text[:240] for text in pd.read_parquet(kubeflow_docs / "train.parquet")["page_content"].iloc[:rows + invalid]]
    frame = pd.DataFrame({
        "anchor": texts,
        "positive": [f"what does this say: {' '.join(t.split()[2:9])}?" for t in texts],
        "negative": [f"how do I bake bread number {i}?" for i in range(len(texts))],
        "generation_status": "generated",
        "chunk_id": [f"c{i}" for i in range(len(texts))],
    })
    # The ways a row can be unusable: generation failed, or a field is empty, whitespace or missing.
    broken = [("failed", "a query", "a negative"), ("generated", "", "a negative"), ("generated", "a query", "  "),
              ("cached", None, "a negative"), ("generated", "a query", None)]
    for offset in range(invalid):
        status, positive, negative = broken[offset % len(broken)]
        index = rows + offset
        frame.loc[index, ["generation_status", "positive", "negative"]] = [status, positive, negative]
    return frame


def test_rows_with_failed_or_empty_fields_never_reach_training(kubeflow_docs):
    frame = triplet_frame(kubeflow_docs, rows=6, invalid=5)
    with_negatives = training_pairs(frame, use_hard_negatives=True)
    assert with_negatives.column_names == ["query", "document", "hard_negative"]
    assert with_negatives["query"] == list(frame["positive"][:6])
    assert with_negatives["document"] == list(frame["anchor"][:6])
    without = training_pairs(frame, use_hard_negatives=False)
    assert without.column_names == ["query", "document"] and len(without) == 6


@pytest.fixture(scope="module")
def prompted_base(tmp_path_factory):
    """The embedded MiniLM with a query prompt, as arctic-embed has, so the prompt path is exercised."""
    from sentence_transformers import SentenceTransformer

    path, _ = resolve_embedding_model("embedded:all-MiniLM-L6-v2")
    model = SentenceTransformer(path, device="cpu", prompts={"query": QUERY_PROMPT})
    folder = tmp_path_factory.mktemp("prompted-base")
    model.save(str(folder))
    return folder


@pytest.fixture(scope="module")
def scored(tmp_path_factory, kubeflow_docs):
    folder = tmp_path_factory.mktemp("scored")
    triplet_frame(kubeflow_docs, rows=24, invalid=5).to_parquet(folder / "train.parquet", index=False)
    triplet_frame(kubeflow_docs, rows=4, invalid=0).to_parquet(folder / "test.parquet", index=False)
    return folder


TINY = {"epochs": 1, "batch_size": 8, "learning_rate": 5e-5, "warmup_ratio": 0.1, "seed": 7}


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, scored, prompted_base):
    folder = tmp_path_factory.mktemp("tuned")
    stats = finetune(scored, folder, str(prompted_base), use_hard_negatives=True, **TINY)
    return folder, stats


def test_finetune_yields_a_loadable_model_with_the_full_and_matryoshka_dimensions(tuned, prompted_base):
    from sentence_transformers import SentenceTransformer

    folder, stats = tuned
    assert stats["valid_train_rows"] == 24 and stats["train_rows"] == 29
    assert stats["optimizer_steps"] == 3  # ceil(24 / 8) batches, one epoch
    assert stats["matryoshka_dims"] == [384, 256, 128, 64] and stats["dimension"] == 384
    assert stats["query_prompt"] == QUERY_PROMPT and stats["precision"] == "fp32"
    assert json.loads((folder / TRAINING_STATS).read_text())["seed"] == 7
    model = SentenceTransformer(str(folder), device="cpu")
    assert model.prompts["query"] == QUERY_PROMPT  # the finetuned model keeps the base model's query prompt
    vectors = model.encode(["how do I run a pipeline?"], convert_to_numpy=True)
    assert vectors.shape == (1, 384)
    base = SentenceTransformer(str(prompted_base), device="cpu").encode(["how do I run a pipeline?"], convert_to_numpy=True)
    assert not np.allclose(vectors, base)  # training changed the weights
    truncated = SentenceTransformer(str(folder), device="cpu", truncate_dim=64).encode(["x"], convert_to_numpy=True)
    assert truncated.shape == (1, 64)


@pytest.mark.slow
def test_same_seed_same_model(tmp_path, tuned, scored, prompted_base):
    from sentence_transformers import SentenceTransformer

    again = finetune(scored, tmp_path / "again", str(prompted_base), use_hard_negatives=True, **TINY)
    assert again["loss_history"] == tuned[1]["loss_history"]
    texts = ["how do I run a pipeline?", "Katib tunes hyperparameters."]
    first = SentenceTransformer(str(tuned[0]), device="cpu").encode(texts, convert_to_numpy=True)
    second = SentenceTransformer(str(tmp_path / "again"), device="cpu").encode(texts, convert_to_numpy=True)
    assert np.array_equal(first, second)


def test_too_few_valid_rows_or_bad_settings_stop_with_the_reason(tmp_path, kubeflow_docs, prompted_base):
    folder = tmp_path / "scored"
    folder.mkdir()
    triplet_frame(kubeflow_docs, rows=1, invalid=3).to_parquet(folder / "train.parquet", index=False)
    triplet_frame(kubeflow_docs, rows=1, invalid=0).to_parquet(folder / "test.parquet", index=False)
    with pytest.raises(StageError, match="1 valid rows \\(of 4"):
        finetune(folder, tmp_path / "model", str(prompted_base))
    with pytest.raises(StageError, match="batch_size=1"):
        finetune(folder, tmp_path / "model", str(prompted_base), batch_size=1)
