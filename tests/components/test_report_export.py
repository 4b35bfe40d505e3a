"""report and export on real upstream outputs: load_docs on the corpus, generation rows, embed_score."""

import io
import json

import pandas as pd
import pytest

from components.common import (
    EMBEDDED_EMBEDDING_MODEL,
    OUTPUT_COLUMNS,
    StageError,
    read_splits,
    write_json,
    write_splits,
)
from components.embed_score import embed_score
from components.export import export
from components.load_docs import load_docs
from components.report import generation_sentence, write_report


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
    # Data without mine_negatives' columns: every valid row counts as kept, the filters as not run.
    assert metrics["train_kept_rows"] == 3 and metrics["train_kept_fraction"] == 0.75
    assert "train_dropped_roundtrip" not in metrics and "train_rows_short_of_hard_negatives" not in metrics
    assert "| train | 4 | 3 | 1 | n/a | n/a | 3 | 100.0% |" in markdown


def test_the_report_opens_with_the_run_summary(tmp_path, stage_dirs):
    metrics = write_report(stage_dirs / "docs", stage_dirs / "triplets", stage_dirs / "scored", tmp_path)
    markdown = (tmp_path / "report.md").read_text()
    summary = markdown[markdown.index("## Summary"):markdown.index("## Stages")]
    assert markdown.index("## Summary") < markdown.index("| stage | result |")
    assert "- train: 4 rows, 3 kept for training\n" in summary and "- test: 4 rows, 3 kept for training\n" in summary
    # The sentence `pipeline.py run` prints in its summary.
    assert f"- {generation_sentence(metrics)}\n" in summary
    assert "Generation: 6 generated, 0 from cache, 2 failed; 8 LLM requests (0 retries)" in summary
    page = (tmp_path / "report.html").read_text()
    assert page.index('<ul id="summary">') < page.index('id="filters"')
    assert "<li>train: 4 rows, 3 kept for training</li>" in page


# Per train chunk (3 valid, 1 failed) two queries, question and keywords; what each filter did to them.
STATUSES = {"question": ["kept", "kept", "dropped: roundtrip rank 14", "dropped: generation failed"],
            "keywords": ["kept", "dropped: near-duplicate", "dropped: roundtrip rank 11", "dropped: generation failed"]}


def mined_frame(scored: pd.DataFrame, split: str) -> pd.DataFrame:
    """The scored rows as mine_negatives writes them (the column contract of issue 9): two styles per chunk."""
    parts = []
    for style, statuses in STATUSES.items():
        part = scored.copy()
        part["query_style"], part["query_variant"] = style, 0
        part["filter_status"] = statuses if split == "train" else ["kept"] * 3 + ["dropped: generation failed"]
        part["roundtrip_rank"] = [1, 2, 14 if style == "question" else 11, None]
        # One valid row gets a single hard negative where three were asked; the failed row gets none.
        part["hard_negatives"] = [[f"other chunk {i}.{n}" for n in range(1 if i == 1 and style == "keywords" else 3)]
                                  if i < 3 else [] for i in range(len(part))]
        part["hard_negative_ids"] = part["hard_negatives"].map(lambda texts: [f"id-{t}" for t in texts])
        part["margin_removed"] = [0, 2, 1, None]
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


@pytest.fixture(scope="module")
def mined_dir(stage_dirs):
    frames = read_splits(stage_dirs / "scored")
    write_splits({split: mined_frame(frame, split) for split, frame in frames.items()}, stage_dirs / "mined")
    write_json(stage_dirs / "mined" / "stats.json", {"settings": {"num_hard_negatives": 3, "roundtrip_k": 10}})
    return stage_dirs / "mined"


def test_report_filter_table_styles_and_mining(tmp_path, stage_dirs, mined_dir):
    metrics = write_report(stage_dirs / "docs", stage_dirs / "triplets", stage_dirs / "scored", tmp_path,
                           mined_dir=mined_dir)
    assert metrics["train_rows"] == 8 and metrics["train_kept_rows"] == 3
    assert metrics["train_dropped_roundtrip"] == 2 and metrics["train_dropped_near_duplicate"] == 1
    assert metrics["train_kept_fraction"] == 0.375 and metrics["train_kept_fraction_of_generated"] == 0.5
    assert metrics["test_kept_rows"] == 6 and metrics["test_dropped_roundtrip"] == 0
    assert metrics["train_rows_question"] == 4 and metrics["train_kept_question"] == 2
    assert metrics["train_kept_keywords"] == 1
    assert metrics["train_rows_short_of_hard_negatives"] == 1 and metrics["test_rows_short_of_hard_negatives"] == 1
    assert metrics["train_mean_margin_removed"] == 1.0
    markdown = (tmp_path / "report.md").read_text()
    assert "| train | 8 | 6 | 2 | 2 | 1 | 3 | 50.0% |" in markdown
    assert "| test | 8 | 6 | 2 | 0 | 0 | 6 | 100.0% |" in markdown
    assert "| train | question | 4 | 3 | 2 |" in markdown and "| train | keywords | 4 | 3 | 1 |" in markdown
    assert "| train | 6 | 2.667 | 1 (of 3 asked) | 1.0 |" in markdown
    assert "dropped: other" not in markdown  # every drop has a known reason
    page = (tmp_path / "report.html").read_text()
    assert 'id="filters"' in page and "<th>train</th><td>question</td><td>4</td><td>3</td><td>2</td>" in page
    assert "other chunk 0.0" in page  # the examples show the first hard negative
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["filters"]["train"]["kept"] == 3 and stats["mine_negatives"]["settings"]["num_hard_negatives"] == 3
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


def test_report_shows_skipped_files_and_huge_chunks(tmp_path, stage_dirs):
    import shutil

    docs = shutil.copytree(stage_dirs / "docs", tmp_path / "docs")
    stats = json.loads((docs / "stats.json").read_text())
    stats["skipped_files"] = {"not_utf8": 2, "link_outside_folder": 1}
    stats["splits"]["train"]["dropped_huge"] = 1
    write_json(docs / "stats.json", stats)
    write_report(docs, stage_dirs / "triplets", stage_dirs / "scored", tmp_path / "report")
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "skipped 3 files (link_outside_folder: 1, not_utf8: 2)" in markdown
    assert "dropped 0 empty, 1 huge, 0 duplicate" in markdown
