"""The publish stage against real servers: argilla-server (SDK), fake-gcs-server (google-cloud-storage).

Only the Hugging Face Hub push is replaced, at its outermost calls (DatasetDict.push_to_hub, HfApi.upload_file).
"""

import hashlib
import json
import math
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from components.common import MANIFEST_NAME, OUTPUT_COLUMNS, StageError, read_splits, write_json, write_splits
from components.publish import (
    ANCHOR_VECTOR,
    SIMILARITIES,
    build_records,
    export_to_storage,
    filter_term,
    hard_negatives_markdown,
    load_frames,
    publish,
    publish_to_argilla,
    publish_to_hub,
    record_id,
)

DIM = 384
MODEL = "SmolLM2-135M-Instruct (test)"


def scored_frame(anchors: list[str], split: str, seed: int, failed: tuple[int, ...] = ()) -> pd.DataFrame:
    """Rows in embed_score's output schema; rows listed in `failed` look like failed generations."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, anchor in enumerate(anchors):
        ok = i not in failed
        vector = rng.normal(size=DIM)
        rows.append({
            "anchor": anchor,
            "positive": f"How do I use part {i} of {split}?" if ok else None,
            "negative": f"What is the weather on day {i}?" if ok else None,
            "filename": f"doc{i}.md", "parent_section": ["install", "configure"][i % 2], "url": f"https://x/{i}",
            "token_count": 50 + i,
            "similarity-positive-negative": 0.1 * i if ok else math.nan,
            "similarity-anchor-positive": 0.5 + 0.01 * i if ok else math.nan,
            "similarity-anchor-negative": 0.2 if ok else math.nan,
            "anchor-vector": (vector / np.linalg.norm(vector)).astype(np.float32),
            "model_name": MODEL,
            "chunk_id": hashlib.sha256(anchor.encode()).hexdigest()[:16],
            "generation_status": "generated" if ok else "failed",
        })
    return pd.DataFrame(rows)


@pytest.fixture
def scored_dir(tmp_path, kubeflow_docs) -> Path:
    """Real Kubeflow chunks as anchors: 4 train rows (one failed generation) and 2 test rows."""
    train = pd.read_parquet(kubeflow_docs / "train.parquet").iloc[[3, 10, 20, 30]]
    test = pd.read_parquet(kubeflow_docs / "test.parquet").iloc[[0, 5]]
    column = "page_content" if "page_content" in train.columns else train.columns[0]
    frames = {"train": scored_frame(list(train[column]), "train", 1, failed=(2,)),
              "test": scored_frame(list(test[column]), "test", 2)}
    write_splits(frames, tmp_path / "scored")
    return tmp_path / "scored"


def add_mining_columns(frame: pd.DataFrame, statuses: list[str], ranks: list) -> pd.DataFrame:
    """mine_negatives' columns (issue 9's contract) on a scored frame: each valid row gets the other valid chunks
    of its split as hard negatives; failed rows get none."""
    frame = frame.copy()
    frame["filter_status"], frame["roundtrip_rank"] = statuses, pd.array(ranks, dtype="Int64")
    valid = frame["positive"].notna()
    chunks = frame.loc[valid, ["chunk_id", "anchor"]].drop_duplicates("chunk_id")
    others = [chunks[chunks["chunk_id"] != cid] if ok else chunks.iloc[:0] for cid, ok in zip(frame["chunk_id"], valid)]
    frame["hard_negatives"] = [list(o["anchor"]) for o in others]
    frame["hard_negative_ids"] = [list(o["chunk_id"]) for o in others]
    frame["margin_removed"] = [1 if ok else None for ok in valid]
    return frame


@pytest.fixture
def mined_dir(tmp_path, scored_dir) -> Path:
    """The scored rows after mine_negatives, with query styles; chunk 0 of train has a second (keywords) query."""
    frames = read_splits(scored_dir)
    train = frames["train"].assign(query_style=["question", "question", "question", "statement"], query_variant=0)
    second = train.iloc[[0]].assign(query_style="keywords", positive="install part 0 train")
    frames["train"] = add_mining_columns(
        pd.concat([train, second], ignore_index=True),
        ["kept", "dropped: roundtrip rank 14", "dropped: generation failed", "dropped: near-duplicate", "kept"],
        [1, 14, None, 2, 3])
    frames["test"] = add_mining_columns(frames["test"].assign(query_style="question", query_variant=0),
                                        ["kept", "kept"], [1, 1])
    write_splits(frames, tmp_path / "mined")
    return tmp_path / "mined"


@pytest.fixture
def report_dir(tmp_path) -> Path:
    folder = tmp_path / "report"
    write_json(folder / "stats.json", {
        "load_docs": {"source": "zenml/rag_qa_embedding_questions_0_60_0", "source_kind": "hub"},
        "generate_queries": {"llm": MODEL, "provider": "llamacpp", "generated": 5, "cached": 0, "failed": 1,
                             "failure_rate": 1 / 6, "settings": {"context": "Kubeflow documentation for operators.",
                                                                 "temperature": 0.7, "max_new_tokens": 512}},
        "embed_score": {"embedding_model": "sentence-transformers/all-MiniLM-L6-v2", "dimension": DIM,
                        "splits": {"train": {"rows": 4, "similarity-anchor-positive": {"mean": 0.515}},
                                   "test": {"rows": 2, "similarity-anchor-positive": {"mean": 0.505}}}},
    })
    write_json(folder / "metrics.json", {"generation_failure_rate": 0.1667, "train_rows": 4, "test_rows": 2})
    (folder / "report.md").write_text("# report\n")
    return folder


# ------------------------------------------------------------------------------------------------ Argilla


def test_argilla_create_log_both_splits_relog_and_read_back(argilla_server, argilla_client, scored_dir):
    name = f"pub-{uuid.uuid4().hex[:8]}"
    frames = load_frames(scored_dir)
    first = publish_to_argilla(frames, argilla_server.url, argilla_server.api_key, name)
    assert first["records"] == 6 and first["rejected"] == []
    again = publish_to_argilla(frames, argilla_server.url, argilla_server.api_key, name, batch_size=4)
    assert again["records"] == 6

    dataset = argilla_client.datasets(name=name)
    records = {r.id: r for r in dataset.records(with_suggestions=True, with_vectors=True)}
    expected_ids = {record_id(split, cid) for split, f in frames.items() for cid in f["chunk_id"]}
    assert set(records) == expected_ids  # re-publishing updated, did not duplicate
    assert {r.metadata["split"] for r in records.values()} == {"train", "test"}

    row = frames["test"].iloc[1]
    record = records[record_id("test", row["chunk_id"])]
    assert record.fields["anchor"] == row["anchor"]
    assert record.metadata["parent_section"] == row["parent_section"]
    assert record.metadata["token_count"] == row["token_count"]
    for sim in SIMILARITIES:
        assert record.metadata[sim] == pytest.approx(row[sim])
    suggestions = {s.question_name: s for s in record.suggestions}
    assert suggestions["positive"].value == row["positive"] and suggestions["negative"].value == row["negative"]
    assert suggestions["positive"].agent == "SmolLM2-135M-Instruct test"  # parentheses are not allowed
    assert np.allclose(record.vectors[ANCHOR_VECTOR], row[ANCHOR_VECTOR], atol=1e-6)
    assert dataset.settings.vectors[ANCHOR_VECTOR].dimensions == DIM

    failed = frames["train"].iloc[2]
    failed_record = records[record_id("train", failed["chunk_id"])]
    assert failed_record.fields["anchor"] == failed["anchor"]
    assert list(failed_record.suggestions) == []
    assert not any(sim in failed_record.metadata for sim in SIMILARITIES)


def test_argilla_settings_conflict_is_a_clear_error(argilla_server, argilla_client, scored_dir):
    import argilla as rg

    name = f"conflict-{uuid.uuid4().hex[:8]}"
    rg.Dataset(name=name, client=argilla_client, settings=rg.Settings(
        fields=[rg.TextField(name="anchor")], questions=[rg.TextQuestion(name="positive")],
        vectors=[rg.VectorField(name=ANCHOR_VECTOR, dimensions=8)])).create()
    with pytest.raises(StageError) as error:
        publish_to_argilla(load_frames(scored_dir), argilla_server.url, argilla_server.api_key, name)
    message = str(error.value)
    assert "different settings" in message and "new name" in message and "delete" in message
    assert "questions 'negative'" in message and "VectorField(8)" in message and "metadata 'split'" in message
    assert len(argilla_client.datasets(name=name).records.to_list()) == 0


def test_argilla_filter_metadata_and_hard_negatives_for_review(argilla_server, argilla_client, mined_dir):
    import argilla as rg

    name = f"mined-{uuid.uuid4().hex[:8]}"
    frames = load_frames(mined_dir)
    summary = publish_to_argilla(frames, argilla_server.url, argilla_server.api_key, name)
    assert summary["records"] == 7 and summary["rejected"] == []  # dropped rows are published too
    dataset = argilla_client.datasets(name=name)
    records = {r.id: r for r in dataset.records}
    train = frames["train"]
    ids = [record_id("train", *train.loc[i, ["chunk_id", "query_style", "query_variant"]]) for i in range(5)]
    assert ids[0] != ids[4] and set(ids) <= set(records)  # a chunk's two queries are two records

    dropped = records[ids[1]].metadata
    assert dropped["filter_status"] == "dropped: roundtrip rank" and dropped["roundtrip_rank"] == 14
    assert dropped["query_style"] == "question"
    failed = records[ids[2]]
    assert failed.metadata["filter_status"] == "dropped: generation failed" and "roundtrip_rank" not in failed.metadata
    assert "hard_negatives" not in failed.fields or not failed.fields["hard_negatives"]
    assert records[ids[4]].metadata["query_style"] == "keywords"

    # Reviewers filter on the metadata through the SDK (and the UI): the kept rows, the round-trip drops.
    kept = dataset.records(query=rg.Query(filter=rg.Filter(("metadata.filter_status", "==", "kept"))))
    assert {r.id for r in kept} == {ids[0], ids[4], *(record_id("test", *row) for row in
                                    frames["test"][["chunk_id", "query_style", "query_variant"]].values)}
    far = dataset.records(query=rg.Query(filter=rg.Filter(("metadata.roundtrip_rank", ">=", 10))))
    assert [r.id for r in far] == [ids[1]]

    field = dataset.settings.fields["hard_negatives"]
    assert field.use_markdown and not field.required
    shown = records[ids[0]].fields["hard_negatives"]
    negatives = train.loc[0, "hard_negatives"]
    assert len(negatives) == 2 and shown.startswith(f"**1.** `{train.loc[0, 'hard_negative_ids'][0]}`")
    assert "**2.**" in shown and "**3.**" not in shown
    for text in negatives:
        assert f"> {next(line for line in text.splitlines() if line.strip())}" in shown


def test_argilla_dataset_with_the_old_settings_gets_a_clear_message(argilla_server, argilla_client, scored_dir):
    import argilla as rg

    name = f"old-{uuid.uuid4().hex[:8]}"
    rg.Dataset(name=name, client=argilla_client, settings=rg.Settings(  # the settings before issue 9
        fields=[rg.TextField(name="anchor")],
        questions=[rg.TextQuestion(name="positive"), rg.TextQuestion(name="negative")],
        metadata=[rg.TermsMetadataProperty(name="parent_section"), rg.TermsMetadataProperty(name="split"),
                  rg.IntegerMetadataProperty(name="token_count"),
                  *(rg.FloatMetadataProperty(name=sim) for sim in SIMILARITIES)],
        vectors=[rg.VectorField(name=ANCHOR_VECTOR, dimensions=DIM)])).create()
    with pytest.raises(StageError) as error:
        publish_to_argilla(load_frames(scored_dir), argilla_server.url, argilla_server.api_key, name)
    message = str(error.value)
    assert "earlier version" in message and "new name" in message and "delete" in message
    for missing in ("fields 'hard_negatives'", "metadata 'filter_status'", "metadata 'roundtrip_rank'",
                    "metadata 'query_style'"):
        assert f"{missing}: existing absent" in message, missing


def test_record_ids_terms_and_markdown_without_a_server(mined_dir, scored_dir):
    assert record_id("train", "abc") == "train-abc"
    assert record_id("train", "abc", "keywords", 1.0) == "train-abc-keywords-1"
    assert filter_term("dropped: roundtrip rank 14") == "dropped: roundtrip rank"
    assert filter_term("dropped: near-duplicate") == "dropped: near-duplicate" and filter_term(None) is None
    assert hard_negatives_markdown(np.array([], dtype=object)) is None and hard_negatives_markdown(None) is None
    assert hard_negatives_markdown(["# Title\n\nbody"], ["c1"]) == "**1.** `c1`\n\n> # Title\n>\n> body"
    records = build_records(load_frames(mined_dir))
    assert len({r.id for r in records}) == len(records) == 7
    old = build_records(load_frames(scored_dir))  # data from before mine_negatives: no filter metadata
    assert all(not {"filter_status", "roundtrip_rank", "query_style"} & set(r.metadata) for r in old)
    assert all("hard_negatives" not in r.fields for r in old)


def test_argilla_one_rejected_record_keeps_the_rest(argilla_server, argilla_client, scored_dir):
    frames = load_frames(scored_dir)
    bad_id = record_id("train", frames["train"].loc[1, "chunk_id"])
    frames["train"].at[1, ANCHOR_VECTOR] = np.ones(DIM - 1, dtype=np.float32)  # wrong dimension
    name = f"bad-{uuid.uuid4().hex[:8]}"
    summary = publish_to_argilla(frames, argilla_server.url, argilla_server.api_key, name, batch_size=3)
    assert summary["records"] == 5
    assert [r["id"] for r in summary["rejected"]] == [bad_id]
    stored = {r.id for r in argilla_client.datasets(name=name).records}
    assert len(stored) == 5 and bad_id not in stored


def test_argilla_needs_the_api_key_from_the_env(argilla_server, scored_dir, report_dir, monkeypatch):
    monkeypatch.delenv("ARGILLA_API_KEY", raising=False)
    with pytest.raises(StageError, match="ARGILLA_API_KEY"):
        publish(scored_dir, report_dir, argilla_url=argilla_server.url)


def test_failed_rows_become_records_without_suggestions_or_nan(scored_dir):
    records = build_records(load_frames(scored_dir))
    assert len(records) == 6
    empty = [r for r in records if not list(r.suggestions)]
    assert len(empty) == 1
    for record in records:
        assert all(not (isinstance(v, float) and math.isnan(v)) for v in record.metadata.values())


# ------------------------------------------------------------------------------------------------ the Hub


def test_hub_push_replaces_only_the_network_calls(scored_dir, report_dir, monkeypatch):
    from datasets import DatasetDict
    from huggingface_hub import HfApi

    pushed, uploaded = [], []
    monkeypatch.setattr(DatasetDict, "push_to_hub", lambda self, repo_id, **kw: pushed.append((self, repo_id, kw)))
    monkeypatch.setattr(HfApi, "upload_file", lambda self, **kw: uploaded.append((self.token, kw)))
    summary = publish_to_hub(load_frames(scored_dir), report_dir, "me/kf-triplets", token="hf_test", private=True,
                             run_id="run-42")
    assert summary["rows"] == {"train": 4, "test": 2}
    (dataset, repo_id, kwargs), = pushed
    assert repo_id == "me/kf-triplets" and kwargs == {"private": True, "token": "hf_test"}
    assert set(dataset) == {"train", "test"} and dataset["train"].num_rows == 4 and dataset["test"].num_rows == 2
    assert list(dataset["train"].column_names[:len(OUTPUT_COLUMNS)]) == list(OUTPUT_COLUMNS)
    assert len(dataset["test"][0][ANCHOR_VECTOR]) == DIM
    (token, upload), = uploaded
    assert token == "hf_test" and upload["path_in_repo"] == "README.md" and upload["repo_type"] == "dataset"
    card = upload["path_or_fileobj"].decode()
    for fact in ("zenml/rag_qa_embedding_questions_0_60_0", MODEL, "Kubeflow documentation for operators.",
                 "temperature", "train: 4", "test: 2", "0.1666", "0.5150", "sentence-transformers/all-MiniLM-L6-v2",
                 "run-42"):
        assert fact in card, fact


def test_hub_card_has_the_filter_counts_and_the_new_columns(mined_dir, report_dir, monkeypatch):
    from datasets import DatasetDict
    from huggingface_hub import HfApi

    stats = json.loads((report_dir / "stats.json").read_text())
    stats["filters"] = {"train": {"rows": 5, "generated": 4, "failed": 1, "dropped_roundtrip": 1,
                                  "dropped_near_duplicate": 1, "kept": 2},
                        "test": {"rows": 2, "generated": 2, "failed": 0, "dropped_roundtrip": 0,
                                 "dropped_near_duplicate": 0, "kept": 2}}
    write_json(report_dir / "stats.json", stats)
    pushed, uploaded = [], []
    monkeypatch.setattr(DatasetDict, "push_to_hub", lambda self, repo_id, **kw: pushed.append(self))
    monkeypatch.setattr(HfApi, "upload_file", lambda self, **kw: uploaded.append(kw))
    publish_to_hub(load_frames(mined_dir), report_dir, "me/kf-mined", token="hf_test")
    train = pushed[0]["train"]
    expected = list(load_frames(mined_dir)["train"].loc[0, "hard_negatives"])
    assert train.num_rows == 5 and train[0]["hard_negatives"] == expected
    assert train[2]["roundtrip_rank"] is None and train[1]["filter_status"] == "dropped: roundtrip rank 14"
    card = uploaded[0]["path_or_fileobj"].decode()
    assert "| train | 5 | 4 | 1 | 1 | 1 | 2 |" in card and "| test | 2 | 2 | 0 | 0 | 0 | 2 |" in card
    for column in ("roundtrip_rank", "filter_status", "hard_negatives", "hard_negative_ids", "margin_removed",
                   "query_style"):
        assert f"- `{column}`:" in card, column


def test_hub_needs_a_token(scored_dir, report_dir, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(StageError, match="HF_TOKEN"):
        publish(scored_dir, report_dir, hub_repo="me/x")


# ------------------------------------------------------------------------------------------------ Vertex


def test_on_vertex_the_argilla_key_and_hub_token_are_read_from_secret_manager(
        argilla_server, argilla_client, scored_dir, report_dir, fake_secret_manager, tmp_path, monkeypatch, capfd):
    from datasets import DatasetDict
    from huggingface_hub import HfApi
    from kfp import dsl

    from components.publish import publish_component

    fake_secret_manager["projects/p/secrets/argilla-api-key"] = argilla_server.api_key
    fake_secret_manager["projects/p/secrets/hf-token"] = "hf_from_secret_manager"
    tokens = []
    monkeypatch.setattr(DatasetDict, "push_to_hub", lambda self, repo_id, **kw: tokens.append(kw["token"]))
    monkeypatch.setattr(HfApi, "upload_file", lambda self, **kw: tokens.append(self.token))
    name = f"vertex-{uuid.uuid4().hex[:8]}"
    published = dsl.Artifact(uri=str(tmp_path / "published"))
    # The component's own body, as the Vertex task runs it: no key in the environment, only the secrets' names.
    publish_component.python_func(
        scored=dsl.Dataset(uri=str(scored_dir)), report_files=dsl.Artifact(uri=str(report_dir)),
        argilla_url=argilla_server.url, argilla_dataset=name, argilla_workspace="", hub_repo="me/kf-triplets",
        hub_private=True, export_uri="", run_id="run-7", published=published,
        argilla_secret_resource="projects/p/secrets/argilla-api-key",
        hf_secret_resource="projects/p/secrets/hf-token/versions/2")
    assert fake_secret_manager.requested == ["projects/p/secrets/argilla-api-key/versions/latest",
                                             "projects/p/secrets/hf-token/versions/2"]
    assert len(list(argilla_client.datasets(name=name).records)) == 6  # the real server took the key
    assert tokens == ["hf_from_secret_manager", "hf_from_secret_manager"]  # dataset push and card upload
    assert published.metadata["argilla_records"] == 6 and published.metadata["hub_published"] is True
    output = capfd.readouterr()
    written = output.out + output.err + json.dumps(published.metadata)
    written += (tmp_path / "published" / "publish.json").read_text()
    assert argilla_server.api_key not in written and "hf_from_secret_manager" not in written


# ------------------------------------------------------------------------------------------------ GCS


@pytest.fixture(scope="module")
def gcs_client(fake_gcs):
    """A client of the real fake-gcs-server (tests/support/servers.py) with an `exports` bucket."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    patch = pytest.MonkeyPatch()
    patch.setenv("STORAGE_EMULATOR_HOST", fake_gcs.url)
    client = storage.Client(project="test", credentials=AnonymousCredentials())
    if client.lookup_bucket("exports") is None:
        client.create_bucket("exports")
    yield client
    patch.undo()


def test_gcs_export_objects_checksums_manifest_last(gcs_client, scored_dir, report_dir):
    manifest = export_to_storage(load_frames(scored_dir), report_dir, "gs://exports/runs/a", "run-a", client=gcs_client)
    blobs = {b.name: b for b in gcs_client.list_blobs("exports", prefix="runs/a/")}
    names = {name.removeprefix("runs/a/") for name in blobs}
    assert names == {"train.parquet", "test.parquet", "stats.json", "metrics.json", "report.md", MANIFEST_NAME}
    stored = json.loads(blobs[f"runs/a/{MANIFEST_NAME}"].download_as_bytes())
    assert stored == manifest and stored["run_id"] == "run-a" and stored["counts"] == {"train": 4, "test": 2}
    for name, entry in stored["objects"].items():
        data = blobs[f"runs/a/{name}"].download_as_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["bytes"]
    # The manifest is the newest object: a reader that sees it sees a complete export.
    assert max(blobs.values(), key=lambda b: (b.generation, b.updated)).name == f"runs/a/{MANIFEST_NAME}"
    train = pd.read_parquet(__import__("io").BytesIO(blobs["runs/a/train.parquet"].download_as_bytes()))
    assert len(train) == 4 and list(train.columns[:len(OUTPUT_COLUMNS)]) == list(OUTPUT_COLUMNS)


def test_gcs_second_run_refuses_to_clobber_but_same_run_retry_is_fine(gcs_client, scored_dir, report_dir):
    frames = load_frames(scored_dir)
    first = export_to_storage(frames, report_dir, "gs://exports/runs/b", "run-b", client=gcs_client)
    generations = {b.name: b.generation for b in gcs_client.list_blobs("exports", prefix="runs/b/")}
    with pytest.raises(StageError, match="run-b.*never overwritten"):
        export_to_storage(frames, report_dir, "gs://exports/runs/b", "run-c", client=gcs_client)
    assert export_to_storage(frames, report_dir, "gs://exports/runs/b", "run-b", client=gcs_client) == first
    assert {b.name: b.generation for b in gcs_client.list_blobs("exports", prefix="runs/b/")} == generations


def test_gcs_same_run_resumes_a_partial_export(gcs_client, scored_dir, report_dir):
    frames = load_frames(scored_dir)
    first = export_to_storage(frames, report_dir, "gs://exports/runs/e", "run-e", client=gcs_client)
    bucket = gcs_client.bucket("exports")
    data_generation = bucket.get_blob("runs/e/train.parquet").generation
    bucket.blob(f"runs/e/{MANIFEST_NAME}").delete()  # as if the task died before writing the manifest
    again = export_to_storage(frames, report_dir, "gs://exports/runs/e", "run-e", client=gcs_client)
    assert again["objects"] == first["objects"]
    assert bucket.get_blob("runs/e/train.parquet").generation == data_generation  # kept, not rewritten
    assert json.loads(bucket.blob(f"runs/e/{MANIFEST_NAME}").download_as_bytes())["run_id"] == "run-e"


def test_gcs_partial_export_of_another_run_is_not_overwritten(gcs_client, scored_dir, report_dir):
    # A crashed run left a data object but no manifest: a different run must not replace it...
    gcs_client.bucket("exports").blob("runs/c/train.parquet").upload_from_string(b"old", if_generation_match=0)
    with pytest.raises(StageError, match="already exists from run"):
        export_to_storage(load_frames(scored_dir), report_dir, "gs://exports/runs/c", "run-d", client=gcs_client)
    assert gcs_client.bucket("exports").blob("runs/c/train.parquet").download_as_bytes() == b"old"
    # ...and no manifest claims the export is complete.
    assert gcs_client.bucket("exports").get_blob(f"runs/c/{MANIFEST_NAME}") is None


def test_export_to_a_local_folder_follows_the_same_rules(tmp_path, scored_dir, report_dir):
    summary = publish(scored_dir, report_dir, export_uri=str(tmp_path / "published"), run_id="run-f")
    manifest = json.loads((tmp_path / "published" / MANIFEST_NAME).read_text())
    assert summary["gcs"] == manifest and manifest["counts"] == {"train": 4, "test": 2}
    with pytest.raises(StageError, match="run-f.*never overwritten"):
        publish(scored_dir, report_dir, export_uri=str(tmp_path / "published"), run_id="run-g")


def test_gcs_uri_must_be_gs():
    with pytest.raises(StageError, match="gs://BUCKET"):
        export_to_storage({}, ".", "s3://bucket/x", "run")
