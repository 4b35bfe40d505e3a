"""mine_negatives: the round-trip and near-duplicate filters and the mined hard negatives.

Exact cases use a real SentenceTransformer built here: a StaticEmbedding over a one-word-per-text vocabulary whose
vectors are set by hand, so every cosine is known. Chunks are orthonormal axes, so a query's cosine with a chunk is
the coefficient written below. One more case runs the embedded all-MiniLM-L6-v2 on real sentences.
"""

import math

import numpy as np
import pandas as pd
import pytest
import yaml

from components.common import (
    EMBEDDED_EMBEDDING_MODEL,
    FILTER_STATUS,
    HARD_NEGATIVE_IDS,
    HARD_NEGATIVES,
    KEPT,
    MARGIN_REMOVED,
    ROUNDTRIP_RANK,
    STAGE_IMAGES,
    StageError,
    load_model,
    read_json,
    training_rows,
    write_json,
    write_splits,
)
from components.mine_negatives import MineNegativesSettings, mine_negatives
from components.settings import SettingError, build

CHUNKS = ("ca", "cb", "cc", "cd", "ce", "ta", "tb")  # train: ca..ce, test: ta, tb; each its own axis
# A query's cosine with each chunk (the rest of its unit length lies on an axis of its own).
QUERIES = {
    "qa": {"ca": 0.5, "cb": 0.6, "cc": 0.48, "cd": 0.3, "ce": 0.2, "ta": 0.1},
    "qa3": {"ca": 0.9, "cb": 0.1, "cc": 0.2, "cd": 0.15, "ce": 0.05},
    "qb": {"cb": 0.7, "ta": 0.6, "ca": 0.2, "cc": 0.1, "cd": 0.05},
    "qe": {"ce": 0.3, "ca": 0.5, "cb": 0.5, "cc": 0.4, "cd": 0.35},
    "qt": {"ta": 0.6, "tb": 0.3, "ca": 0.7},
}
NEAR = 0.98  # qa2 = 0.98 qa + the rest on its own axis: cosine 0.98 with qa, and 0.98 x qa's scores
SETTINGS = MineNegativesSettings(num_hard_negatives=3, mining_range=4, mining_margin=0.05, roundtrip_k=2,
                                 near_duplicate_threshold=0.95)


def unit(axis: int, size: int):
    vector = np.zeros(size)
    vector[axis] = 1.0
    return vector


def toy_vectors(queries=QUERIES) -> dict[str, np.ndarray]:
    words = [*CHUNKS, *queries, "qa2", "qp"]
    size = len(words) + 1
    vectors = {chunk: unit(i, size) for i, chunk in enumerate(CHUNKS)}
    for word, scores in queries.items():
        vector = sum(score * vectors[chunk] for chunk, score in scores.items())
        vectors[word] = vector + math.sqrt(1 - sum(s * s for s in scores.values())) * unit(words.index(word), size)
    vectors["qa2"] = NEAR * vectors["qa"] + math.sqrt(1 - NEAR**2) * unit(words.index("qa2"), size)
    vectors["qp"] = vectors["cb"]  # the query prompt's word: pulls every prompted query towards chunk cb
    return vectors


def toy_model(folder, queries=QUERIES, prompts=None) -> str:
    """A real SentenceTransformer (StaticEmbedding: a text's vector is the mean of its words'), saved to `folder`."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import StaticEmbedding
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    vectors = toy_vectors(queries)
    vocabulary = {"[UNK]": 0, **{word: i + 1 for i, word in enumerate(vectors)}}
    tokenizer = Tokenizer(WordLevel(vocabulary, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    weights = np.stack([np.zeros(len(vectors["ca"])), *vectors.values()]).astype(np.float32)
    model = SentenceTransformer(modules=[StaticEmbedding(tokenizer, embedding_weights=weights)], prompts=prompts or {},
                                device="cpu")
    model.save(str(folder))
    return str(folder)


def rows(*items) -> pd.DataFrame:
    """(chunk, query or None) -> scored rows as embed_score writes them (a None query failed to generate)."""
    return pd.DataFrame([{"anchor": chunk, "positive": query, "negative": "n" if query else None,
                          "chunk_id": f"id-{chunk}", "generation_status": "generated" if query else "failed",
                          "similarity-anchor-positive": 0.5} for chunk, query in items])


TRAIN = rows(("ca", "qa"), ("ca", "qa2"), ("ca", "qa3"), ("cb", "qb"), ("cc", None), ("ce", "qe"), ("cd", None))
TEST = rows(("ta", "qt"), ("tb", None))


def run(tmp_path, train=TRAIN, test=TEST, settings=SETTINGS, model=None, name="out"):
    model = model or toy_model(tmp_path / "model")
    write_splits({"train": train, "test": test}, tmp_path / "in")
    stats = mine_negatives(tmp_path / "in", tmp_path / name, model, settings, device="cpu")
    return stats, {split: pd.read_parquet(tmp_path / name / f"{split}.parquet") for split in ("train", "test")}


@pytest.fixture(scope="module")
def mined(tmp_path_factory):
    return run(tmp_path_factory.mktemp("mined"))


def cosine(query: str, chunk: str) -> float:
    vectors = toy_vectors()
    return float(vectors[query] @ vectors[chunk])


def test_round_trip_ranks_are_exact_and_filters_mark_rows(mined):
    _, frames = mined
    train = frames["train"]
    # qa: cb scores above ca (rank 2); qa2 is qa scaled; qa3 and qb find their chunk first; qe has 4 above it.
    assert list(train[ROUNDTRIP_RANK]) == [2, 2, 1, 1, pd.NA, 5, pd.NA]
    assert list(train[FILTER_STATUS]) == [KEPT, "dropped: near-duplicate", KEPT, KEPT, "dropped: generation failed",
                                          "dropped: roundtrip rank 5", "dropped: generation failed"]
    # ta scores 0.7 for qt but is another split's chunk: it does not count against the test row.
    assert list(frames["test"][ROUNDTRIP_RANK]) == [1, pd.NA]
    assert list(frames["test"][FILTER_STATUS]) == [KEPT, "dropped: generation failed"]
    assert list(training_rows(train)["positive"]) == ["qa", "qa3", "qb"]
    # The rows of embed_score all come through, in order, with their columns.
    assert list(train["positive"].fillna("-")) == list(TRAIN["positive"].fillna("-"))
    assert "similarity-anchor-positive" in train.columns


def test_mined_negatives_are_exact_never_the_own_chunk_never_above_the_margin_never_another_split(mined):
    _, frames = mined
    train, test = frames["train"], frames["test"]
    # qa: threshold 0.5 - 5% = 0.475 removes cb (0.6) and cc (0.48, below ca yet within the margin); cd and ce
    # remain (fewer than 3).
    assert [list(ids) for ids in train[HARD_NEGATIVE_IDS]] == [
        ["id-cd", "id-ce"], ["id-cd", "id-ce"], ["id-cc", "id-cd", "id-cb"], ["id-ca", "id-cc", "id-cd"], [], [], []]
    assert list(train[MARGIN_REMOVED]) == [2, 2, 0, 0, 0, 4, 0]
    assert [list(texts) for texts in train[HARD_NEGATIVES]][:2] == [["cd", "ce"], ["cd", "ce"]]
    assert [list(ids) for ids in test[HARD_NEGATIVE_IDS]] == [["id-tb"], []]
    for frame in frames.values():
        own_split = set(frame["chunk_id"])
        for chunk, query, ids, texts in zip(frame["anchor"], frame["positive"], frame[HARD_NEGATIVE_IDS],
                                            frame[HARD_NEGATIVES]):
            assert f"id-{chunk}" not in set(ids) and set(ids) <= own_split
            assert [f"id-{text}" for text in texts] == list(ids)
            for text in texts:
                assert cosine(query, text) <= (1 - SETTINGS.mining_margin) * cosine(query, chunk)


def test_statistics_count_each_filter_and_the_rows_with_fewer_negatives(mined, tmp_path):
    stats, _ = mined
    train, test = stats["splits"]["train"], stats["splits"]["test"]
    assert train["filters"] == {
        "generation_failed": {"dropped": 2},
        "roundtrip": {"checked": 5, "kept": 4, "dropped": 1, "k": 2},
        "near_duplicate": {"checked": 4, "dropped": 1, "threshold": 0.95},
        "kept": 3}
    assert train["mining"] == {"rows_mined": 5, "negatives": 10, "rows_with_fewer_negatives": 3,
                               "rows_without_negatives": 1, "margin_removed": 8}
    assert train["chunks"] == 5 and train["distinct_queries"] == 5
    assert test["mining"]["rows_with_fewer_negatives"] == 1 and test["filters"]["kept"] == 1
    assert stats["settings"]["roundtrip_k"] == 2


def test_embed_scores_statistics_are_carried_forward(tmp_path):
    model = toy_model(tmp_path / "model")
    write_json(tmp_path / "in" / "stats.json", {"dimension": 13, "splits": {"train": {"rows": 7}}})
    run(tmp_path, model=model)
    written = read_json(tmp_path / "out" / "stats.json")
    assert written["dimension"] == 13 and written["splits"] == {"train": {"rows": 7}}
    assert written["mine_negatives"]["splits"]["train"]["filters"]["kept"] == 3


def test_roundtrip_k_zero_turns_the_filter_off_and_ranks_stay(tmp_path):
    settings = MineNegativesSettings(num_hard_negatives=3, mining_range=4, roundtrip_k=0)
    stats, frames = run(tmp_path, settings=settings)
    assert list(frames["train"][FILTER_STATUS])[5] == KEPT and frames["train"][ROUNDTRIP_RANK][5] == 5
    assert stats["splits"]["train"]["filters"]["roundtrip"]["dropped"] == 0


def test_a_query_shared_by_two_chunks_never_gets_either_chunk(tmp_path):
    train = rows(("ca", "qb"), ("cb", "qb"), ("cc", "qa3"), ("cd", None), ("ce", None))
    _, frames = run(tmp_path, train=train)
    frame = frames["train"]
    # Both chunks are positives of qb; the margin follows the lower one (ca, 0.2): 0.19 keeps cc, cd, ce.
    assert [list(ids) for ids in frame[HARD_NEGATIVE_IDS]][:2] == [["id-cc", "id-cd", "id-ce"]] * 2
    assert list(frame[ROUNDTRIP_RANK])[:2] == [2, 1]  # ranked by chunk: only cb is above ca for qb


def test_the_miner_mines_and_the_base_model_filters(tmp_path):
    base = toy_model(tmp_path / "base")
    # The miner sees qb differently: cd closest, then cc, then ca.
    miner = toy_model(tmp_path / "miner", {**QUERIES, "qb": {"cb": 0.7, "cd": 0.5, "cc": 0.4, "ca": 0.3}})
    settings = MineNegativesSettings(miner_model=miner, num_hard_negatives=3, mining_range=4, roundtrip_k=3)
    stats, frames = run(tmp_path, settings=settings, model=base)
    assert list(frames["train"][HARD_NEGATIVE_IDS][3]) == ["id-cd", "id-cc", "id-ca"]
    assert list(frames["train"][ROUNDTRIP_RANK])[:4] == [2, 2, 1, 1]
    assert stats["miner_model"] == miner and stats["embedding_model"] == base


def test_the_models_query_prompt_is_applied(tmp_path):
    # With the prompt "qp " every query leans towards cb: for qa3 (0.9 ca, 0.1 cb) cb now outranks ca.
    model = toy_model(tmp_path / "model", prompts={"query": "qp "})
    _, frames = run(tmp_path, model=model)
    assert frames["train"][ROUNDTRIP_RANK][2] == 2
    assert "id-cb" not in set(frames["train"][HARD_NEGATIVE_IDS][3])  # qb's own chunk stays out


def test_settings_are_checked(tmp_path):
    with pytest.raises(SettingError):
        build(MineNegativesSettings, {"mining_margin": 1.5})
    with pytest.raises(SettingError):
        build(MineNegativesSettings, {"roundtrip_k": -1})
    with pytest.raises(StageError, match="must not exceed mining_range"):
        run(tmp_path, settings=MineNegativesSettings(num_hard_negatives=5, mining_range=4))


def test_with_the_embedded_model_ranks_match_a_brute_force_search(tmp_path):
    chunks = {
        "train": ["Kubeflow Pipelines compiles a Python pipeline into YAML that the cluster runs.",
                  "Katib tunes hyperparameters by running experiments with many trials.",
                  "KServe serves trained models behind an HTTP endpoint on Kubernetes.",
                  "Jupyter notebooks run as servers inside the cluster, one per user."],
        "test": ["Recurring runs start a pipeline on a schedule.", "Metadata records the artifacts of every run."],
    }
    queries = {"train": ["How do I compile a pipeline to YAML?", "How do I tune hyperparameters?",
                         "pizza recipe with basil", "Where do notebooks run?"],
               "test": ["How can a pipeline run every night?", "What records artifacts?"]}
    frames = {split: rows(*zip(chunks[split], queries[split])) for split in chunks}
    stats, out = run(tmp_path, train=frames["train"], test=frames["test"], model=EMBEDDED_EMBEDDING_MODEL,
                     settings=MineNegativesSettings(num_hard_negatives=2, mining_range=3, roundtrip_k=2))
    model = load_model(EMBEDDED_EMBEDDING_MODEL, "cpu")
    for split, texts in chunks.items():
        scores = model.encode(queries[split], normalize_embeddings=True) @ model.encode(
            texts, normalize_embeddings=True).T
        expected = [1 + int((row > row[i]).sum()) for i, row in enumerate(scores)]
        assert list(out[split][ROUNDTRIP_RANK]) == expected
        for i, ids in enumerate(out[split][HARD_NEGATIVE_IDS]):
            assert f"id-{texts[i]}" not in set(ids) and set(ids) <= set(out[split]["chunk_id"])
    assert stats["embedding_model"] == stats["miner_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert stats["splits"]["train"]["roundtrip_rank"]["share_rank_1"] >= 0.75


@pytest.mark.parametrize("target", ["kfp", "vertex"])
def test_the_compiled_pipeline_runs_the_stage_on_a_gpu_with_its_image(target, compiled_yaml):
    documents = list(yaml.safe_load_all(compiled_yaml(target)))
    container = documents[0]["deploymentSpec"]["executors"]["exec-mine-negatives-component"]["container"]
    assert container["image"] == STAGE_IMAGES["mine_negatives"]
    accelerator = container["resources"]["accelerator"]
    if target == "vertex":
        assert "vertex_accelerator_type" in accelerator["resourceType"]
        assert "vertex_accelerator_count" in accelerator["resourceCount"]
    else:
        assert "gpu_accelerator_type" in accelerator["resourceType"] and "gpu_count" in accelerator["resourceCount"]
        k8s = documents[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-mine-negatives-component"]
        assert "nodeSelector" in k8s and "tolerations" in k8s
