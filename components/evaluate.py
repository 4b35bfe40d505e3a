"""The evaluate stage: retrieval quality of the base and the finetuned model, and the export gate.

Queries are the test split's training rows (`positive` of valid rows that passed every filter of mine_negatives: a
filtered row never becomes a query); the corpus is every distinct chunk (`anchor`, one per `chunk_id`) of the test
split; a query's one relevant document is its own chunk. Both models see the same queries and corpus. Metrics are
exact (components/evaluate_stats.py); each Matryoshka dimension is measured by truncating the full embeddings.

The gate exports the finetuned model only when, at the full dimension, the paired-bootstrap 95% interval of its
NDCG@10 gain over the base model lies above zero AND the point gain is at least `min_improvement`. With fewer than
`min_eval_queries` queries it does not decide (too few to tell a gain from noise) unless `force_export` says to.
NaN or infinite embeddings or metrics fail the stage; evaluation.json is written before anything is exported.
"""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from components.common import (
    ANCHOR,
    CHUNK_ID,
    DOCUMENT_PROMPT_NAMES,
    EVALUATION_FILES,
    EVALUATION_SUMMARY,
    HF_TOKEN_ENV,
    POSITIVE,
    QUERY_PROMPT_NAMES,
    StageError,
    get_logger,
    matryoshka_dims,
    model_prompt,
    read_json,
    read_splits,
    resolve_embedding_model,
    stage_component,
    training_rows,
    valid_pairs,
    write_json,
)
from components.evaluate_report import format_table, write_report  # format_table: also d2e.local_run's
from components.evaluate_stats import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    CONFIDENCE,
    GATE_METRIC,
    METRICS,
    check_finite_numbers,
    check_finite_vectors,
    gate_intervals,
    mean_metrics,
    per_query_by_dimension,
)
from components.model_export import export_model
from components.settings import setting
from components.storage import write_results

log = get_logger("evaluate")

DEFAULT_MIN_IMPROVEMENT = 0.01
# Below ~50 queries a bootstrap interval of an NDCG difference is wide and itself unreliable (issue 9).
DEFAULT_MIN_EVAL_QUERIES = 50


@dataclass(frozen=True)
class EvaluateSettings:
    """The export gate."""

    min_improvement: float = setting(DEFAULT_MIN_IMPROVEMENT, "export the finetuned model only if its NDCG@10 at full "
                                     "dimension beats the base by this (and the 95% interval of the gain is above "
                                     "0)", minimum=-1.0, maximum=1.0)
    min_eval_queries: int = setting(DEFAULT_MIN_EVAL_QUERIES, "fewer evaluation queries than this are too few to "
                                    "decide: the finetuned model is not exported", minimum=1,
                                    maximum=10**7)
    force_export: bool = setting(False, "decide even with fewer than min_eval_queries queries (the interval and "
                                 "min_improvement still apply)")


@dataclass(frozen=True)
class ExportModelSettings:
    """Where a winning finetuned model goes: the export_model stage, apart from evaluate because its effects lie
    outside the pipeline's artifacts (a cached evaluate is fine; a skipped export is not)."""

    model_export_uri: str = setting("", "where a winning finetuned model goes (folder or gs://...; a local run's "
                                    "default is OUTPUT_DIR/model)")
    hub_model_repo: str = setting("", f"also push a winning model to this Hub repo ({HF_TOKEN_ENV} from the env)")


# --- queries, corpus, models --------------------------------------------------------------------------------


def evaluation_set(frames: dict[str, Any]) -> tuple[list[str], list[str], list[int], dict[str, int]]:
    """(queries, corpus documents, index of each query's own chunk in the corpus, counts) from the test split."""
    test = frames["test"]
    if CHUNK_ID not in test.columns:
        raise StageError(f"The test split has no '{CHUNK_ID}' column; it comes from load_docs.")
    corpus_ids: dict[str, int] = {}
    documents: list[str] = []
    for chunk_id, anchor in zip(test[CHUNK_ID], test[ANCHOR]):
        if chunk_id not in corpus_ids:
            corpus_ids[chunk_id] = len(documents)
            documents.append(anchor)
    kept, valid = training_rows(test), valid_pairs(test)
    queries = list(kept[POSITIVE])
    relevant = [corpus_ids[chunk_id] for chunk_id in kept[CHUNK_ID]]
    counts = {"queries": len(queries), "test_rows": len(test), "valid_test_rows": len(valid),
              "filtered_test_rows": int(len(valid) - len(kept)), "corpus": len(documents)}
    if not queries:
        raise StageError(f"The test split has no usable queries (of {len(test)} rows, {len(valid)} valid, none kept "
                         "by the filters); nothing to evaluate. Generate queries for the test split.")
    return queries, documents, relevant, counts


def encode(model, texts: list[str], prompt: str, batch_size: int):
    """Unnormalised float32 embeddings of `texts` with `prompt` prepended (if any)."""
    import numpy as np

    vectors = model.encode(texts, prompt=prompt or None, batch_size=batch_size, convert_to_numpy=True,
                           normalize_embeddings=False, show_progress_bar=False)
    return np.asarray(vectors, dtype=np.float32)


def evaluate_model(model_path: str, queries: list[str], documents: list[str], relevant: list[int],
                   dims: list[int] | None = None, batch_size: int = 64, name: str = "") -> dict[str, Any]:
    """Encode with the model's own query/document prompts (if any) and measure every dimension (default: the
    model's Matryoshka dimensions). "per_query" holds each metric per query (for the bootstrap, not for JSON)."""
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_path, device="cuda" if torch.cuda.is_available() else "cpu")
    full = int(model.get_embedding_dimension())
    usable = [dim for dim in (dims or matryoshka_dims(full)) if dim <= full]
    query_prompt = model_prompt(model, *QUERY_PROMPT_NAMES)
    document_prompt = model_prompt(model, *DOCUMENT_PROMPT_NAMES)
    query_vectors = encode(model, queries, query_prompt, batch_size)
    document_vectors = encode(model, documents, document_prompt, batch_size)
    what = name or f"The model {model_path}"
    check_finite_vectors(query_vectors, f"{what} (queries)")
    check_finite_vectors(document_vectors, f"{what} (documents)")
    per_query = per_query_by_dimension(query_vectors, document_vectors, relevant, usable)
    return {"dimension": full, "query_prompt": query_prompt, "document_prompt": document_prompt,
            "metrics": mean_metrics(per_query), "per_query": per_query}


# --- the gate and the export --------------------------------------------------------------------------------


def full_dimension(base: dict[str, Any], finetuned: dict[str, Any]) -> str:
    """The shared full dimension (as text) of the two models; a StageError when they differ."""
    if str(base["dimension"]) != str(finetuned["dimension"]):
        raise StageError(f"The base model has {base['dimension']} dimensions and the finetuned one "
                         f"{finetuned['dimension']}; they must be the same model family.")
    return str(finetuned["dimension"])


def gate(base: dict[str, Any], finetuned: dict[str, Any], intervals: dict[str, dict[str, float]],
         min_improvement: float, queries: int, min_queries: int = DEFAULT_MIN_EVAL_QUERIES,
         force_export: bool = False) -> dict[str, Any]:
    """Decide which model is the result: the finetuned one only when, at the full dimension, the interval of its
    gain is above zero and the gain is at least min_improvement, on enough queries (or force_export)."""
    full = full_dimension(base, finetuned)
    base_score, tuned_score = base["metrics"][full][GATE_METRIC], finetuned["metrics"][full][GATE_METRIC]
    improvement, low, high = tuned_score - base_score, intervals[full]["low"], intervals[full]["high"]
    too_small = queries < min_queries
    measured = (f"{GATE_METRIC} at {full} dimensions {tuned_score:.4f} vs base {base_score:.4f}, gain "
                f"{improvement:+.4f} with 95% CI [{low:+.4f}, {high:+.4f}] on {queries} queries")
    wins = low > 0 and improvement > 0 and improvement >= min_improvement and (force_export or not too_small)
    if too_small and not force_export:
        reason = (f"The test set is too small to decide: {queries} evaluation queries, fewer than min_eval_queries="
                  f"{min_queries} ({measured}). The finetuned model is not exported; the base model stays the "
                  "result. Generate queries for more test chunks, or set force_export to decide on these anyway.")
    elif wins:
        reason = (f"The finetuned model wins: {measured}; the interval is above 0 and the gain at least "
                  f"{min_improvement}. It is exported." + (f" (force_export: decided on fewer than {min_queries} "
                                                            "queries.)" if too_small else ""))
    else:
        failed = [f"the interval's lower bound {low:+.4f} is not above 0 (the gain may be noise)"] if low <= 0 else []
        if improvement <= 0 or improvement < min_improvement:
            failed.append(f"the gain is below min_improvement={min_improvement}" if improvement > 0
                          else "there is no gain")
        reason = (f"The finetuned model does NOT beat the base model: {measured}; {' and '.join(failed)}. It is not "
                  "exported; the base model stays the result.")
    return {"metric": GATE_METRIC, "dimension": int(full), "base": base_score, "finetuned": tuned_score,
            "improvement": improvement, "interval": [low, high], "min_improvement": min_improvement,
            "queries": queries, "min_eval_queries": min_queries, "force_export": bool(force_export),
            "too_small": too_small, "finetuned_wins": wins, "selected": "finetuned" if wins else "base",
            "reason": reason}


def check_hub_token(hub_model_repo: str) -> None:
    """When a Hub push is configured, the Hub token must be in the environment (checked before any work)."""
    if hub_model_repo and not os.environ.get(HF_TOKEN_ENV):
        raise StageError(f"hub_model_repo={hub_model_repo!r} is set but {HF_TOKEN_ENV} is not in the environment; "
                         "mount the Hub token as a secret.")


def push_to_hub(folder: str | os.PathLike, repo_id: str) -> str:
    """Upload the model folder to a Hub model repo.

    The token goes from the environment straight into the client: no variable of ours holds it for a traceback to show.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=os.environ.get(HF_TOKEN_ENV))
    api.create_repo(repo_id, repo_type="model", exist_ok=True, private=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                      commit_message="Finetuned by docs-to-embeddings")
    return f"https://huggingface.co/{repo_id}"


# --- the stage ----------------------------------------------------------------------------------------------


def record(evaluation: dict[str, Any], output_dir: Path) -> None:
    """evaluation.json (atomically) and the report files: what was measured and decided, before and after export."""
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json(output_dir / EVALUATION_SUMMARY, evaluation)
    write_report(evaluation, output_dir)


def measure(scored_dir, finetuned_model_dir, base_model: str, batch_size: int, seed: int) -> dict[str, Any]:
    """Both models on the same queries and corpus, the bootstrap intervals; everything checked finite."""
    queries, documents, relevant, counts = evaluation_set(read_splits(scored_dir))
    base_path, base_label = resolve_embedding_model(base_model)
    log.info("evaluating on %d queries against %d test chunks", counts["queries"], counts["corpus"])
    finetuned = evaluate_model(str(finetuned_model_dir), queries, documents, relevant, batch_size=batch_size,
                               name="The finetuned model")
    dims = [int(dim) for dim in finetuned["metrics"]]
    base = evaluate_model(base_path, queries, documents, relevant, dims, batch_size, f"The base model {base_label}")
    full_dimension(base, finetuned)
    intervals = gate_intervals(base.pop("per_query"), finetuned.pop("per_query"), seed)
    base["name"], finetuned["name"] = base_label, str(finetuned_model_dir)
    check_finite_numbers({"base": base["metrics"], "finetuned": finetuned["metrics"], "intervals": intervals},
                         "evaluation")
    return {"counts": counts, "dims": dims, "metrics": list(METRICS), "models": {"base": base, "finetuned": finetuned},
            "intervals": intervals, "bootstrap": {"metric": GATE_METRIC, "resamples": BOOTSTRAP_RESAMPLES,
                                                  "seed": seed, "confidence": CONFIDENCE}}


def evaluate(
    scored_dir: str | os.PathLike,
    finetuned_model_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    base_model: str,
    min_improvement: float = DEFAULT_MIN_IMPROVEMENT,
    model_export_uri: str = "",
    hub_model_repo: str = "",
    min_eval_queries: int = DEFAULT_MIN_EVAL_QUERIES,
    force_export: bool = False,
    batch_size: int = 64,
    seed: int = BOOTSTRAP_SEED,
) -> dict[str, Any]:
    """Evaluate base and finetuned on the same queries and corpus, gate, record evaluation.* files, then export."""
    if not Path(finetuned_model_dir, "config_sentence_transformers.json").exists() and not Path(
            finetuned_model_dir, "modules.json").exists():
        raise StageError(f"{finetuned_model_dir} holds no saved SentenceTransformer model; was finetune run?")
    check_hub_token(hub_model_repo)
    evaluation = measure(scored_dir, finetuned_model_dir, base_model, batch_size, seed)
    models = evaluation["models"]
    decision = gate(models["base"], models["finetuned"], evaluation["intervals"], min_improvement,
                    evaluation["counts"]["queries"], min_eval_queries, force_export)
    evaluation.update(gate=decision, exported={}, result_model=models["finetuned" if decision["finetuned_wins"]
                                                                      else "base"]["name"])
    # Metrics and the decision are on disk before any model leaves: a failed export leaves them to read.
    record(evaluation, Path(output_dir))
    export_winner(evaluation, finetuned_model_dir, output_dir, model_export_uri, hub_model_repo)
    log.info("%s\n%s", decision["reason"], format_table(evaluation))
    return evaluation


def export_winner(evaluation: dict[str, Any], finetuned_model_dir: str | os.PathLike, output_dir: str | os.PathLike,
                  model_export_uri: str = "", hub_model_repo: str = "") -> dict[str, Any]:
    """When the gate chose the finetuned model: export it and push it, then record where it went (`evaluation` is
    updated and rewritten, with the report, in output_dir)."""
    if evaluation["gate"]["finetuned_wins"] and (model_export_uri or hub_model_repo):
        check_hub_token(hub_model_repo)
        if model_export_uri:
            evaluation["exported"]["model_uri"] = export_model(finetuned_model_dir, model_export_uri)
            evaluation["result_model"] = evaluation["exported"]["model_uri"]
        if hub_model_repo:
            evaluation["exported"]["hub"] = push_to_hub(finetuned_model_dir, hub_model_repo)
        record(evaluation, Path(output_dir))
    return evaluation


def copy_evaluation_files(source: str | os.PathLike, output_uri: str) -> dict[str, Any]:
    """The evaluation files into the results folder, replacing the previous run's; evaluation.json comes last and
    also lists the others' checksums (its manifest)."""
    files = {name: Path(source, name) for name in EVALUATION_FILES
             if name != EVALUATION_SUMMARY and Path(source, name).exists()}
    return write_results(files, output_uri, EVALUATION_SUMMARY, extra=read_json(Path(source, EVALUATION_SUMMARY)))


@stage_component("evaluate")
def evaluate_component(
    scored: Input[Dataset],
    finetuned_model: Input[Model],
    base_model: str,
    min_improvement: float,
    min_eval_queries: int,
    force_export: bool,
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    report: Output[HTML],
):
    """Base vs finetuned retrieval metrics per Matryoshka dimension with the gain's 95% interval, and the gate's
    decision; the export_model stage carries it out (this task writes its artifacts only, so it may be cached)."""
    arguments = dict(locals())  # first, while the arguments are the only locals
    import shutil

    from components.common import write_metrics_file
    from components.evaluate import EvaluateSettings, evaluate
    from components.settings import from_arguments

    settings = from_arguments(EvaluateSettings, arguments)
    result = evaluate(scored.path, finetuned_model.path, evaluation.path, base_model,
                      min_improvement=settings.min_improvement, min_eval_queries=settings.min_eval_queries,
                      force_export=settings.force_export)
    for model_name, model in result["models"].items():
        for dim, values in model["metrics"].items():
            for metric, value in values.items():
                metrics.log_metric(f"{model_name}_{dim}_{metric}", value)
    for dim, interval in result["intervals"].items():
        for bound in ("gain", "low", "high"):
            metrics.log_metric(f"{result['gate']['metric']}_{bound}_{dim}", interval[bound])
    metrics.log_metric("finetuned_wins", float(result["gate"]["finetuned_wins"]))
    write_metrics_file(metrics)
    shutil.copyfile(f"{evaluation.path}/evaluation.html", report.path)
    evaluation.metadata.update({"selected": result["gate"]["selected"], "reason": result["gate"]["reason"]})


@stage_component("export_model")
def export_model_component(
    evaluation: Input[Artifact],
    finetuned_model: Input[Model],
    model_export_uri: str,
    hub_model_repo: str,
    output_uri: str,
    exported: Output[Artifact],
    hf_secret_resource: str = "",
):
    """Carry out evaluate's decision: a winning model to model_export_uri (else <output_uri>/model,
    components.storage.export_targets) and hub_model_repo; the evaluation files, saying where it went, to output_uri.

    Never cached on a local run: its effects lie outside its artifact."""
    arguments = dict(locals())  # first, while the arguments are the only locals
    import shutil

    from components.common import HF_TOKEN_ENV, load_secret_into_env, read_json
    from components.evaluate import EVALUATION_SUMMARY, ExportModelSettings, copy_evaluation_files, export_winner
    from components.settings import from_arguments
    from components.storage import export_targets

    # Vertex: the Hub token comes from Secret Manager by name at run time (Kubeflow injects it as env instead).
    load_secret_into_env(hf_secret_resource, HF_TOKEN_ENV)
    settings = from_arguments(ExportModelSettings, arguments)
    targets = export_targets(output_uri=output_uri, model_export_uri=settings.model_export_uri)
    shutil.copytree(evaluation.path, exported.path, dirs_exist_ok=True)
    result = export_winner(read_json(f"{exported.path}/{EVALUATION_SUMMARY}"), finetuned_model.path, exported.path,
                           targets.model, settings.hub_model_repo)
    exported.metadata.update({"selected": result["gate"]["selected"], **result["exported"]})
    if targets.results:
        copy_evaluation_files(exported.path, targets.results)
