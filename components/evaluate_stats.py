"""The evaluate stage's numbers: exact retrieval metrics, Matryoshka truncation, the paired bootstrap, finite checks.

With a single relevant document at rank r, NDCG@k = 1/log2(r+1), MRR@k = 1/r and Recall@k = 1 when r <= k, else 0,
per query; a model's metric is the mean over queries. Ties are ranked pessimistically (a document scoring the same
as the relevant one counts as ahead of it).

The paired bootstrap resamples queries with replacement (one set of resample indices shared by every dimension, so
the dimensions' intervals are comparable) and takes the 2.5th and 97.5th percentiles of the mean per-query
difference finetuned - base: the 95% interval of the gain.
"""

import math
import numbers
from typing import Any

from components.common import StageError

CUTOFFS = (1, 5, 10)
METRICS = ("ndcg@10", "mrr@10", "recall@1", "recall@5", "recall@10")
GATE_METRIC = "ndcg@10"
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95


def relevant_ranks(scores, relevant) -> Any:
    """1-based rank of each query's relevant document; ties count against it (a deterministic, honest rank)."""
    import numpy as np

    scores = np.asarray(scores, dtype=np.float64)
    relevant = np.asarray(relevant, dtype=np.int64)
    if scores.ndim != 2 or len(relevant) != scores.shape[0]:
        raise StageError(f"scores must be (queries, documents) with one relevant index per query; got {scores.shape} "
                         f"and {len(relevant)} indices")
    own = scores[np.arange(len(relevant)), relevant]
    # Every other document scoring at least as high is ranked ahead.
    return (scores >= own[:, None]).sum(axis=1)


def per_query_metrics(scores, relevant) -> dict[str, Any]:
    """Each metric of METRICS per query (arrays in query order): what the bootstrap resamples."""
    import numpy as np

    ranks = relevant_ranks(scores, relevant)
    if len(ranks) == 0:
        raise StageError("No queries to evaluate.")
    top10 = ranks <= 10
    values = {"ndcg@10": np.where(top10, 1.0 / np.log2(ranks + 1), 0.0),
              "mrr@10": np.where(top10, 1.0 / ranks, 0.0)}
    for k in CUTOFFS:
        values[f"recall@{k}"] = (ranks <= k).astype(np.float64)
    return values


def retrieval_metrics(scores, relevant) -> dict[str, float]:
    """NDCG@10, MRR@10, Recall@1/5/10 for one relevant document per query, averaged over queries."""
    import numpy as np

    return {metric: float(np.mean(values)) for metric, values in per_query_metrics(scores, relevant).items()}


def truncate_normalise(vectors, dimension: int) -> Any:
    """The first `dimension` components, renormalised to unit length (Matryoshka truncation)."""
    import numpy as np

    cut = np.asarray(vectors, dtype=np.float64)[:, :dimension]
    norms = np.linalg.norm(cut, axis=1, keepdims=True)
    return cut / np.where(norms == 0, 1.0, norms)


def per_query_by_dimension(query_vectors, document_vectors, relevant, dims) -> dict[str, dict[str, Any]]:
    """dimension (as text) -> metric -> per-query values, each dimension by truncating the full embeddings."""
    return {str(dim): per_query_metrics(truncate_normalise(query_vectors, dim)
                                        @ truncate_normalise(document_vectors, dim).T, relevant) for dim in dims}


def mean_metrics(per_query: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """dimension -> metric -> mean over queries."""
    import numpy as np

    return {dim: {metric: float(np.mean(values)) for metric, values in metrics.items()}
            for dim, metrics in per_query.items()}


def metrics_by_dimension(query_vectors, document_vectors, relevant, dims) -> dict[str, dict[str, float]]:
    """dimension -> metric -> value, each dimension measured on the truncated, renormalised embeddings."""
    return mean_metrics(per_query_by_dimension(query_vectors, document_vectors, relevant, dims))


def paired_bootstrap(base: dict[str, Any], tuned: dict[str, Any], resamples: int = BOOTSTRAP_RESAMPLES,
                     seed: int = BOOTSTRAP_SEED, confidence: float = CONFIDENCE) -> dict[str, dict[str, float]]:
    """key -> {gain, low, high}: the mean per-query difference tuned - base and its percentile interval.

    `base` and `tuned` map a key (a dimension) to per-query values of the same queries in the same order; the same
    resample indices serve every key (drawn once, vectorised: resamples x queries).
    """
    import numpy as np

    sizes = {len(values) for values in (*base.values(), *tuned.values())}
    if len(sizes) != 1 or set(base) != set(tuned) or 0 in sizes:
        raise StageError(f"The bootstrap needs the same non-empty queries for both models; got sizes {sorted(sizes)} "
                         f"and keys {sorted(base)} vs {sorted(tuned)}.")
    queries = sizes.pop()
    indices = np.random.default_rng(seed).integers(0, queries, size=(resamples, queries))
    tail = (1 - confidence) / 2 * 100
    intervals = {}
    for key, base_values in base.items():
        difference = np.asarray(tuned[key], dtype=np.float64) - np.asarray(base_values, dtype=np.float64)
        means = difference[indices].mean(axis=1)
        low, high = np.percentile(means, [tail, 100 - tail])
        intervals[key] = {"gain": float(difference.mean()), "low": float(low), "high": float(high)}
    return intervals


def gate_intervals(base: dict[str, dict[str, Any]], tuned: dict[str, dict[str, Any]],
                   seed: int = BOOTSTRAP_SEED) -> dict[str, dict[str, float]]:
    """dimension -> the paired-bootstrap interval of the GATE_METRIC gain at that dimension."""
    return paired_bootstrap({dim: values[GATE_METRIC] for dim, values in base.items()},
                            {dim: values[GATE_METRIC] for dim, values in tuned.items()}, seed=seed)


def check_finite_vectors(vectors, what: str) -> None:
    """NaN or infinite embeddings fail the stage (they rank arbitrarily and would make any model look good)."""
    import numpy as np

    bad = int((~np.isfinite(np.asarray(vectors))).any(axis=1).sum())
    if bad:
        raise StageError(f"{what} has NaN or infinite embeddings for {bad} of {len(vectors)} texts: the model is "
                         "broken (finetuning diverged?). Nothing is exported; lower finetune_learning_rate and run "
                         "finetune again.")


def check_finite_numbers(values: Any, what: str) -> None:
    """Every number in a nested dict/list is finite, else a StageError naming the first bad one."""
    stack = [(what, values)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            stack.extend((f"{path}.{key}", item) for key, item in value.items())
        elif isinstance(value, (list, tuple)):
            stack.extend((f"{path}[{index}]", item) for index, item in enumerate(value))
        elif isinstance(value, numbers.Real) and not math.isfinite(value):
            raise StageError(f"{path} is {value}: the metrics are not finite, so the gate cannot decide; nothing is "
                             "exported. Check the finetuned model (lower finetune_learning_rate).")
