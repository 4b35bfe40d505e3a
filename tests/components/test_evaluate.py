"""evaluate: the evaluation set (filtered rows never become queries), the gate's rules, and real models: the
IR-evaluator cross-check, the gate in both directions, the size rule, NaN embeddings, the order of record and
export."""

import json

import numpy as np
import pandas as pd
import pytest

from components.common import StageError, resolve_embedding_model
from components.evaluate import copy_evaluation_files, evaluate, evaluation_set, format_table, gate


def scored_frames(rows_train, rows_test):
    return {"train": pd.DataFrame(rows_train), "test": pd.DataFrame(rows_test)}


def row(chunk, query, status="generated", negative="n", kept="kept"):
    return {"anchor": f"doc {chunk}", "positive": query, "negative": negative, "generation_status": status,
            "chunk_id": chunk, "filter_status": kept}


def test_queries_are_kept_test_rows_and_corpus_is_every_test_chunk_once():
    train = [row("a", "qa")]
    test = [row("c", "qc", "cached"), row("d", ""), row("a", "qa2"), row("e", "qe", kept="dropped: roundtrip rank 14"),
            row("f", None, "failed", kept="dropped: generation failed"),
            row("c", "qc2", kept="dropped: near-duplicate")]
    queries, documents, relevant, counts = evaluation_set(scored_frames(train, test))
    assert queries == ["qc", "qa2"]  # the empty, failed and filtered rows are no queries
    assert documents == ["doc c", "doc d", "doc a", "doc e", "doc f"]  # but every test chunk is in the corpus, once
    assert [documents[i] for i in relevant] == ["doc c", "doc a"]
    assert counts == {"queries": 2, "test_rows": 6, "valid_test_rows": 4, "filtered_test_rows": 2, "corpus": 5}
    without_filter = pd.DataFrame(test).drop(columns="filter_status")  # data from before mine_negatives
    assert evaluation_set({"train": pd.DataFrame(train), "test": without_filter})[0] == ["qc", "qa2", "qe", "qc2"]
    with pytest.raises(StageError, match="no usable queries"):
        evaluation_set(scored_frames(train, test[3:5]))


def scores(base, tuned, low, high, dimension=384):
    dim = str(dimension)
    return ({"dimension": dimension, "metrics": {dim: {"ndcg@10": base}}},
            {"dimension": dimension, "metrics": {dim: {"ndcg@10": tuned}}},
            {dim: {"gain": tuned - base, "low": low, "high": high}})


def test_gate_needs_the_interval_above_zero_and_the_gain_at_least_min_improvement():
    assert gate(*scores(0.50, 0.52, 0.005, 0.035), 0.01, queries=60)["finetuned_wins"]
    wide = gate(*scores(0.50, 0.52, -0.004, 0.045), 0.01, queries=60)  # a big gain, but it may be noise
    assert not wide["finetuned_wins"] and "lower bound -0.0040 is not above 0" in wide["reason"]
    small = gate(*scores(0.50, 0.505, 0.001, 0.009), 0.01, queries=60)  # sure, but too small to matter
    assert not small["finetuned_wins"] and "below min_improvement=0.01" in small["reason"]
    tie = gate(*scores(0.50, 0.50, 0.0, 0.0), -0.5, queries=60)  # a tie is no win, whatever the threshold
    assert not tie["finetuned_wins"] and tie["selected"] == "base"
    assert wide["interval"] == [-0.004, 0.045] and wide["queries"] == 60
    with pytest.raises(StageError, match="same model family"):
        gate({"dimension": 1024, "metrics": {}}, *scores(0.5, 0.6, 0.1, 0.1)[1:], 0.0, queries=60)


def test_gate_refuses_a_small_test_set_and_force_export_overrides_only_that():
    refused = gate(*scores(0.50, 0.60, 0.05, 0.15), 0.01, queries=49, min_queries=50)
    assert not refused["finetuned_wins"] and refused["too_small"]
    assert refused["reason"].startswith("The test set is too small to decide: 49 evaluation queries")
    forced = gate(*scores(0.50, 0.60, 0.05, 0.15), 0.01, queries=49, min_queries=50, force_export=True)
    assert forced["finetuned_wins"] and "force_export" in forced["reason"]
    noise = gate(*scores(0.50, 0.60, -0.01, 0.2), 0.01, queries=49, min_queries=50, force_export=True)
    assert not noise["finetuned_wins"] and "does NOT beat" in noise["reason"]
    assert gate(*scores(0.50, 0.60, 0.05, 0.15), 0.01, queries=50, min_queries=50)["finetuned_wins"]


# --- real models -------------------------------------------------------------------------------------------


QUERIES = 60


@pytest.fixture(scope="module")
def corpus(kubeflow_docs):
    """Real chunks, 60 of them in the test split (above the default min_eval_queries); a query per chunk made of its
    first words (a stand-in generated question)."""
    train = pd.read_parquet(kubeflow_docs / "train.parquet").iloc[:12]
    test = pd.read_parquet(kubeflow_docs / "test.parquet").iloc[:QUERIES]

    def triplets(frame, split):
        texts = [text[:300] for text in frame["page_content"]]
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
            expected = pytest.approx(theirs[f"cosine_{metric}"], abs=1e-6)
            assert ours["metrics"][str(dim)][metric] == expected, (dim, metric)


def test_gate_exports_the_finetuned_model_only_when_it_wins(tmp_path, scored_dir, models):
    good, worse = models
    export_to = tmp_path / "export"
    won = evaluate(scored_dir, good, tmp_path / "won", str(worse), min_improvement=0.01,
                   model_export_uri=str(export_to))
    assert won["gate"]["finetuned_wins"] and won["gate"]["improvement"] >= 0.01 and won["gate"]["interval"][0] > 0
    assert (export_to / "model.safetensors").exists()
    assert won["result_model"] == str(export_to.resolve())
    saved = json.loads((tmp_path / "won" / "evaluation.json").read_text())
    assert set(saved["models"]) == {"base", "finetuned"}
    assert saved["dims"] == [384, 256, 128, 64]
    assert set(saved["models"]["finetuned"]["metrics"]) == set(saved["models"]["base"]["metrics"]) == {
        "384", "256", "128", "64"}
    assert set(saved["models"]["base"]["metrics"]["64"]) == {"ndcg@10", "mrr@10", "recall@1", "recall@5", "recall@10"}
    # The intervals at every dimension, the number of queries, the seed and the gate's reason are all recorded.
    assert set(saved["intervals"]) == {"384", "256", "128", "64"}
    for dim, interval in saved["intervals"].items():
        models = saved["models"]
        gain = models["finetuned"]["metrics"][dim]["ndcg@10"] - models["base"]["metrics"][dim]["ndcg@10"]
        assert interval["gain"] == pytest.approx(gain) and interval["low"] <= interval["gain"] <= interval["high"]
    assert saved["bootstrap"] == {"metric": "ndcg@10", "resamples": 1000, "seed": 0, "confidence": 0.95}
    assert saved["counts"]["queries"] == saved["gate"]["queries"] == QUERIES
    assert saved["gate"]["interval"] == [saved["intervals"]["384"]["low"], saved["intervals"]["384"]["high"]]
    assert saved["gate"]["reason"].startswith("The finetuned model wins") and "95% CI [+" in saved["gate"]["reason"]
    markdown = (tmp_path / "won" / "evaluation.md").read_text()
    interval = saved["intervals"]["64"]
    shown = f"{interval['gain']:+.4f} [{interval['low']:+.4f}, {interval['high']:+.4f}]"
    assert "wins" in markdown and "ndcg@10 gain [95% CI]" in markdown and shown in markdown
    assert shown in format_table(saved) and "ndcg@10 gain [95% CI]" in format_table(saved)
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
    assert lost["gate"]["interval"][1] < 0  # clearly worse: the whole interval is below zero
    assert "does NOT beat the base model" in (tmp_path / "lost" / "evaluation.md").read_text()


def test_identical_models_never_win(tmp_path, scored_dir, models):
    same = evaluate(scored_dir, models[0], tmp_path / "same", str(models[0]), min_improvement=-1.0,
                    model_export_uri=str(tmp_path / "export"))
    assert all(interval == {"gain": 0.0, "low": 0.0, "high": 0.0} for interval in same["intervals"].values())
    assert not same["gate"]["finetuned_wins"] and not (tmp_path / "export").exists()


def test_a_small_test_set_decides_nothing_unless_forced(tmp_path, scored_dir, models):
    good, worse = models
    refused = evaluate(scored_dir, good, tmp_path / "refused", str(worse), model_export_uri=str(tmp_path / "a"),
                       min_eval_queries=QUERIES + 1)
    assert not refused["gate"]["finetuned_wins"] and not (tmp_path / "a").exists()
    assert refused["gate"]["interval"][0] > 0  # a clear win, yet too few queries to call it
    assert refused["gate"]["reason"].startswith(f"The test set is too small to decide: {QUERIES} evaluation queries")
    assert "too small to decide" in (tmp_path / "refused" / "evaluation.md").read_text()
    forced = evaluate(scored_dir, good, tmp_path / "forced", str(worse), model_export_uri=str(tmp_path / "b"),
                      min_eval_queries=QUERIES + 1, force_export=True)
    assert forced["gate"]["finetuned_wins"] and (tmp_path / "b" / "model.safetensors").exists()


def test_nan_embeddings_fail_the_stage_and_nothing_is_exported(tmp_path, scored_dir, models):
    import torch
    from sentence_transformers import SentenceTransformer

    broken = SentenceTransformer(str(models[0]), device="cpu")
    with torch.no_grad():
        next(broken.parameters()).fill_(float("nan"))  # the word embeddings: every text's vector becomes NaN
    broken.save(str(tmp_path / "broken"))
    message = r"The finetuned model \(queries\) has NaN or infinite embeddings for 60 of 60"
    with pytest.raises(StageError, match=message):
        evaluate(scored_dir, tmp_path / "broken", tmp_path / "out", str(models[0]), min_improvement=-1.0,
                 model_export_uri=str(tmp_path / "export"), force_export=True)
    assert not (tmp_path / "export").exists() and not (tmp_path / "out" / "evaluation.json").exists()


def test_the_decision_is_on_disk_before_the_export(tmp_path, scored_dir, models):
    good, worse = models
    occupied = tmp_path / "occupied"  # the user's folder: export refuses to replace it, after the record is written
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(StageError, match="has no .docs-to-embeddings marker"):
        evaluate(scored_dir, good, tmp_path / "out", str(worse), model_export_uri=str(occupied))
    saved = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert saved["gate"]["finetuned_wins"] and saved["exported"] == {}
    assert (occupied / "notes.txt").read_text() == "mine" and (tmp_path / "out" / "evaluation.md").exists()


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


def test_on_vertex_the_hub_token_is_read_from_secret_manager(tmp_path, scored_dir, models, monkeypatch,
                                                            fake_secret_manager, capfd):
    import huggingface_hub
    from kfp import dsl

    from components.evaluate import evaluate_component, export_model_component

    pushed = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder",
                        lambda self, folder_path, repo_id, **kw: pushed.append((folder_path, repo_id, self.token)))
    fake_secret_manager["projects/p/secrets/hf-token"] = "hf_from_secret_manager"
    good, worse = models
    evaluation, metrics = dsl.Artifact(uri=str(tmp_path / "evaluation")), dsl.Metrics(uri=str(tmp_path / "metrics"))
    evaluate_component.python_func(
        scored=dsl.Dataset(uri=str(scored_dir)), finetuned_model=dsl.Model(uri=str(good)), base_model=str(worse),
        min_improvement=0.01, min_eval_queries=50, force_export=False, evaluation=evaluation, metrics=metrics,
        report=dsl.HTML(uri=str(tmp_path / "report.html")))
    assert pushed == [] and evaluation.metadata["selected"] == "finetuned"  # evaluate decides; it exports nothing
    # The metrics are in the artifact's file too (kfp.local's task cache needs every output's file to exist).
    assert json.loads((tmp_path / "metrics").read_text())["finetuned_wins"] == 1.0
    exported = dsl.Artifact(uri=str(tmp_path / "exported"))
    # The export_model component's own body, as the Vertex task runs it: no HF_TOKEN in the environment, only the
    # secret's name.
    export_model_component.python_func(
        evaluation=evaluation, finetuned_model=dsl.Model(uri=str(good)), model_export_uri="",
        hub_model_repo="me/model", output_uri=str(tmp_path / "results"), exported=exported,
        hf_secret_resource="projects/p/secrets/hf-token")
    assert fake_secret_manager.requested == ["projects/p/secrets/hf-token/versions/latest"]
    assert pushed == [(str(good), "me/model", "hf_from_secret_manager")]
    # The model also went to output_uri's model folder (no model_export_uri), and the evaluation files there say so.
    results = json.loads((tmp_path / "results" / "evaluation.json").read_text())
    assert results["exported"]["hub"].endswith("me/model") and "me/model" in exported.metadata["hub"]
    assert results["exported"]["model_uri"] == str(tmp_path / "results" / "model")
    assert (tmp_path / "results" / "model" / "modules.json").exists()
    assert "Exported to" in (tmp_path / "results" / "evaluation.md").read_text()
    output = capfd.readouterr()
    written = output.out + output.err + (tmp_path / "exported" / "evaluation.json").read_text()
    assert "hf_from_secret_manager" not in written + json.dumps(exported.metadata)


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
    prompted = encode(model, [f"query: {q}" for q in queries[:2]], "", 8)
    assert np.allclose(encode(model, queries[:2], "query: ", 8), prompted,
                       atol=1e-5)
