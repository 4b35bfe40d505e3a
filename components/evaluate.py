"""The evaluate stage: retrieval quality of the base and the finetuned model, and the export gate.

Queries are the test split's valid generated queries (`positive`); the corpus is every chunk (`anchor`) of
train and test, one entry per `chunk_id`; a query's one relevant document is its own chunk. Both models see the
same queries and corpus. Metrics are computed here, exactly, with numpy: with a single relevant document at rank
r, NDCG@k = 1/log2(r+1), MRR@k = 1/r and Recall@k = 1 when r <= k, else 0, averaged over queries. Ties are ranked
pessimistically (a document scoring the same as the relevant one counts as ahead of it). Each Matryoshka dimension
is measured by truncating the full embeddings to that many components and renormalising.

The gate: the finetuned model is exported only when its NDCG@10 at the full dimension beats the base model's by at
least `min_improvement`; otherwise the base model stays the result and the report says so.
"""

import base64
import os
import shutil
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
    valid_pairs,
    write_json,
)
from components.settings import setting
from components.storage import export_model, write_results

log = get_logger("evaluate")

CUTOFFS = (1, 5, 10)
METRICS = ("ndcg@10", "mrr@10", "recall@1", "recall@5", "recall@10")
GATE_METRIC = "ndcg@10"
DEFAULT_MIN_IMPROVEMENT = 0.01


@dataclass(frozen=True)
class EvaluateSettings:
    """The export gate and where a winning finetuned model goes."""

    min_improvement: float = setting(DEFAULT_MIN_IMPROVEMENT, "export the finetuned model only if its NDCG@10 at full "
                                     "dimension beats the base by this", minimum=-1.0, maximum=1.0)
    model_export_uri: str = setting("", "where a winning finetuned model goes (folder or gs://...; a local run's "
                                    "default is OUTPUT_DIR/model)")
    hub_model_repo: str = setting("", f"also push a winning model to this Hub repo ({HF_TOKEN_ENV} from the env)")


# --- the metrics --------------------------------------------------------------------------------------------


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


def retrieval_metrics(scores, relevant) -> dict[str, float]:
    """NDCG@10, MRR@10, Recall@1/5/10 for one relevant document per query."""
    import numpy as np

    ranks = relevant_ranks(scores, relevant)
    if len(ranks) == 0:
        raise StageError("No queries to evaluate.")
    top10 = ranks <= 10
    metrics = {
        "ndcg@10": float(np.mean(np.where(top10, 1.0 / np.log2(ranks + 1), 0.0))),
        "mrr@10": float(np.mean(np.where(top10, 1.0 / ranks, 0.0))),
    }
    for k in CUTOFFS:
        metrics[f"recall@{k}"] = float(np.mean(ranks <= k))
    return metrics


def truncate_normalise(vectors, dimension: int):
    """The first `dimension` components, renormalised to unit length (Matryoshka truncation)."""
    import numpy as np

    cut = np.asarray(vectors, dtype=np.float64)[:, :dimension]
    norms = np.linalg.norm(cut, axis=1, keepdims=True)
    return cut / np.where(norms == 0, 1.0, norms)


def metrics_by_dimension(query_vectors, document_vectors, relevant, dims) -> dict[str, dict[str, float]]:
    return {str(dim): retrieval_metrics(truncate_normalise(query_vectors, dim) @ truncate_normalise(document_vectors, dim).T,
                                        relevant) for dim in dims}


# --- queries, corpus, models --------------------------------------------------------------------------------


def evaluation_set(frames: dict[str, Any]) -> tuple[list[str], list[str], list[int], dict[str, int]]:
    """(queries, corpus documents, index of each query's own chunk in the corpus, counts)."""
    corpus_ids: dict[str, int] = {}
    documents: list[str] = []
    for split in ("train", "test"):
        frame = frames[split]
        if CHUNK_ID not in frame.columns:
            raise StageError(f"The {split} split has no '{CHUNK_ID}' column; it comes from load_docs.")
        for chunk_id, anchor in zip(frame[CHUNK_ID], frame[ANCHOR]):
            if chunk_id not in corpus_ids:
                corpus_ids[chunk_id] = len(documents)
                documents.append(anchor)
    test = valid_pairs(frames["test"])
    queries = list(test[POSITIVE])
    relevant = [corpus_ids[chunk_id] for chunk_id in test[CHUNK_ID]]
    counts = {"queries": len(queries), "test_rows": int(len(frames["test"])), "corpus": len(documents)}
    if not queries:
        raise StageError(f"The test split has no valid queries (of {len(frames['test'])} rows, all failed or empty); "
                         "nothing to evaluate. Generate queries for the test split.")
    return queries, documents, relevant, counts


def encode(model, texts: list[str], prompt: str, batch_size: int):
    import numpy as np

    vectors = model.encode(texts, prompt=prompt or None, batch_size=batch_size, convert_to_numpy=True,
                           normalize_embeddings=False, show_progress_bar=False)
    return np.asarray(vectors, dtype=np.float32)


def evaluate_model(model_path: str, queries: list[str], documents: list[str], relevant: list[int],
                   dims: list[int] | None = None, batch_size: int = 64) -> dict[str, Any]:
    """Encode with the model's own query/document prompts (if any) and measure every dimension (default: the
    model's Matryoshka dimensions)."""
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_path, device="cuda" if torch.cuda.is_available() else "cpu")
    full = int(model.get_embedding_dimension())
    usable = [dim for dim in (dims or matryoshka_dims(full)) if dim <= full]
    query_prompt = model_prompt(model, *QUERY_PROMPT_NAMES)
    document_prompt = model_prompt(model, *DOCUMENT_PROMPT_NAMES)
    query_vectors = encode(model, queries, query_prompt, batch_size)
    document_vectors = encode(model, documents, document_prompt, batch_size)
    return {"dimension": full, "query_prompt": query_prompt, "document_prompt": document_prompt,
            "metrics": metrics_by_dimension(query_vectors, document_vectors, relevant, usable)}


# --- the gate and the export --------------------------------------------------------------------------------


def gate(base: dict[str, Any], finetuned: dict[str, Any], min_improvement: float) -> dict[str, Any]:
    """Decide which model is the result: the finetuned one only when it wins by at least min_improvement."""
    full = str(finetuned["dimension"])
    if str(base["dimension"]) != full:
        raise StageError(f"The base model has {base['dimension']} dimensions and the finetuned one {full}; they "
                         "must be the same model family.")
    base_score = base["metrics"][full][GATE_METRIC]
    tuned_score = finetuned["metrics"][full][GATE_METRIC]
    improvement = tuned_score - base_score
    wins = improvement > 0 and improvement >= min_improvement
    if wins:
        reason = (f"The finetuned model wins: {GATE_METRIC} at {full} dimensions {tuned_score:.4f} vs base "
                  f"{base_score:.4f} (+{improvement:.4f} >= {min_improvement}); it is exported.")
    else:
        reason = (f"The finetuned model does NOT beat the base model by the required {min_improvement}: {GATE_METRIC} "
                  f"at {full} dimensions {tuned_score:.4f} vs base {base_score:.4f} ({improvement:+.4f}). It is not "
                  "exported; the base model stays the result.")
    return {"metric": GATE_METRIC, "dimension": int(full), "base": base_score, "finetuned": tuned_score,
            "improvement": improvement, "min_improvement": min_improvement, "finetuned_wins": wins,
            "selected": "finetuned" if wins else "base", "reason": reason}


def push_to_hub(folder: str | os.PathLike, repo_id: str, token: str) -> str:
    """Upload the model folder to a Hub model repo (the token comes from the environment only)."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", exist_ok=True, private=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                      commit_message="Finetuned by docs-to-embeddings")
    return f"https://huggingface.co/{repo_id}"


# --- the report ---------------------------------------------------------------------------------------------


def table_markdown(evaluation: dict[str, Any]) -> str:
    lines = ["| dim | " + " | ".join(f"{metric} base | {metric} finetuned" for metric in METRICS) + " |",
             "|---:|" + "---:|" * (2 * len(METRICS))]
    base, tuned = evaluation["models"]["base"]["metrics"], evaluation["models"]["finetuned"]["metrics"]
    for dim in map(str, evaluation["dims"]):
        cells = [f"{base[dim][metric]:.4f} | {tuned[dim][metric]:.4f}" for metric in METRICS]
        lines.append(f"| {dim} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_table(evaluation: dict[str, Any]) -> str:
    """The before/after table for a terminal."""
    base, tuned = evaluation["models"]["base"]["metrics"], evaluation["models"]["finetuned"]["metrics"]
    header = f"{'dim':>5} {'model':<10}" + "".join(f"{metric:>11}" for metric in METRICS)
    rows = [header]
    for dim in map(str, evaluation["dims"]):
        for name, values in (("base", base[dim]), ("finetuned", tuned[dim])):
            rows.append(f"{dim:>5} {name:<10}" + "".join(f"{values[metric]:>11.4f}" for metric in METRICS))
    return "\n".join(rows)


def plot(evaluation: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base, tuned = evaluation["models"]["base"]["metrics"], evaluation["models"]["finetuned"]["metrics"]
    dims = [str(dim) for dim in evaluation["dims"]]
    figure, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for axis, metric in zip(axes, ("ndcg@10", "mrr@10", "recall@10")):
        axis.plot(range(len(dims)), [base[d][metric] for d in dims], "o-", label="base")
        axis.plot(range(len(dims)), [tuned[d][metric] for d in dims], "s-", label="finetuned")
        axis.set_xticks(range(len(dims)), dims)
        axis.set_xlabel("embedding dimension")
        axis.set_title(metric)
        axis.set_ylim(0, 1)
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def write_report(evaluation: dict[str, Any], output_dir: Path) -> None:
    plot(evaluation, output_dir / "evaluation.png")
    counts = evaluation["counts"]
    summary = (f"{counts['queries']} queries (valid test rows of {counts['test_rows']}) against a corpus of "
               f"{counts['corpus']} chunks (train and test). Base model: {evaluation['models']['base']['name']}.")
    decision = evaluation["gate"]["reason"]
    exported = evaluation.get("exported") or {}
    where = ", ".join(f"{key}: {value}" for key, value in exported.items())
    markdown = (f"# Retrieval evaluation: base vs finetuned\n\n{summary}\n\n**{decision}**"
                + (f" Exported to {where}." if where else "") + "\n\n" + table_markdown(evaluation)
                + "\n\n![base vs finetuned per dimension](evaluation.png)\n")
    (output_dir / "evaluation.md").write_text(markdown)
    image = base64.b64encode((output_dir / "evaluation.png").read_bytes()).decode()
    html_table = _markdown_table_to_html(table_markdown(evaluation))
    html = (f"<html><head><meta charset='utf-8'><title>Evaluation</title><style>body{{font-family:sans-serif}}"
            f"td,th{{padding:2px 6px;text-align:right}}</style></head><body><h2>Retrieval evaluation: base vs "
            f"finetuned</h2><p>{_escape(summary)}</p><p><b>{_escape(decision)}</b>"
            + (f" Exported to {_escape(where)}." if where else "")
            + f"</p>{html_table}<img src='data:image/png;base64,{image}' alt='base vs finetuned'></body></html>")
    (output_dir / "evaluation.html").write_text(html)


def _escape(text: str) -> str:
    import html

    return html.escape(text)


def _markdown_table_to_html(table: str) -> str:
    rows = [line.strip("|").split("|") for line in table.splitlines() if not line.startswith("|---")]
    head = "".join(f"<th>{_escape(cell.strip())}</th>" for cell in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{_escape(cell.strip())}</td>" for cell in row) + "</tr>" for row in rows[1:])
    return f"<table border='1' cellspacing='0'><tr>{head}</tr>{body}</table>"


# --- the stage ----------------------------------------------------------------------------------------------


def evaluate(
    scored_dir: str | os.PathLike,
    finetuned_model_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    base_model: str,
    min_improvement: float = DEFAULT_MIN_IMPROVEMENT,
    model_export_uri: str = "",
    hub_model_repo: str = "",
    batch_size: int = 64,
) -> dict[str, Any]:
    """Evaluate base and finetuned on the same queries and corpus, gate, export; write evaluation.* files."""
    if not Path(finetuned_model_dir, "config_sentence_transformers.json").exists() and not Path(
            finetuned_model_dir, "modules.json").exists():
        raise StageError(f"{finetuned_model_dir} holds no saved SentenceTransformer model; was finetune run?")
    queries, documents, relevant, counts = evaluation_set(read_splits(scored_dir))
    base_path, base_label = resolve_embedding_model(base_model)
    log.info("evaluating on %d queries against %d chunks", counts["queries"], counts["corpus"])
    finetuned = evaluate_model(str(finetuned_model_dir), queries, documents, relevant, batch_size=batch_size)
    dims = [int(dim) for dim in finetuned["metrics"]]
    base = evaluate_model(base_path, queries, documents, relevant, dims, batch_size)
    base["name"], finetuned["name"] = base_label, str(finetuned_model_dir)
    decision = gate(base, finetuned, min_improvement)
    evaluation: dict[str, Any] = {"counts": counts, "dims": dims, "metrics": list(METRICS),
                                  "models": {"base": base, "finetuned": finetuned}, "gate": decision, "exported": {}}
    if decision["finetuned_wins"]:
        if model_export_uri:
            evaluation["exported"]["model_uri"] = export_model(finetuned_model_dir, model_export_uri)
        if hub_model_repo:
            token = os.environ.get(HF_TOKEN_ENV, "")
            if not token:
                raise StageError(f"hub_model_repo={hub_model_repo!r} is set but {HF_TOKEN_ENV} is not in the "
                                 "environment; mount the Hub token as a secret.")
            evaluation["exported"]["hub"] = push_to_hub(finetuned_model_dir, hub_model_repo, token)
        evaluation["result_model"] = evaluation["exported"].get("model_uri", str(finetuned_model_dir))
    else:
        evaluation["result_model"] = base_label
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json(output_dir / EVALUATION_SUMMARY, evaluation)
    write_report(evaluation, output_dir)
    log.info("%s\n%s", decision["reason"], format_table(evaluation))
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
    model_export_uri: str,
    hub_model_repo: str,
    output_uri: str,
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    report: Output[HTML],
):
    """Base vs finetuned retrieval metrics per Matryoshka dimension; export the finetuned model only if it wins.

    The model goes to model_export_uri, else to <output_uri>/model (components.storage.export_targets).
    """

    from components.evaluate import EvaluateSettings, copy_evaluation_files, evaluate
    from components.settings import from_arguments
    from components.storage import export_targets

    settings = from_arguments(EvaluateSettings, locals())
    targets = export_targets(output_uri=output_uri, model_export_uri=settings.model_export_uri)
    result = evaluate(scored.path, finetuned_model.path, evaluation.path, base_model,
                      min_improvement=settings.min_improvement, model_export_uri=targets.model,
                      hub_model_repo=settings.hub_model_repo)
    for model_name, model in result["models"].items():
        for dim, values in model["metrics"].items():
            for metric, value in values.items():
                metrics.log_metric(f"{model_name}_{dim}_{metric}", value)
    metrics.log_metric("finetuned_wins", float(result["gate"]["finetuned_wins"]))
    shutil.copyfile(f"{evaluation.path}/evaluation.html", report.path)
    evaluation.metadata.update({"selected": result["gate"]["selected"], "reason": result["gate"]["reason"]})
    if targets.results:
        copy_evaluation_files(evaluation.path, targets.results)
