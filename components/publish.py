"""The publish stage: the scored dataset to Argilla (review), the Hugging Face Hub (reuse) and object storage.

Each target is optional: an empty URL / repo / URI skips it with one log line. Secrets come from the
environment only (ARGILLA_API_KEY, HF_TOKEN: Kubernetes secrets on Kubeflow, read from Secret Manager by the
component on Vertex), never from parameters.

Decisions:
- Argilla record ids are `<split>-<chunk_id>-<query_style>-<query_variant>` (chunk_id hashes the anchor text;
  `<split>-<chunk_id>` for data without query styles), so re-publishing the same queries updates their records
  instead of adding duplicates, a chunk's several queries are several records, and records of other chunks are
  never touched.
- Every row is a record, also rows the filters dropped: `filter_status` (terms; the round-trip rank is cut off so
  the filter lists a few classes, not one term per rank), `roundtrip_rank` (integer, absent where null) and
  `query_style` are metadata, so reviewers filter on them. The mined hard negatives are a Markdown field, numbered,
  each chunk quoted. Data without these columns gets records without them; the dataset settings are the same.
- Rows whose generation failed are published too (reviewers must see them): their `positive`/`negative`
  suggestions are left out, and similarity metadata that is NaN is left out (Argilla rejects NaN), so they show
  up with empty questions and no similarity values.
- A record the server rejects is reported (id + reason in the summary and the log) and the rest are kept.
"""

import math
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Any, Optional

from kfp.dsl import Artifact, Dataset, Input, Output

from components.common import (
    ANCHOR,
    ANCHOR_VECTOR,
    ARGILLA_API_KEY_ENV,
    FILTER_STATUS,
    HARD_NEGATIVE_IDS,
    HARD_NEGATIVES,
    HF_TOKEN_ENV,
    MODEL_NAME,
    NEGATIVE,
    OUTPUT_COLUMNS,
    POSITIVE,
    QUERY_STYLE,
    QUERY_VARIANT,
    ROUNDTRIP_RANK,
    SIMILARITIES,
    StageError,
    dataset_files,
    get_logger,
    read_splits,
    stage_component,
)
from components.publish_hub import publish_to_hub
from components.settings import setting
from components.storage import publish_files

log = get_logger("publish")

DEFAULT_ARGILLA_DATASET = "docs-to-embeddings"


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
    """The dataset settings: the same for every run, whichever columns the data has, so one dataset takes them all."""
    import argilla as rg

    return rg.Settings(
        fields=[rg.TextField(name=ANCHOR),
                rg.TextField(name=HARD_NEGATIVES, title="Mined hard negatives (should not answer the query)",
                             use_markdown=True, required=False)],
        questions=[rg.TextQuestion(name=POSITIVE), rg.TextQuestion(name=NEGATIVE)],
        metadata=[
            rg.TermsMetadataProperty(name="parent_section"),
            rg.TermsMetadataProperty(name="split"),
            rg.IntegerMetadataProperty(name="token_count"),
            *(rg.FloatMetadataProperty(name=name) for name in SIMILARITIES),
            rg.TermsMetadataProperty(name=FILTER_STATUS),
            rg.IntegerMetadataProperty(name=ROUNDTRIP_RANK),
            rg.TermsMetadataProperty(name=QUERY_STYLE),
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
    """One line per field, question, metadata property or vector whose name or kind differs."""
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
    try:
        value = float(value)
    except (TypeError, ValueError):  # None, pandas.NA
        return None
    return value if math.isfinite(value) else None


def _text(value: Any) -> Optional[str]:
    return value if isinstance(value, str) and value.strip() else None


def suggestion_agent(model_name: Any) -> str:
    """The model's name as Argilla accepts agents: letters, digits and `-_:./ ` only (no parentheses)."""
    agent = re.sub(r"[^a-zA-Z0-9\-_:./\s]+", " ", str(model_name or "")).strip()
    agent = re.sub(r"\s+", " ", agent)
    return agent or "unknown-model"


def record_id(split: str, chunk_id: str, style: Any = None, variant: Any = None) -> str:
    """`<split>-<chunk_id>`, plus `-<style>-<variant>` when the row has a query style (several queries a chunk)."""
    if not _text(style):
        return f"{split}-{chunk_id}"
    number = _finite(variant)
    return f"{split}-{chunk_id}-{style}-{int(number) if number is not None else 0}"


def filter_term(status: Any) -> str | None:
    """filter_status as an Argilla term: "dropped: roundtrip rank 14" -> "dropped: roundtrip rank" (the rank is
    the roundtrip_rank metadata), other statuses unchanged; None for a missing status."""
    return re.sub(r"\s+\d+$", "", status.strip()) if _text(status) else None


def hard_negatives_markdown(texts: Any, ids: Any = None) -> str | None:
    """The mined hard negatives as a numbered Markdown list, each chunk quoted (its own headings and code stay
    inside its quote) under its number and chunk id; None when there are none."""
    if texts is None or isinstance(texts, float) or not len(texts):
        return None
    ids = list(ids) if ids is not None and not isinstance(ids, float) else []
    parts = []
    for number, text in enumerate(texts, start=1):
        label = f"**{number}.**" + (f" `{ids[number - 1]}`" if number <= len(ids) else "")
        quoted = "\n".join(f"> {line}" if line.strip() else ">" for line in str(text).splitlines())
        parts.append(f"{label}\n\n{quoted}")
    return "\n\n".join(parts)


def record_metadata(split: str, row: dict[str, Any]) -> dict[str, Any]:
    """A row's metadata; missing, NaN and null values are left out (Argilla rejects NaN)."""
    metadata: dict[str, Any] = {"split": split}
    for name in ("parent_section", QUERY_STYLE):
        if _text(row.get(name)):
            metadata[name] = row[name]
    if filter_term(row.get(FILTER_STATUS)):
        metadata[FILTER_STATUS] = filter_term(row[FILTER_STATUS])
    for name in ("token_count", ROUNDTRIP_RANK):
        value = _finite(row.get(name))
        if value is not None:
            metadata[name] = int(value)
    for name in SIMILARITIES:
        value = _finite(row.get(name))
        if value is not None:
            metadata[name] = value
    return metadata


def build_records(frames: dict[str, Any]) -> list:
    """One Argilla record per row of both splits; failed rows get no suggestions and no NaN metadata."""
    import argilla as rg

    records = []
    for split, frame in frames.items():
        for row in frame.to_dict("records"):
            agent = suggestion_agent(row.get(MODEL_NAME))
            suggestions = [rg.Suggestion(question_name=question, value=row[question], agent=agent)
                           for question in (POSITIVE, NEGATIVE) if _text(row.get(question))]
            vector = row.get(ANCHOR_VECTOR)
            vectors = {ANCHOR_VECTOR: [float(x) for x in vector]} if vector is not None and len(vector) else {}
            fields = {ANCHOR: row[ANCHOR]}
            negatives = hard_negatives_markdown(row.get(HARD_NEGATIVES), row.get(HARD_NEGATIVE_IDS))
            if negatives:
                fields[HARD_NEGATIVES] = negatives
            records.append(rg.Record(id=record_id(split, row["chunk_id"], row.get(QUERY_STYLE), row.get(QUERY_VARIANT)),
                                     fields=fields, metadata=record_metadata(split, row), suggestions=suggestions,
                                     vectors=vectors))
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
    api_key: str = "",
    dataset_name: str = DEFAULT_ARGILLA_DATASET,
    workspace: str = "",
    batch_size: int = 256,
) -> dict[str, Any]:
    """Create (or reuse, if its settings match) the Argilla dataset and upsert one record per row.

    The key: `api_key` when given (tests), else ARGILLA_API_KEY, read where the client is built, so that no
    variable of the run holds it for a traceback to show.
    """
    import argilla as rg

    if not (api_key or os.environ.get(ARGILLA_API_KEY_ENV)):
        raise StageError(f"Publishing to Argilla at {api_url} needs an API key in the {ARGILLA_API_KEY_ENV} "
                         "environment variable (a Kubernetes secret in the cluster).")
    client = rg.Argilla(api_url=api_url, api_key=api_key or os.environ.get(ARGILLA_API_KEY_ENV))
    settings = argilla_settings(vector_dimension(frames))
    existing = client.datasets(name=dataset_name, workspace=workspace or None)
    if existing is not None:
        differences = settings_differences(settings, existing.settings)
        if differences:
            # Argilla adds fields and questions only to a dataset without records, so an older dataset cannot be
            # brought up to date in place.
            older = all(": existing absent," in difference for difference in differences)
            raise StageError(
                f"The Argilla dataset {dataset_name!r} at {api_url} exists with different settings: "
                + "; ".join(differences)
                + (". It was made by an earlier version of this pipeline (before hard negatives and filter metadata "
                   "were published)" if older else "")
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


# ------------------------------------------------------------------------------------------ object storage


def export_to_storage(
    frames: dict[str, Any], report_dir: "str | os.PathLike", uri: str, run_id: str, client=None,
) -> dict[str, Any]:
    """The published copy under `uri` (gs:// or a folder): parquet per split and the report files, create-only,
    then `manifest.json` last (components.storage.publish_files)."""
    counts = {split: len(frame) for split, frame in frames.items()}
    with tempfile.TemporaryDirectory() as tmp:
        manifest = publish_files(dataset_files(frames, report_dir, tmp), uri, run_id, {"counts": counts}, client)
    log.info("exported %s and the report to %s (manifest last)", manifest["counts"], uri)
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
        summary["argilla"] = publish_to_argilla(frames, argilla_url, dataset_name=argilla_dataset,
                                                workspace=argilla_workspace)
    else:
        log.info("Argilla: skipped (no argilla_url configured)")
    if hub_repo:
        summary["hub"] = publish_to_hub(frames, report_dir, hub_repo, private=hub_private, run_id=run_id)
    else:
        log.info("Hugging Face Hub: skipped (no hub_repo configured)")
    if export_uri:
        summary["gcs"] = export_to_storage(frames, report_dir, export_uri, run_id)
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
    argilla_secret_resource: str = "",
    hf_secret_resource: str = "",
):
    """Publish the scored dataset to Argilla, the Hugging Face Hub and object storage, each when configured."""
    arguments = dict(locals())  # first, while the arguments are the only locals
    from components.common import ARGILLA_API_KEY_ENV, HF_TOKEN_ENV, load_secret_into_env, write_json
    from components.publish import PublishSettings, publish
    from components.settings import as_dict, from_arguments

    # Vertex: the keys come from Secret Manager by name at run time (Kubeflow injects them as env instead).
    load_secret_into_env(argilla_secret_resource, ARGILLA_API_KEY_ENV)
    load_secret_into_env(hf_secret_resource, HF_TOKEN_ENV)
    settings = from_arguments(PublishSettings, arguments)
    summary = publish(scored.path, report_files.path, run_id=run_id, **as_dict(settings))
    write_json(f"{published.path}/publish.json", summary)
    if summary["argilla"]:
        published.metadata["argilla_records"] = summary["argilla"]["records"]
        published.metadata["argilla_rejected"] = len(summary["argilla"]["rejected"])
    for target in ("argilla", "hub", "gcs"):
        published.metadata[f"{target}_published"] = summary[target] is not None
