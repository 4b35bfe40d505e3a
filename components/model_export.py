"""The winning model's export: the new copy is made beside the old one and swapped in; only our exports are replaced.

Every model folder this project exports carries `MODEL_MARKER` (`.docs-to-embeddings`: JSON with the export id and
time). A target that is not empty and lacks the marker is refused before anything is written: it is not ours.

- A local folder: the model is written into a temporary folder beside the target (same filesystem, so renames are
  atomic), the old folder is renamed to a backup, the new one renamed into place, then the backup is deleted. A
  failure before the last step leaves the old model where it was.
- gs://: objects cannot be renamed, so each export is a new version prefix `<target>/<export id>/`, written
  create-only with its manifest last (components.storage.export_files); then the pointer `<target>/latest.json` is
  replaced, last; then the version the old pointer named is deleted. Readers follow `latest.json`.
"""

import datetime
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from components.common import StageError, get_logger
from components.storage import LocalStore, export_files, folder_files, join_uri, open_store

log = get_logger("model_export")

MODEL_MARKER = ".docs-to-embeddings"
POINTER_NAME = "latest.json"  # gs:// only: which version prefix holds the current model


def new_export_id() -> str:
    """A sortable, unique id for one export (UTC time and a random suffix)."""
    return f"{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def marker_text(export_id: str) -> str:
    """The marker file's content: who wrote the folder, which export, when."""
    return json.dumps({"created_by": "docs-to-embeddings", "export_id": export_id,
                       "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})


def check_model_target(target: str) -> None:
    """Refuse a model target we may not replace: a file, or a non-empty folder/prefix without our marker."""
    store = open_store(target)
    if isinstance(store, LocalStore) and store.root.exists() and not store.root.is_dir():
        raise StageError(f"The model export target {store.uri} is a file, not a folder. Pass another "
                         "--model-export-uri, or move the file away.")
    names = store.list()
    if names and MODEL_MARKER not in names:
        raise StageError(
            f"{store.uri} exists and was not exported by docs-to-embeddings (it has no {MODEL_MARKER} marker), so "
            "it is left alone and nothing was run. Move or rename that folder, or pass another --model-export-uri "
            "(model_export_uri); a folder this project exported carries the marker and is replaced whole.")


def replace_folder(new: Path, target: Path) -> None:
    """Rename `new` to `target`; an existing target is first renamed to a backup, and the backup deleted last."""
    backup = None
    if target.exists():
        backup = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(target, backup)
    try:
        os.rename(new, target)
    except OSError:
        if backup is not None:
            os.rename(backup, target)  # the old folder back where it was
        raise
    if backup is not None:
        shutil.rmtree(backup)


def export_model(folder: str | os.PathLike, target: str, export_id: str = "") -> str:
    """Export the model folder to `target` (a local folder or gs:// prefix) by create-then-swap; return where the
    model is now (locally the absolute folder, on GCS the version prefix)."""
    check_model_target(target)
    export_id = export_id or new_export_id()
    with tempfile.TemporaryDirectory() as tmp:
        marker = Path(tmp, MODEL_MARKER)
        marker.write_text(marker_text(export_id))
        files = {**folder_files(folder), MODEL_MARKER: marker}
        if target.startswith("gs://"):
            return _export_version(files, target, export_id)
        return _export_local(files, open_store(target).root, export_id)


def _export_local(files: dict, target: Path, export_id: str) -> str:
    target.parent.mkdir(parents=True, exist_ok=True)
    new = Path(tempfile.mkdtemp(prefix=f".{target.name}.new-", dir=target.parent))
    try:
        # The manifest names where the model will be, not the temporary folder it is written to.
        export_files(files, str(new), run_id=export_id, create_only=True, extra={"uri": str(target)})
        replace_folder(new, target)
    finally:
        shutil.rmtree(new, ignore_errors=True)  # gone already after a successful swap
    log.info("model exported to %s (export %s)", target, export_id)
    return str(target)


def _export_version(files: dict, target: str, export_id: str) -> str:
    store = open_store(target)
    previous = json.loads(store.get_text(POINTER_NAME) or "{}")
    # The prefix's own marker: what lets the next export replace the pointer and delete old versions here.
    store.put(MODEL_MARKER, files[MODEL_MARKER].read_bytes(), create_only=True)
    version = join_uri(store.uri, export_id)
    export_files(files, version, run_id=export_id, create_only=True)
    pointer = {"uri": version, "export_id": export_id,
               "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    store.put(POINTER_NAME, json.dumps(pointer, indent=2).encode())  # last: readers switch here
    old = previous.get("export_id")
    if old and old != export_id and "/" not in old:
        open_store(join_uri(store.uri, old)).delete_all()
    log.info("model exported to %s (pointer %s)", version, join_uri(store.uri, POINTER_NAME))
    return version
