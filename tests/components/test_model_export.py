"""components.model_export on a local folder and on a real fake-gcs-server: create-then-swap, the marker that says a
folder is ours, the refusal of anything else, and a failed swap that leaves the old model in place."""

import json
import os

import pytest

from components.common import MANIFEST_NAME, StageError
from components.model_export import MODEL_MARKER, POINTER_NAME, check_model_target, export_model
from components.storage import open_store


@pytest.fixture(params=["local", "gcs"])
def target(request, tmp_path) -> str:
    """An empty model target: a local folder, or a prefix in a fresh bucket of the fake GCS server."""
    if request.param == "local":
        return str(tmp_path / "exported" / "model")
    bucket = request.getfixturevalue("gcs_bucket")
    return f"gs://{bucket.name}/models/winner"


def saved_model(folder, weights: bytes, extra: str = ""):
    """A folder shaped like a saved SentenceTransformer (the export copies whatever is there)."""
    (folder / "1_Pooling").mkdir(parents=True)
    (folder / "modules.json").write_text("[]")
    (folder / "1_Pooling" / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(weights)
    if extra:
        (folder / extra).write_text("only in this version")
    return folder


def model_files(target: str) -> dict[str, bytes]:
    """The files of the current model at a target: locally the folder, on GCS the version latest.json names."""
    store = open_store(target)
    if target.startswith("gs://"):
        store = open_store(json.loads(store.get_text(POINTER_NAME))["uri"])
    return {name: store.get(name) for name in store.list()}


def test_a_new_export_replaces_our_previous_one_whole(target, tmp_path):
    first = export_model(saved_model(tmp_path / "first", b"old weights", extra="stale.bin"), target)
    files = model_files(target)
    assert files["model.safetensors"] == b"old weights" and "stale.bin" in files
    marker = json.loads(files[MODEL_MARKER])
    assert marker["created_by"] == "docs-to-embeddings" and marker["export_id"]

    second = export_model(saved_model(tmp_path / "second", b"new weights"), target)
    files = model_files(target)
    assert sorted(files) == sorted(["1_Pooling/config.json", MANIFEST_NAME, MODEL_MARKER, "model.safetensors",
                                    "modules.json"])  # nothing stale survives
    assert files["model.safetensors"] == b"new weights"
    manifest = json.loads(files[MANIFEST_NAME])
    assert manifest["run_id"] == json.loads(files[MODEL_MARKER])["export_id"]
    assert manifest["uri"] == second  # where the model is, not the temporary folder it was written to
    if target.startswith("gs://"):
        assert first != second and second.startswith(target + "/")
        assert open_store(first).list() == []  # the version the old pointer named is deleted after the switch
    else:
        assert first == second == target
        assert sorted(p.name for p in (tmp_path / "exported").iterdir()) == ["model"]  # no temporary or backup left


@pytest.mark.parametrize("content", [{"notes.txt": b"keep me"}, {"modules.json": b"[]", "weights.bin": b"theirs"}],
                         ids=["user files", "a model we did not export"])
def test_a_target_without_our_marker_is_refused_and_untouched(target, tmp_path, content):
    store = open_store(target)
    for name, data in content.items():
        store.put(name, data)
    with pytest.raises(StageError, match=f"has no {MODEL_MARKER} marker") as error:
        export_model(saved_model(tmp_path / "model", b"weights"), target)
    assert "Move or rename that folder, or pass another --model-export-uri" in str(error.value)
    assert {name: store.get(name) for name in store.list()} == content


def test_a_file_in_place_of_the_model_folder_is_refused(tmp_path):
    (tmp_path / "model").write_text("a file")
    with pytest.raises(StageError, match="is a file, not a folder"):
        check_model_target(str(tmp_path / "model"))


def test_a_failed_swap_leaves_the_old_model_in_place(tmp_path, monkeypatch):
    target = tmp_path / "model"
    export_model(saved_model(tmp_path / "first", b"old weights"), str(target))
    before = {path.name: path.read_bytes() for path in target.rglob("*") if path.is_file()}
    real_rename = os.rename

    def rename(source, destination):
        if ".new-" in str(source):  # the new copy cannot be moved in (e.g. the disk went away)
            raise OSError(5, "Input/output error")
        return real_rename(source, destination)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="Input/output error"):
        export_model(saved_model(tmp_path / "second", b"new weights"), str(target))
    assert {path.name: path.read_bytes() for path in target.rglob("*") if path.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first", "model", "second"]  # no temporary left
