"""Stage 6, publish: the scored dataset to Argilla (review), the Hugging Face Hub (reuse) and object storage.

Each target is optional: an empty URL / repo / URI skips it with one log line. Secrets come from the
environment only (ARGILLA_API_KEY, HF_TOKEN; Kubernetes secrets in the cluster), never from parameters.

Decisions:
- Argilla record ids are `<split>-<chunk_id>` (chunk_id hashes the anchor text), so re-publishing the same
  chunks updates their records instead of adding duplicates, and never touches records of other chunks.
- Rows whose generation failed are published too (reviewers must see them): their `positive`/`negative`
  suggestions are left out, and similarity metadata that is NaN is left out (Argilla rejects NaN), so they show
  up with empty questions and no similarity values.
- A record the server rejects is reported (id + reason in the summary and the log) and the rest are kept.
"""

import datetime
import hashlib
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from kfp.dsl import Artifact, Dataset, Input, Output

from components.common import (
    ANCHOR,
    ANCHOR_VECTOR,
    MODEL_NAME,
    NEGATIVE,
    OUTPUT_COLUMNS,
    POSITIVE,
    SIM_ANCHOR_NEG,
    SIM_ANCHOR_POS,
    SIM_POS_NEG,
    SPLITS,
    StageError,
    get_logger,
    read_json,
    read_splits,
    stage_component,
)
from components.settings import setting

log = get_logger("publish")

DEFAULT_ARGILLA_DATASET = "docs-to-embeddings"
ARGILLA_API_KEY_ENV = "ARGILLA_API_KEY"
HF_TOKEN_ENV = "HF_TOKEN"
SIMILARITIES = (SIM_POS_NEG, SIM_ANCHOR_POS, SIM_ANCHOR_NEG)
REPORT_FILES = ("report.html", "report.md", "similarity_histograms.png", "metrics.json", "stats.json")
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class PublishSettings:
    """Where the scored dataset is published; an empty URL, repo or URI skips that target."""

    argilla_url: str = setting("", f"Argilla server to publish to ({ARGILLA_API_KEY_ENV} from the env); a local run "
                               "starts its own unless --no-argilla")
    argilla_dataset: str = setting(DEFAULT_ARGILLA_DATASET, "Argilla dataset name")
    argilla_workspace: str = setting("", "Argilla workspace (empty: the server's default)")
    hub_repo: str = setting("", f"Hugging Face dataset repo to push to ({HF_TOKEN_ENV} from the env); empty: skip")
    hub_private: bool = setting(True, "make the Hub repo private")
    export_uri: str = setting("", "gs:// prefix that also receives parquet, report and manifest (create-only; "
                              "Google credentials from the env); empty: skip")


def load_frames(scored_dir: "str | os.PathLike") -> dict[str, Any]:
    """The scored splits with the published columns first; a missing column says which stage to run."""
    frames = read_splits(scored_dir)
    for split, frame in frames.items():
        missing = [c for c in (*OUTPUT_COLUMNS, "chunk_id") if c not in frame.columns]
        if missing:
            raise StageError(f"The scored {split} split lacks columns {missing}; was embed_score run on it?")
        extra = [c for c in frame.columns if c not in OUTPUT_COLUMNS]
        frames[split] = frame[[*OUTPUT_COLUMNS, *extra]].reset_index(drop=True)
    return frames


def vector_dimension(frames: dict[str, Any]) -> int:
    """The embedding dimension, read from the data (the first non-empty anchor vector)."""
    for frame in frames.values():
        for vector in frame[ANCHOR_VECTOR]:
            if vector is not None and len(vector):
                return len(vector)
    raise StageError("No row has an anchor vector; embed_score must run before publish.")


# ----------------------------------------------------------------------------------------------- Argilla


def argilla_settings(dimension: int):
    import argilla as rg

    return rg.Settings(
        fields=[rg.TextField(name=ANCHOR)],
        questions=[rg.TextQuestion(name=POSITIVE), rg.TextQuestion(name=NEGATIVE)],
        metadata=[
            rg.TermsMetadataProperty(name="parent_section"),
            rg.TermsMetadataProperty(name="split"),
            rg.IntegerMetadataProperty(name="token_count"),
            *(rg.FloatMetadataProperty(name=name) for name in SIMILARITIES),
        ],
        vectors=[rg.VectorField(name=ANCHOR_VECTOR, dimensions=dimension)],
    )


def describe_settings(settings) -> dict[str, dict[str, str]]:
    """What must match for records to fit: names and kinds of fields, questions, metadata, vector dimensions."""
    def kind(prop) -> str:
        return type(prop).__name__

    return {
        "fields": {f.name: kind(f) for f in settings.fields},
        "questions": {q.name: kind(q) for q in settings.questions},
        "metadata": {m.name: kind(m) for m in settings.metadata},
        "vectors": {v.name: f"{kind(v)}({v.dimensions})" for v in settings.vectors},
    }


def settings_differences(wanted, existing) -> list[str]:
    wanted_d, existing_d = describe_settings(wanted), describe_settings(existing)
    differences = []
    for section, items in wanted_d.items():
        have = existing_d.get(section, {})
        for name in sorted(set(items) | set(have)):
            if items.get(name) != have.get(name):
                differences.append(f"{section} {name!r}: existing {have.get(name) or 'absent'}, "
                                   f"wanted {items.get(name) or 'absent'}")
    return differences


def _finite(value: Any) -> Optional[float]:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _text(value: Any) -> Optional[str]:
    return value if isinstance(value, str) and value.strip() else None


def suggestion_agent(model_name: Any) -> str:
    """The model's name as Argilla accepts agents: letters, digits and `-_:./ ` only (no parentheses)."""
    agent = re.sub(r"[^a-zA-Z0-9\-_:./\s]+", " ", str(model_name or "")).strip()
    agent = re.sub(r"\s+", " ", agent)
    return agent or "unknown-model"


def record_id(split: str, chunk_id: str) -> str:
    return f"{split}-{chunk_id}"


def build_records(frames: dict[str, Any]) -> list:
    """One Argilla record per row of both splits; failed rows get no suggestions and no NaN metadata."""
    import argilla as rg

    records = []
    for split, frame in frames.items():
        for row in frame.to_dict("records"):
            metadata: dict[str, Any] = {"split": split}
            if _text(row.get("parent_section")):
                metadata["parent_section"] = row["parent_section"]
            if row.get("token_count") is not None:
                metadata["token_count"] = int(row["token_count"])
            for name in SIMILARITIES:
                value = _finite(row.get(name))
                if value is not None:
                    metadata[name] = value
            agent = suggestion_agent(row.get(MODEL_NAME))
            suggestions = [rg.Suggestion(question_name=question, value=row[question], agent=agent)
                           for question in (POSITIVE, NEGATIVE) if _text(row.get(question))]
            vector = row.get(ANCHOR_VECTOR)
            vectors = {ANCHOR_VECTOR: [float(x) for x in vector]} if vector is not None and len(vector) else {}
            records.append(rg.Record(id=record_id(split, row["chunk_id"]), fields={ANCHOR: row[ANCHOR]},
                                     metadata=metadata, suggestions=suggestions, vectors=vectors))
    return records


def _error_text(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text if len(text) <= 500 else text[:500] + " ..."


def log_records(dataset, records: list, batch_size: int) -> tuple[int, list[dict[str, str]]]:
    """Log records batch by batch; a rejected batch is retried record by record so one bad record costs only itself."""
    logged, rejected = 0, []
    for start in range(0, len(records), batch_size):
        batch = records[start:start + batch_size]
        try:
            dataset.records.log(batch, batch_size=batch_size)
            logged += len(batch)
            continue
        except Exception as error:  # noqa: BLE001 - the server's reason is reported per record below
            log.warning("a batch of %d records was rejected (%s); retrying one by one", len(batch), _error_text(error))
        for record in batch:
            try:
                dataset.records.log([record])
                logged += 1
            except Exception as error:  # noqa: BLE001
                rejected.append({"id": str(record.id), "error": _error_text(error)})
                log.error("record %s rejected: %s", record.id, _error_text(error))
    return logged, rejected


def publish_to_argilla(
    frames: dict[str, Any],
    api_url: str,
    api_key: str,
    dataset_name: str = DEFAULT_ARGILLA_DATASET,
    workspace: str = "",
    batch_size: int = 256,
) -> dict[str, Any]:
    """Create (or reuse, if its settings match) the Argilla dataset and upsert one record per row."""
    import argilla as rg

    if not api_key:
        raise StageError(f"Publishing to Argilla at {api_url} needs an API key in the {ARGILLA_API_KEY_ENV} "
                         "environment variable (a Kubernetes secret in the cluster).")
    client = rg.Argilla(api_url=api_url, api_key=api_key)
    settings = argilla_settings(vector_dimension(frames))
    existing = client.datasets(name=dataset_name, workspace=workspace or None)
    if existing is not None:
        differences = settings_differences(settings, existing.settings)
        if differences:
            raise StageError(
                f"The Argilla dataset {dataset_name!r} at {api_url} exists with different settings: "
                + "; ".join(differences)
                + ". Publish under a new name (--argilla-dataset / argilla_dataset) or delete that dataset first "
                "(rg.Argilla(...).datasets(name=...).delete()).")
        dataset = existing
        log.info("updating the existing Argilla dataset %r", dataset_name)
    else:
        dataset = rg.Dataset(name=dataset_name, workspace=workspace or None, settings=settings, client=client)
        dataset.create()
        log.info("created the Argilla dataset %r", dataset_name)
    records = build_records(frames)
    logged, rejected = log_records(dataset, records, batch_size)
    if records and not logged:
        raise StageError(f"Argilla rejected all {len(records)} records; first reason: {rejected[0]['error']}")
    summary = {"url": api_url, "dataset": dataset_name, "workspace": dataset.workspace.name,
               "records": logged, "rejected": rejected,
               "rows": {split: len(frame) for split, frame in frames.items()}}
    log.info("Argilla: %d records logged into %r at %s, %d rejected", logged, dataset_name, api_url, len(rejected))
    return summary


# ------------------------------------------------------------------------------------------ Hugging Face Hub


def _similarity_table(embed_stats: dict) -> list[str]:
    lines = ["| split | rows | " + " | ".join(f"mean {name}" for name in SIMILARITIES) + " |",
             "| --- | --- | " + " | ".join("---" for _ in SIMILARITIES) + " |"]
    for split, stats in sorted(embed_stats.get("splits", {}).items()):
        means = []
        for name in SIMILARITIES:
            mean = (stats.get(name) or {}).get("mean")
            means.append("n/a" if mean is None else f"{mean:.4f}")
        lines.append(f"| {split} | {stats.get('rows', '?')} | " + " | ".join(means) + " |")
    return lines


def dataset_card(repo_id: str, frames: dict[str, Any], stats: dict, metrics: dict, run_id: str) -> str:
    """The README.md of the Hub dataset: what it is and exactly how it was made."""
    load, generation, embed = stats.get("load_docs", {}), stats.get("generate_queries", {}), stats.get("embed_score", {})
    settings = generation.get("settings", {})
    context = settings.get("context", "")
    failure_rate = generation.get("failure_rate", metrics.get("generation_failure_rate"))
    counts = " | ".join(f"{split}: {len(frame)}" for split, frame in frames.items())
    llm_settings = {k: v for k, v in settings.items() if k not in ("context", "cache")}
    lines = [
        "---",
        "task_categories:",
        "- sentence-similarity",
        "tags:",
        "- embeddings",
        "- synthetic",
        "- docs-to-embeddings",
        "---",
        "",
        f"# {repo_id}",
        "",
        "Synthetic (anchor, positive, negative) triplets for fine-tuning embedding models: each anchor is a "
        "documentation chunk, `positive` a query it answers and `negative` a query it does not, written by an LLM "
        "and scored with an embedding model. Made by the docs-to-embeddings Kubeflow pipeline.",
        "",
        "## Provenance",
        "",
        f"- **Source dataset:** {load.get('source', 'unknown')} ({load.get('source_kind', 'unknown')})",
        f"- **LLM:** {generation.get('llm', 'unknown')} (provider: {generation.get('provider', 'unknown')})",
        f"- **LLM settings:** `{json.dumps(llm_settings, sort_keys=True)}`",
        f"- **Context prompt:** {context}",
        f"- **Embedding model:** {embed.get('embedding_model', 'unknown')} (dimension {embed.get('dimension', '?')})",
        f"- **Pipeline run:** {run_id or 'unknown'}",
        "",
        "## Counts",
        "",
        f"- **Rows:** {counts}",
        f"- **Generation:** {generation.get('generated', 0)} generated, {generation.get('cached', 0)} from cache, "
        f"{generation.get('failed', 0)} failed",
        f"- **Failure rate:** {failure_rate}",
        "",
        "Rows whose generation failed are kept with empty `positive`/`negative` and NaN similarities "
        "(`generation_status` says which); drop them before training.",
        "",
        "## Similarity statistics",
        "",
        *_similarity_table(embed),
        "",
    ]
    return "\n".join(lines)


def read_report_stats(report_dir: "str | os.PathLike") -> tuple[dict, dict]:
    report_dir = Path(report_dir)
    for name in ("stats.json", "metrics.json"):
        if not (report_dir / name).exists():
            raise StageError(f"The report files lack {name} (expected in {report_dir}); was the report stage run?")
    return read_json(report_dir / "stats.json"), read_json(report_dir / "metrics.json")


def publish_to_hub(
    frames: dict[str, Any], report_dir: "str | os.PathLike", repo_id: str, token: str, private: bool = True,
    run_id: str = "",
) -> dict[str, Any]:
    """Push DatasetDict(train, test) to `repo_id`, then its dataset card (README.md)."""
    from datasets import Dataset, DatasetDict
    from huggingface_hub import HfApi

    if not token:
        raise StageError(f"Pushing to the Hub repo {repo_id} needs a token in the {HF_TOKEN_ENV} environment "
                         "variable (a Kubernetes secret in the cluster).")
    stats, metrics = read_report_stats(report_dir)
    # Vectors as plain float lists so the Hub's parquet has a list<float> column, not numpy objects.
    dataset = DatasetDict({
        split: Dataset.from_pandas(frame.assign(**{ANCHOR_VECTOR: frame[ANCHOR_VECTOR].map(
            lambda v: None if v is None else [float(x) for x in v])}), preserve_index=False)
        for split, frame in frames.items()
    })
    dataset.push_to_hub(repo_id, private=private, token=token)
    card = dataset_card(repo_id, frames, stats, metrics, run_id)
    HfApi(token=token).upload_file(path_or_fileobj=card.encode(), path_in_repo="README.md", repo_id=repo_id,
                                   repo_type="dataset", commit_message="Dataset card: provenance of this export")
    log.info("Hub: pushed %s to %s (%s)", {s: len(f) for s, f in frames.items()}, repo_id,
             "private" if private else "public")
    return {"repo_id": repo_id, "private": private, "rows": {split: len(frame) for split, frame in frames.items()}}


# ------------------------------------------------------------------------------------------ object storage


def parse_gs_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("gs://") or len(uri) <= 5:
        raise StageError(f"Export URI {uri!r} must look like gs://BUCKET/PREFIX.")
    bucket, _, prefix = uri[5:].partition("/")
    if not bucket:
        raise StageError(f"Export URI {uri!r} has no bucket name.")
    return bucket, prefix.strip("/")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _upload_create_only(bucket, name: str, path: Path, sha256: str, run_id: str, content_type: str) -> str:
    """Upload unless the object exists; an existing identical object of the same run is fine (a retry)."""
    from google.api_core.exceptions import PreconditionFailed

    blob = bucket.blob(name)
    blob.metadata = {"sha256": sha256, "run_id": run_id}
    try:
        blob.upload_from_filename(str(path), content_type=content_type, if_generation_match=0)
        return "written"
    except PreconditionFailed:
        existing = bucket.get_blob(name)
        meta = (existing.metadata or {}) if existing is not None else {}
        if meta.get("run_id") == run_id and meta.get("sha256") == sha256:
            return "already there"
        raise StageError(
            f"gs://{bucket.name}/{name} already exists from run {meta.get('run_id') or 'unknown'} "
            f"(this run: {run_id}) and differs; exports are never overwritten. Choose another --export-uri / "
            "export_uri prefix, or delete the old export first.") from None


def export_to_gcs(
    frames: dict[str, Any], report_dir: "str | os.PathLike", uri: str, run_id: str, client=None,
) -> dict[str, Any]:
    """Write parquet per split, the report files, then the manifest (last) under a gs:// prefix, create-only."""
    if not run_id:
        raise StageError("Export to object storage needs a run id (the pipeline passes its job id).")
    bucket_name, prefix = parse_gs_uri(uri)
    if client is None:
        from google.cloud import storage

        client = storage.Client()
    bucket = client.bucket(bucket_name)

    def object_name(name: str) -> str:
        return f"{prefix}/{name}" if prefix else name

    manifest_blob = bucket.get_blob(object_name(MANIFEST_NAME))
    if manifest_blob is not None:
        existing = json.loads(manifest_blob.download_as_bytes())
        if existing.get("run_id") != run_id:
            raise StageError(f"{uri} already holds the complete export of run {existing.get('run_id')}; "
                             "exports are never overwritten. Choose another export prefix.")
        log.info("GCS: %s already holds this run's complete export", uri)
        return existing

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files: list[tuple[str, Path, str]] = []
        for split, frame in frames.items():
            path = tmp / f"{split}.parquet"
            frame.to_parquet(path, index=False)
            files.append((path.name, path, "application/vnd.apache.parquet"))
        for name in REPORT_FILES:
            source = Path(report_dir) / name
            if source.exists():
                kind = {".html": "text/html", ".md": "text/markdown", ".png": "image/png"}.get(source.suffix,
                                                                                             "application/json")
                files.append((name, source, kind))
        objects = {}
        for name, path, content_type in files:
            sha256 = sha256_file(path)
            outcome = _upload_create_only(bucket, object_name(name), path, sha256, run_id, content_type)
            objects[name] = {"sha256": sha256, "bytes": path.stat().st_size}
            log.info("GCS: %s %s", object_name(name), outcome)
        manifest = {
            "run_id": run_id,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "uri": uri,
            "counts": {split: len(frame) for split, frame in frames.items()},
            "objects": objects,
        }
        manifest_path = tmp / MANIFEST_NAME
        manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True))
        # Last, so a reader that finds the manifest finds a complete export.
        _upload_create_only(bucket, object_name(MANIFEST_NAME), manifest_path, sha256_file(manifest_path), run_id,
                            "application/json")
    log.info("GCS: exported %s and the report to %s (manifest last)", manifest["counts"], uri)
    return manifest


# ------------------------------------------------------------------------------------------ the stage


def publish(
    scored_dir: "str | os.PathLike",
    report_dir: "str | os.PathLike",
    argilla_url: str = "",
    argilla_dataset: str = DEFAULT_ARGILLA_DATASET,
    argilla_workspace: str = "",
    hub_repo: str = "",
    hub_private: bool = True,
    export_uri: str = "",
    run_id: str = "",
) -> dict[str, Any]:
    """Publish to each configured target; return a summary per target (None where skipped)."""
    frames = load_frames(scored_dir)
    summary: dict[str, Any] = {"run_id": run_id, "argilla": None, "hub": None, "gcs": None}
    if argilla_url:
        summary["argilla"] = publish_to_argilla(frames, argilla_url, os.environ.get(ARGILLA_API_KEY_ENV, ""),
                                                argilla_dataset, argilla_workspace)
    else:
        log.info("Argilla: skipped (no argilla_url configured)")
    if hub_repo:
        summary["hub"] = publish_to_hub(frames, report_dir, hub_repo, os.environ.get(HF_TOKEN_ENV, ""),
                                        hub_private, run_id)
    else:
        log.info("Hugging Face Hub: skipped (no hub_repo configured)")
    if export_uri:
        summary["gcs"] = export_to_gcs(frames, report_dir, export_uri, run_id)
    else:
        log.info("Object storage: skipped (no export_uri configured)")
    return summary


@stage_component("publish")
def publish_component(
    scored: Input[Dataset],
    report_files: Input[Artifact],
    argilla_url: str,
    argilla_dataset: str,
    argilla_workspace: str,
    hub_repo: str,
    hub_private: bool,
    export_uri: str,
    run_id: str,
    published: Output[Artifact],
):
    """Publish the scored dataset to Argilla, the Hugging Face Hub and a gs:// prefix, each when configured."""
    from components.common import write_json
    from components.publish import PublishSettings, publish
    from components.settings import as_dict, from_arguments

    settings = from_arguments(PublishSettings, locals())
    summary = publish(scored.path, report_files.path, run_id=run_id, **as_dict(settings))
    write_json(f"{published.path}/publish.json", summary)
    if summary["argilla"]:
        published.metadata["argilla_records"] = summary["argilla"]["records"]
        published.metadata["argilla_rejected"] = len(summary["argilla"]["rejected"])
    for target in ("argilla", "hub", "gcs"):
        published.metadata[f"{target}_published"] = summary[target] is not None
