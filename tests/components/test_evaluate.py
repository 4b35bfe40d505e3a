"""evaluate: exact retrieval metrics on toy corpora with known rankings, the IR-evaluator cross-check, and the gate
in both directions with real models."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from components.common import StageError, resolve_embedding_model
from components.evaluate import (
    copy_evaluation_files,
    evaluate,
    evaluation_set,
    gate,
    metrics_by_dimension,
    relevant_ranks,
    retrieval_metrics,
    truncate_normalise,
)


def test_toy_rankings_give_the_known_metric_values():
    # Four queries, twelve documents; the relevant document lands at ranks 1, 2, 5 and 11.
    documents = 12
    scores = np.zeros((4, documents))
    relevant = [0, 3, 7, 11]
    for query, (doc, rank) in enumerate(zip(relevant, (1, 2, 5, 11))):
        order = [d for d in range(documents) if d != doc]
        order.insert(rank - 1, doc)
        scores[query, order] = np.linspace(1.0, 0.0, documents)  # descending score along the ranking
    assert relevant_ranks(scores, relevant).tolist() == [1, 2, 5, 11]
    metrics = retrieval_metrics(scores, relevant)
    assert metrics["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6) + 0) / 4)
    assert metrics["mrr@10"] == pytest.approx((1 + 1 / 2 + 1 / 5 + 0) / 4)
    assert metrics["recall@1"] == pytest.approx(1 / 4)
    assert metrics["recall@5"] == pytest.approx(3 / 4)
    assert metrics["recall@10"] == pytest.approx(3 / 4)


def test_ties_rank_the_relevant_document_below_its_equals():
    scores = np.array([[0.5, 0.5, 0.5, 0.1]])
    assert relevant_ranks(scores, [0]).tolist() == [3]
    assert retrieval_metrics(scores, [0])["recall@1"] == 0.0


def test_matryoshka_truncation_renormalises_and_can_change_the_ranking():
    # In all four components document 1 is the query's nearest (cos 0.94 vs 0.71); in the first two, document 0
    # points exactly along the query (cos 1.0) and document 1 only nearly (0.98).
    queries = np.array([[1.0, 0.0, 1.0, 0.0]])
    documents = np.array([[1.0, 0.0, 0.0, 0.0], [0.5, 0.1, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]])
    truncated = truncate_normalise(documents, 2)
    assert np.allclose(np.linalg.norm(truncated, axis=1), 1.0)
    by_dim = metrics_by_dimension(queries, documents, [1], [4, 2])
    assert by_dim["4"]["recall@1"] == 1.0
    assert by_dim["2"]["recall@1"] == 0.0
    assert by_dim["2"]["mrr@10"] == pytest.approx(1 / 2)


def scored_frames(rows_train, rows_test):
    return {"train": pd.DataFrame(rows_train), "test": pd.DataFrame(rows_test)}


def test_queries_are_valid_test_positives_and_corpus_is_every_chunk_once():
    train = [{"anchor": "doc a", "positive": "qa", "negative": "na", "generation_status": "generated", "chunk_id": "a"},
             {"anchor": "doc b", "positive": None, "negative": None, "generation_status": "failed", "chunk_id": "b"}]
    test = [{"anchor": "doc c", "positive": "qc", "negative": "nc", "generation_status": "cached", "chunk_id": "c"},
            {"anchor": "doc d", "positive": "", "negative": "nd", "generation_status": "generated", "chunk_id": "d"},
            {"anchor": "doc a", "positive": "qa2", "negative": "na2", "generation_status": "generated", "chunk_id": "a"}]
    queries, documents, relevant, counts = evaluation_set(scored_frames(train, test))
    assert queries == ["qc", "qa2"]
    assert documents == ["doc a", "doc b", "doc c", "doc d"]  # failed rows' chunks stay in the corpus
    assert [documents[i] for i in relevant] == ["doc c", "doc a"]
    assert counts == {"queries": 2, "test_rows": 3, "corpus": 4}
    with pytest.raises(StageError, match="no valid queries"):
        evaluation_set(scored_frames(train, test[1:2]))


# --- real models -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(kubeflow_docs):
    """Twenty real chunks; a query per test chunk made of its first words (a stand-in generated question)."""
    train = pd.read_parquet(kubeflow_docs / "train.parquet").iloc[:12]
    test = pd.read_parquet(kubeflow_docs / "test.parquet").iloc[:8]

    def triplets(frame, split):
        texts = [text[:500] for text in frame["page_content"]]
        return pd.DataFrame({"anchor": texts, "positive": [" ".join(t.split()[3:15]) for t in texts],
                             "negative": ["an unrelated question"] * len(texts), "generation_status": "generated",
                             "chunk_id": [f"{split}{i}" for i in range(len(texts))]})

    return {"train": triplets(train, "train"), "test": triplets(test, "test")}


@pytest.fixture(scope="module")
def scored_dir(tmp_path_factory, corpus):
    folder = tmp_path_factory.mktemp("scored")
    for split, frame in corpus.items():
        frame.to_parquet(folder / f"{split}.parquet", index=False)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The embedded MiniLM, and a worse copy of it (seeded noise on its weights): a real model pair whose order is
    known, to drive the gate both ways."""
    import torch
    from sentence_transformers import SentenceTransformer

    path, _ = resolve_embedding_model("embedded:all-MiniLM-L6-v2")
    good = tmp_path_factory.mktemp("good")
    SentenceTransformer(path, device="cpu").save(str(good))
    worse = tmp_path_factory.mktemp("worse")
    model = SentenceTransformer(path, device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * parameter.std() * 0.6)
    model.save(str(worse))
    return good, worse


def test_matches_sentence_transformers_information_retrieval_evaluator(corpus, models):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    from components.evaluate import evaluate_model

    queries, documents, relevant, _ = evaluation_set(corpus)
    ours = evaluate_model(str(models[0]), queries, documents, relevant, dims=[384, 128])
    evaluator = InformationRetrievalEvaluator(
        queries={str(i): q for i, q in enumerate(queries)}, corpus={str(i): d for i, d in enumerate(documents)},
        relevant_docs={str(i): {str(r)} for i, r in enumerate(relevant)}, mrr_at_k=[10], ndcg_at_k=[10],
        accuracy_at_k=[1, 5, 10], precision_recall_at_k=[1, 5, 10], map_at_k=[10], show_progress_bar=False,
        score_functions={"cosine": __import__("sentence_transformers").util.cos_sim}, main_score_function="cosine")
    model = SentenceTransformer(str(models[0]), device="cpu")
    for dim in (384, 128):
        evaluator.truncate_dim = dim
        theirs = evaluator(model)
        for metric in ("ndcg@10", "mrr@10", "recall@1", "recall@5", "recall@10"):
            assert ours["metrics"][str(dim)][metric] == pytest.approx(theirs[f"cosine_{metric}"], abs=1e-6), (dim, metric)


def test_gate_exports_the_finetuned_model_only_when_it_wins(tmp_path, scored_dir, models):
    good, worse = models
    export_to = tmp_path / "export"
    won = evaluate(scored_dir, good, tmp_path / "won", str(worse), min_improvement=0.01,
                   model_export_uri=str(export_to))
    assert won["gate"]["finetuned_wins"] and won["gate"]["improvement"] >= 0.01
    assert (export_to / "model.safetensors").exists()
    assert won["result_model"] == str(export_to.resolve())
    saved = json.loads((tmp_path / "won" / "evaluation.json").read_text())
    assert set(saved["models"]) == {"base", "finetuned"}
    assert saved["dims"] == [384, 256, 128, 64]
    assert set(saved["models"]["finetuned"]["metrics"]) == set(saved["models"]["base"]["metrics"]) == {
        "384", "256", "128", "64"}
    assert set(saved["models"]["base"]["metrics"]["64"]) == {"ndcg@10", "mrr@10", "recall@1", "recall@5", "recall@10"}
    assert "wins" in (tmp_path / "won" / "evaluation.md").read_text()
    assert "data:image/png;base64," in (tmp_path / "won" / "evaluation.html").read_text()
    copied = copy_evaluation_files(tmp_path / "won", str(tmp_path / "results"))  # into output_uri: manifest last
    assert set(copied["objects"]) == {"evaluation.md", "evaluation.html", "evaluation.png"}
    assert json.loads((tmp_path / "results" / "evaluation.json").read_text()) == copied
    assert copied["gate"] == saved["gate"] and (tmp_path / "results" / "evaluation.png").exists()

    export_lost = tmp_path / "export-lost"
    lost = evaluate(scored_dir, worse, tmp_path / "lost", str(good), min_improvement=0.01,
                    model_export_uri=str(export_lost))
    assert not lost["gate"]["finetuned_wins"] and not export_lost.exists()
    assert lost["result_model"] == str(good) and lost["exported"] == {}
    assert "does NOT beat the base model" in (tmp_path / "lost" / "evaluation.md").read_text()


def test_gate_threshold_and_ties():
    def model(score):
        return {"dimension": 384, "metrics": {"384": {"ndcg@10": score}}}

    assert gate(model(0.50), model(0.52), 0.01)["finetuned_wins"]
    assert not gate(model(0.50), model(0.505), 0.01)["finetuned_wins"]
    assert not gate(model(0.50), model(0.50), 0.0)["finetuned_wins"]  # a tie is no win, whatever the threshold
    with pytest.raises(StageError, match="same model family"):
        gate({"dimension": 1024, "metrics": {}}, model(0.5), 0.0)


def test_hub_push_happens_only_on_a_win_and_needs_the_token(tmp_path, scored_dir, models, monkeypatch):
    import huggingface_hub

    pushed = []
    # The Hub is unreachable here: the outermost calls are replaced, everything else is real.
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder",
                        lambda self, folder_path, repo_id, **kw: pushed.append((folder_path, repo_id, self.token)))
    good, worse = models
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(StageError, match="HF_TOKEN"):
        evaluate(scored_dir, good, tmp_path / "a", str(worse), hub_model_repo="me/model")
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    result = evaluate(scored_dir, good, tmp_path / "b", str(worse), hub_model_repo="me/model")
    assert pushed == [(str(good), "me/model", "hf_test")]
    assert result["exported"]["hub"].endswith("me/model")
    assert "hf_test" not in (tmp_path / "b" / "evaluation.json").read_text()
    evaluate(scored_dir, worse, tmp_path / "c", str(good), hub_model_repo="me/model")
    assert len(pushed) == 1


def test_queries_get_the_model_query_prompt(tmp_path, corpus, models):
    from sentence_transformers import SentenceTransformer

    from components.evaluate import evaluate_model

    prompted = tmp_path / "prompted"
    SentenceTransformer(str(models[0]), device="cpu", prompts={"query": "query: "}).save(str(prompted))
    queries, documents, relevant, _ = evaluation_set(corpus)
    with_prompt = evaluate_model(str(prompted), queries, documents, relevant, dims=[384])
    without = evaluate_model(str(models[0]), queries, documents, relevant, dims=[384])
    assert with_prompt["query_prompt"] == "query: " and without["query_prompt"] == ""
    assert with_prompt["document_prompt"] == ""
    # The prompt reaches the encoder: the same weights give other query vectors with it than without.
    from components.evaluate import encode

    model = SentenceTransformer(str(prompted), device="cpu")
    assert not np.allclose(encode(model, queries[:2], "query: ", 8), encode(model, queries[:2], "", 8))
    assert np.allclose(encode(model, queries[:2], "query: ", 8), encode(model, [f"query: {q}" for q in queries[:2]], "", 8),
                       atol=1e-5)
