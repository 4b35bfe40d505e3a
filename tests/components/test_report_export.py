"""report and export on real upstream outputs: load_docs on the corpus, generation rows, embed_score."""

import io
import json

import pandas as pd
import pytest

from components.common import EMBEDDED_EMBEDDING_MODEL, OUTPUT_COLUMNS, StageError, write_json, write_splits
from components.embed_score import embed_score
from components.export import export
from components.load_docs import load_docs
from components.report import write_report


@pytest.fixture(scope="module")
def stage_dirs(tmp_path_factory, kubeflow_docs):
    root = tmp_path_factory.mktemp("stages")
    load_docs(str(kubeflow_docs), root / "docs", limit=4)
    # Generation output as generate_queries writes it (the LLM part is tested in test_generate_queries).
    frames = {split: pd.read_parquet(root / "docs" / f"{split}.parquet") for split in ("train", "test")}
    for frame in frames.values():
        frame["positive"] = [f"How does feature {i} work?" for i in range(len(frame))]
        frame["negative"] = [f"What is the weather on day {i}?" for i in range(len(frame))]
        frame.loc[frame.index[-1], ["positive", "negative"]] = None
        frame["model_name"] = "test-llm"
        frame["generation_status"] = ["generated"] * (len(frame) - 1) + ["failed"]
        frame["generation_error"] = [None] * (len(frame) - 1) + ["negative missing"]
        frame["review_flag"] = None
        for column in ("generation_attempts", "generation_requests", "prompt_tokens", "completion_tokens"):
            frame[column] = 1
    write_splits(frames, root / "triplets")
    write_json(root / "triplets" / "stats.json", {
        "llm": "test-llm", "provider": "openai", "rows": 8, "generated": 6, "cached": 0, "failed": 2,
        "failure_rate": 0.25, "llm_requests": 8, "prompt_tokens": 8, "completion_tokens": 8, "splits": {}})
    embed_score(root / "triplets", root / "scored", EMBEDDED_EMBEDDING_MODEL, device="cpu")
    return root


def test_report_counts_histograms_and_examples(tmp_path, stage_dirs):
    metrics = write_report(stage_dirs / "docs", stage_dirs / "triplets", stage_dirs / "scored", tmp_path)
    assert metrics["train_rows"] == 4 and metrics["test_rows"] == 4 and metrics["train_rows_read"] == 971
    assert metrics["generation_failed"] == 2 and metrics["generation_failure_rate"] == 0.25
    assert metrics["embedding_dimension"] == 384
    assert -1 <= metrics["train_mean_similarity-anchor-positive"] <= 1
    page = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64," in page and "How does feature 0 work?" in page
    assert len(page) < 200_000  # the KFP UI wants small HTML
    assert (tmp_path / "similarity_histograms.png").read_bytes()[:4] == b"\x89PNG"
    markdown = (tmp_path / "report.md").read_text()
    assert "| generate_queries | test-llm: 6 generated, 0 from cache, 2 failed (25.0%)" in markdown
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics


def test_export_writes_published_columns_first(tmp_path, stage_dirs):
    write_report(stage_dirs / "docs", stage_dirs / "triplets", stage_dirs / "scored", tmp_path / "report")
    summary = export(stage_dirs / "scored", tmp_path / "report", tmp_path / "final")
    train = pd.read_parquet(tmp_path / "final" / "train.parquet")
    assert tuple(train.columns[: len(OUTPUT_COLUMNS)]) == OUTPUT_COLUMNS
    assert train["positive"].isna().sum() == 1  # the failed row is exported, marked, not dropped
    assert summary["rows"] == {"train": 4, "test": 4}
    assert {"report.md", "report.html", "metrics.json"} <= set(summary["files"])
    assert (tmp_path / "final" / "report.md").exists()


def test_export_refuses_unscored_data(tmp_path, stage_dirs):
    with pytest.raises(StageError, match="lacks columns"):
        export(stage_dirs / "triplets", tmp_path, tmp_path / "final")


def test_export_to_a_gs_results_folder_is_replaced_on_each_run(tmp_path, stage_dirs, gcs_bucket):
    write_report(stage_dirs / "docs", stage_dirs / "triplets", stage_dirs / "scored", tmp_path / "report")
    uri = f"gs://{gcs_bucket.name}/results"
    first = export(stage_dirs / "scored", tmp_path / "report", uri)
    assert {blob.name for blob in gcs_bucket.list_blobs(prefix="results/")} == {
        f"results/{name}" for name in [*first["files"], "export.json"]}
    again = export(stage_dirs / "scored", tmp_path / "report", uri)  # a second run replaces, never refuses
    assert json.loads(gcs_bucket.blob("results/export.json").download_as_bytes()) == again
    assert again["objects"] == first["objects"] and again["rows"] == {"train": 4, "test": 4}
    train = pd.read_parquet(io.BytesIO(gcs_bucket.blob("results/train.parquet").download_as_bytes()))
    assert tuple(train.columns[: len(OUTPUT_COLUMNS)]) == OUTPUT_COLUMNS and len(train) == 4
