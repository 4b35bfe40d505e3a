"""components.storage on a local folder and on a real fake-gcs-server: create-only writes, checksums, the manifest
written last, identical re-runs, conflicts and the rule for where exports go."""

import hashlib
import json
import os
from pathlib import Path

import pytest

from components.common import MANIFEST_NAME, StageError
from components.storage import (
    ExportTargets,
    GCSStore,
    LocalStore,
    export_files,
    export_targets,
    open_file,
    open_store,
    write_results,
)


@pytest.fixture(params=["local", "gcs"])
def target(request, tmp_path) -> str:
    """An empty export target: a local folder, or a prefix in a fresh bucket of the fake GCS server."""
    if request.param == "local":
        return str(tmp_path / "target")
    bucket = request.getfixturevalue("gcs_bucket")
    return f"gs://{bucket.name}/exports/run"


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    source = tmp_path / "source"
    (source / "sub").mkdir(parents=True)
    (source / "train.parquet").write_bytes(b"PAR1 rows PAR1")
    (source / "report.md").write_text("# report\n")
    (source / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 64)
    return {"train.parquet": source / "train.parquet", "report.md": source / "report.md",
            "sub/weights.bin": source / "sub" / "weights.bin"}


def versions(store) -> dict[str, object]:
    """Something that changes whenever an object is rewritten: the GCS generation or the local inode and mtime."""
    if isinstance(store, GCSStore):
        return {blob.name: blob.generation for blob in store.bucket.list_blobs(prefix=f"{store.prefix}/")}
    return {name: ((store.root / name).stat().st_ino, (store.root / name).stat().st_mtime_ns) for name in store.list()}


def test_create_only_put_keeps_the_first_object(target):
    store = open_store(target)
    assert store.get("ab/key.json") is None and not store.exists("ab/key.json")
    assert store.put("ab/key.json", b"first", create_only=True) is True
    assert store.put("ab/key.json", b"second", create_only=True) is False
    assert store.get_text("ab/key.json") == "first" and store.exists("ab/key.json")
    assert store.put("ab/key.json", b"third") is True  # without create_only the object is replaced
    assert store.get("ab/key.json") == b"third"
    assert store.list() == ["ab/key.json"] and store.list("ab/k") == ["ab/key.json"] and store.list("x") == []


def test_create_only_without_hard_links(tmp_path, monkeypatch):
    """Filesystems without hard links (a gcsfuse mount) get an exclusive create instead: still never a replace."""
    def no_hard_links(source, target):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_hard_links)
    store = LocalStore(tmp_path / "fuse")
    assert store.put("a/key", b"first", create_only=True) is True
    assert store.put("a/key", b"second", create_only=True) is False
    assert store.get("a/key") == b"first" and store.list() == ["a/key"]


def test_export_writes_checksums_and_the_manifest(target, files):
    manifest = export_files(files, target, run_id="run-1", extra={"counts": {"train": 3}})
    store = open_store(target)
    assert store.list() == sorted([*files, MANIFEST_NAME])
    assert json.loads(store.get(MANIFEST_NAME)) == manifest
    assert manifest["run_id"] == "run-1" and manifest["counts"] == {"train": 3} and manifest["uri"] == store.uri
    assert set(manifest["objects"]) == set(files)
    for name, entry in manifest["objects"].items():
        data = store.get(name)
        assert data == files[name].read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        assert store.describe(name)["sha256"] == entry["sha256"]


def test_an_identical_rerun_is_a_no_op(target, files):
    first = export_files(files, target, run_id="run-1")
    before = versions(open_store(target))
    assert export_files(files, target, run_id="run-1") == first
    assert versions(open_store(target)) == before


def test_conflicting_content_is_refused(target, files):
    first = export_files(files, target, run_id="run-1")
    before = versions(open_store(target))
    files["report.md"].write_text("# another report\n")
    with pytest.raises(StageError, match="other content.*report.md.*never overwritten"):
        export_files(files, target, run_id="run-1")
    with pytest.raises(StageError, match="complete export of run run-1.*never overwritten"):
        export_files(files, target, run_id="run-2")
    store = open_store(target)
    assert versions(store) == before and json.loads(store.get(MANIFEST_NAME)) == first


def test_an_object_with_other_content_is_never_replaced(target, files):
    store = open_store(target)
    store.put("report.md", b"someone else's", create_only=True)
    with pytest.raises(StageError, match="report.md already exists from run unknown .*and differs"):
        export_files(files, target, run_id="run-2")
    assert store.get("report.md") == b"someone else's"
    assert not store.exists(MANIFEST_NAME)  # no manifest claims the export is complete


def test_a_failure_mid_upload_leaves_no_manifest_and_a_retry_finishes(target, files, monkeypatch):
    store_class = type(open_store(target))
    real_put_file = store_class.put_file
    calls = []

    def crash_on_the_second_file(self, name, path, **kwargs):
        calls.append(name)
        if len(calls) == 2:
            raise ConnectionError("the pod was killed")
        return real_put_file(self, name, path, **kwargs)

    monkeypatch.setattr(store_class, "put_file", crash_on_the_second_file)
    with pytest.raises(ConnectionError):
        export_files(files, target, run_id="run-1")
    store = open_store(target)
    assert store.list() == [calls[0]] and not store.exists(MANIFEST_NAME)
    written = versions(store)

    monkeypatch.setattr(store_class, "put_file", real_put_file)
    manifest = export_files(files, target, run_id="run-1")  # the retried task
    assert set(manifest["objects"]) == set(files) and store.exists(MANIFEST_NAME)
    assert {name: versions(store)[name] for name in written} == written  # the object written before is kept


def test_results_are_replaced_on_every_run(target, files):
    first = write_results(files, target, "export.json", extra={"rows": {"train": 3}})
    files["report.md"].write_text("# the next run's report\n")
    second = write_results(files, target, "export.json", extra={"rows": {"train": 4}})
    store = open_store(target)
    assert store.get_text("report.md") == "# the next run's report\n"
    assert json.loads(store.get("export.json")) == second and second["rows"] == {"train": 4}
    assert second["objects"]["report.md"] != first["objects"]["report.md"]
    assert second["objects"]["train.parquet"] == first["objects"]["train.parquet"]


def test_where_exports_go():
    assert export_targets("gs://b/run-1", "gs://b/published", "") == ExportTargets(
        results="gs://b/run-1", published="gs://b/published", model="gs://b/run-1/model")
    assert export_targets(output_uri="/out").model == "/out/model"
    assert export_targets(output_uri="/out", model_export_uri="gs://b/m").model == "gs://b/m"
    assert export_targets() == export_targets("", "", "") and export_targets().model == ""


def test_uris_other_than_folders_and_gs_are_refused(tmp_path):
    with pytest.raises(StageError, match="gs://BUCKET/PREFIX"):
        open_store("s3://bucket/x")
    with pytest.raises(StageError, match="no bucket"):
        open_store("gs:///x")
    store, name = open_file(str(tmp_path / "data" / "train.parquet"))
    assert isinstance(store, LocalStore) and store.root == tmp_path / "data" and name == "train.parquet"
    with pytest.raises(StageError, match="names no file"):
        open_file("gs://bucket")
