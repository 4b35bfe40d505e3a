"""evaluate_stats: exact retrieval metrics on toy corpora with known rankings, Matryoshka truncation, the paired
bootstrap on cases with a known answer, and the finite checks."""

import math

import numpy as np
import pytest

from components.common import StageError
from components.evaluate_stats import (
    check_finite_numbers,
    check_finite_vectors,
    gate_intervals,
    metrics_by_dimension,
    paired_bootstrap,
    per_query_metrics,
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


def test_per_query_values_average_to_the_metrics():
    scores = np.random.default_rng(3).normal(size=(7, 15))
    relevant = [0, 2, 4, 6, 8, 10, 12]
    per_query = per_query_metrics(scores, relevant)
    assert all(len(values) == 7 for values in per_query.values())
    assert {metric: float(np.mean(values)) for metric, values in per_query.items()} == retrieval_metrics(
        scores, relevant)


def test_identical_models_give_the_interval_zero_to_zero():
    ndcg = {"384": np.random.default_rng(0).uniform(size=80), "64": np.random.default_rng(1).uniform(size=80)}
    intervals = paired_bootstrap(ndcg, {dim: values.copy() for dim, values in ndcg.items()})
    assert intervals == {"384": {"gain": 0.0, "low": 0.0, "high": 0.0}, "64": {"gain": 0.0, "low": 0.0, "high": 0.0}}


def test_a_constant_per_query_gain_is_its_own_interval():
    base = np.random.default_rng(0).uniform(0, 0.9, size=60)
    interval = paired_bootstrap({"384": base}, {"384": base + 0.05})["384"]
    assert interval["gain"] == pytest.approx(0.05) and interval["low"] == pytest.approx(0.05)
    assert interval["high"] == pytest.approx(0.05)


def test_the_interval_is_deterministic_for_a_seed_and_brackets_the_gain():
    rng = np.random.default_rng(7)
    base, tuned = rng.uniform(size=100), rng.uniform(size=100)
    first = paired_bootstrap({"384": base}, {"384": tuned}, seed=11)
    assert first == paired_bootstrap({"384": base}, {"384": tuned}, seed=11)
    assert first != paired_bootstrap({"384": base}, {"384": tuned}, seed=12)
    low, gain, high = first["384"]["low"], first["384"]["gain"], first["384"]["high"]
    assert low < gain < high
    # Independent uniform scores: the difference of two means has standard error sqrt(2/12/100) ~ 0.041, so a 95%
    # interval is about +-0.08 wide around the gain.
    assert 0.12 < high - low < 0.20


def test_the_interval_follows_the_paired_difference_not_the_spread_of_scores():
    # Scores spread over [0, 1] but the finetuned model is better on every query by 0.01 to 0.03: a paired test sees
    # a sure gain that unpaired intervals of each model (overlapping widely) would miss.
    base = np.linspace(0.0, 0.95, 50)
    tuned = base + np.tile([0.01, 0.02, 0.03], 17)[:50]
    interval = paired_bootstrap({"384": base}, {"384": tuned})["384"]
    assert 0.01 < interval["low"] < interval["gain"] < interval["high"] < 0.03


def test_gate_intervals_use_ndcg_and_one_set_of_resamples_for_every_dimension():
    base = {dim: {"ndcg@10": np.zeros(40), "mrr@10": np.ones(40)} for dim in ("384", "64")}
    tuned = {dim: {"ndcg@10": np.arange(40) / 40, "mrr@10": np.zeros(40)} for dim in ("384", "64")}
    intervals = gate_intervals(base, tuned)
    assert intervals["384"] == intervals["64"]  # same differences, same resample indices: the same interval
    assert intervals["384"]["gain"] == pytest.approx(39 / 80)
    with pytest.raises(StageError, match="same non-empty queries"):
        paired_bootstrap({"384": np.zeros(3)}, {"384": np.zeros(4)})


def test_non_finite_vectors_and_metrics_are_refused():
    vectors = np.ones((4, 8), dtype=np.float32)
    check_finite_vectors(vectors, "The finetuned model (queries)")
    vectors[2, 5] = np.nan
    vectors[3, 0] = np.inf
    with pytest.raises(StageError, match=r"The finetuned model \(queries\) has NaN or infinite embeddings for 2 of 4"):
        check_finite_vectors(vectors, "The finetuned model (queries)")
    check_finite_numbers({"base": {"384": {"ndcg@10": 0.5}}, "intervals": [0.1, 0.2]}, "evaluation")
    with pytest.raises(StageError, match=r"evaluation.finetuned.64.ndcg@10 is inf"):
        check_finite_numbers({"finetuned": {"64": {"ndcg@10": float("inf")}}}, "evaluation")
    with pytest.raises(StageError, match=r"evaluation.intervals\[1\] is nan"):
        check_finite_numbers({"intervals": [0.1, np.float32("nan")]}, "evaluation")
