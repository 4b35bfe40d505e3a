"""Object storage for every stage: a local folder or a `gs://bucket/prefix`, behind one small API.

- `open_store(uri)` gives a store with `get`, `get_text`, `put`, `put_file`, `exists`, `list`, `describe` and
  `delete_all`; names are relative to the folder or prefix, with `/` between parts.
- Create-only writes (`create_only=True`) never replace an object: locally a finished temporary file is
  hard-linked into place (the link fails if the name exists), on GCS the upload carries `if_generation_match=0`
  (the server answers 412 if the object exists). Either way the first writer wins, atomically.
- `export_files` writes a set of files, then a manifest (run id, time, sha256 and size of each file) LAST, so a
  reader that finds the manifest finds a complete export.
- Where each export goes, and which writes are create-only, is one rule: `export_targets`, the two writers at
  the end of this module (`write_results`, `publish_files`) and components.model_export (the model, by
  create-then-swap), described in docs/configuration.md#where-exports-go.

Credentials on GCS are the pod's (Workload Identity / application default credentials); with
STORAGE_EMULATOR_HOST set (tests, fake-gcs-server) anonymous credentials are used.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from components.common import MANIFEST_NAME, MODEL_FOLDER, StageError, get_logger

log = get_logger("storage")

CONTENT_TYPES = {".parquet": "application/vnd.apache.parquet", ".html": "text/html", ".md": "text/markdown",
                 ".png": "image/png", ".json": "application/json"}


def sha256_bytes(data: bytes) -> str:
    """The hex SHA-256 of `data`."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a file, read in 1 MiB blocks (model weights do not fit in memory twice)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def join_uri(base: str, name: str) -> str:
    """`name` below a folder or gs:// prefix."""
    return f"{base.rstrip('/')}/{name}"


# ---------------------------------------------------------------------------------------------
# The two stores


class LocalStore:
    """Files under a local folder. Writes go to a temporary file and are renamed, so readers never see half a file."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)

    def get(self, name: str) -> bytes | None:
        """The object's bytes, or None when it does not exist."""
        try:
            return (self.root / name).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def get_text(self, name: str) -> str | None:
        """The object as UTF-8 text, or None when it does not exist."""
        data = self.get(name)
        return None if data is None else data.decode("utf-8")

    def exists(self, name: str) -> bool:
        """Whether the object exists."""
        return (self.root / name).is_file()

    def put(self, name: str, data: bytes, create_only: bool = False) -> bool:
        """Write `name`; with create_only, keep an existing object and return False."""
        return self._place(name, lambda handle: handle.write(data), create_only)

    def put_file(self, name: str, path: str | os.PathLike, create_only: bool = False,
                 metadata: Mapping[str, str] | None = None, content_type: str = "") -> bool:
        """Copy a local file to `name`; metadata and content type matter on GCS only."""
        def copy(handle) -> None:
            with open(path, "rb") as source:
                shutil.copyfileobj(source, handle, 1 << 20)

        return self._place(name, copy, create_only)

    def _place(self, name: str, fill, create_only: bool) -> bool:
        target = self.root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".tmp", delete=False) as handle:
            fill(handle)
        if not create_only:
            os.replace(handle.name, target)
            return True
        try:
            os.link(handle.name, target)  # fails if the name exists: the first writer wins, atomically
        except FileExistsError:
            return False
        except OSError:  # no hard links here (e.g. a gcsfuse mount): exclusive create, still never a replace
            try:
                with open(handle.name, "rb") as source, open(target, "xb") as out:
                    shutil.copyfileobj(source, out, 1 << 20)
            except FileExistsError:
                return False
        finally:
            os.unlink(handle.name)
        return True

    def describe(self, name: str) -> dict[str, str] | None:
        """The object's sha256 (and, on GCS, the run that wrote it), or None when it does not exist."""
        path = self.root / name
        return {"sha256": sha256_file(path), "run_id": ""} if path.is_file() else None

    def list(self, prefix: str = "") -> list[str]:
        """Names starting with `prefix` (a string prefix, as on GCS), sorted; temporary files are left out."""
        folder, _, start = prefix.rpartition("/")
        base = self.root / folder
        if not base.is_dir():
            return []
        names = []
        for entry in base.iterdir():
            if not entry.name.startswith(start):
                continue
            files = entry.rglob("*") if entry.is_dir() else [entry]
            names.extend(str(p.relative_to(self.root).as_posix()) for p in files
                         if p.is_file() and p.suffix != ".tmp")
        return sorted(names)

    def delete_all(self) -> None:
        """Remove every object under the folder (the folder itself included)."""
        shutil.rmtree(self.root, ignore_errors=True)


class GCSStore:
    """Objects under gs://bucket/prefix with google-cloud-storage."""

    def __init__(self, uri: str, client=None):
        self.uri = uri.rstrip("/")
        bucket, _, prefix = uri[len("gs://"):].partition("/")
        if not bucket:
            raise StageError(f"{uri!r} is not a gs://BUCKET/PREFIX URI: it has no bucket name.")
        self.prefix = prefix.strip("/")
        self.bucket = (client or _gcs_client()).bucket(bucket)

    def _name(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def get(self, name: str) -> bytes | None:
        """The object's bytes, or None when it does not exist."""
        from google.api_core.exceptions import NotFound

        try:
            return self.bucket.blob(self._name(name)).download_as_bytes()
        except NotFound:
            return None

    def get_text(self, name: str) -> str | None:
        """The object as UTF-8 text, or None when it does not exist."""
        data = self.get(name)
        return None if data is None else data.decode("utf-8")

    def exists(self, name: str) -> bool:
        """Whether the object exists."""
        return self.bucket.blob(self._name(name)).exists()

    def put(self, name: str, data: bytes, create_only: bool = False) -> bool:
        """Write `name`; with create_only, keep an existing object and return False (the server's 412)."""
        return self._upload(name, lambda blob, match: blob.upload_from_string(data, if_generation_match=match),
                            create_only)

    def put_file(self, name: str, path: str | os.PathLike, create_only: bool = False,
                 metadata: Mapping[str, str] | None = None, content_type: str = "") -> bool:
        """Upload a local file to `name`, with custom metadata (e.g. its sha256) and a content type."""
        def upload(blob, match) -> None:
            blob.metadata = dict(metadata or {}) or None
            blob.upload_from_filename(str(path), content_type=content_type or None, if_generation_match=match)

        return self._upload(name, upload, create_only)

    def _upload(self, name: str, send, create_only: bool) -> bool:
        from google.api_core.exceptions import PreconditionFailed

        try:
            send(self.bucket.blob(self._name(name)), 0 if create_only else None)
        except PreconditionFailed:
            return False  # the object exists: the caller decides whether it is the same content
        return True

    def describe(self, name: str) -> dict[str, str] | None:
        """The object's sha256 (from its metadata, else computed) and the run that wrote it, or None."""
        blob = self.bucket.get_blob(self._name(name))
        if blob is None:
            return None
        metadata = blob.metadata or {}
        return {"sha256": metadata.get("sha256") or sha256_bytes(blob.download_as_bytes()),
                "run_id": metadata.get("run_id", "")}

    def list(self, prefix: str = "") -> list[str]:
        """Names starting with `prefix` below this store's prefix, sorted."""
        start = len(self.prefix) + 1 if self.prefix else 0
        return sorted(blob.name[start:] for blob in self.bucket.list_blobs(prefix=self._name(prefix)))

    def delete_all(self) -> None:
        """Remove every object under the prefix."""
        for blob in self.bucket.list_blobs(prefix=self._name("")):
            blob.delete()


def _gcs_client():
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(credentials=AnonymousCredentials(), project="emulator")
    return storage.Client()


def open_store(uri: str, client=None) -> LocalStore | GCSStore:
    """A store for a local folder or a `gs://bucket/prefix` URI (`client`: a google-cloud-storage client to use)."""
    if uri.startswith("gs://"):
        return GCSStore(uri, client)
    if "://" in uri:
        raise StageError(f"{uri!r}: only local folders and gs://BUCKET/PREFIX URIs are supported.")
    return LocalStore(uri)


def open_file(uri: str) -> tuple[LocalStore | GCSStore, str]:
    """The store holding one file and the file's name in it: `gs://b/p/x.parquet` -> (gs://b/p, x.parquet)."""
    folder, _, name = uri.rstrip("/").rpartition("/")
    if not name or (uri.startswith("gs://") and folder in ("gs:", "gs:/")):
        raise StageError(f"{uri!r} names no file.")
    return open_store(folder or "."), name


def read_parquet(store: LocalStore | GCSStore, names: list[str]) -> "pandas.DataFrame":  # noqa: F821
    """The named parquet objects of a store, concatenated in order."""
    import pandas as pd

    return pd.concat([pd.read_parquet(io.BytesIO(store.get(name))) for name in names], ignore_index=True)


# ---------------------------------------------------------------------------------------------
# Exports: files, then the manifest


def _create(store, name: str, path: Path, sha256: str, run_id: str) -> str:
    """Create `name` unless it exists; an existing object with the same checksum is this export already."""
    content_type = CONTENT_TYPES.get(path.suffix, "application/octet-stream")
    if store.put_file(name, path, create_only=True, metadata={"sha256": sha256, "run_id": run_id},
                      content_type=content_type):
        return "written"
    existing = store.describe(name) or {}
    if existing.get("sha256") == sha256:
        return "already there"
    raise StageError(
        f"{join_uri(store.uri, name)} already exists from run {existing.get('run_id') or 'unknown'} (this run: "
        f"{run_id or 'unknown'}) and differs (sha256 {existing.get('sha256', '?')[:12]}… vs {sha256[:12]}…); exports "
        "are never overwritten. Choose another prefix, or delete the old export first.")


def _existing_export(store, manifest_name: str, objects: dict, run_id: str) -> dict | None:
    """The complete export already at the target if it is this one (same run, same checksums); else refuse."""
    text = store.get_text(manifest_name)
    if text is None:
        return None
    existing = json.loads(text)
    if existing.get("run_id") != run_id:
        raise StageError(f"{store.uri} already holds the complete export of run {existing.get('run_id') or 'unknown'}"
                         "; exports are never overwritten. Choose another export prefix.")
    if existing.get("objects") != objects:
        differ = sorted(name for name in set(objects) | set(existing.get("objects", {}))
                        if objects.get(name) != existing.get("objects", {}).get(name))
        raise StageError(f"{store.uri} already holds an export of run {run_id or 'unknown'} with other content "
                         f"({', '.join(differ)} differ); exports are never overwritten. Choose another prefix.")
    return existing


def export_files(files: Mapping[str, str | os.PathLike], target: str, *, run_id: str = "", create_only: bool = True,
                 manifest_name: str = MANIFEST_NAME, extra: Mapping[str, Any] | None = None, client=None) -> dict:
    """Write `files` ({name in the target: local path}) under `target`, then the manifest, last.

    create_only: nothing is ever replaced. A complete export of the same run with the same checksums is a no-op
    (its manifest is returned); an object this export needs that holds other content is refused with an error
    naming the run that wrote it; a partial export of the same content (a retried task) is finished.
    Otherwise each object is replaced atomically. The manifest holds `run_id`, `created`, `uri`, `objects`
    ({name: {sha256, bytes}}) and the `extra` keys.
    """
    store = open_store(target, client)
    paths = {name: Path(path) for name, path in files.items()}
    objects = {name: {"sha256": sha256_file(path), "bytes": path.stat().st_size} for name, path in paths.items()}
    if create_only:
        existing = _existing_export(store, manifest_name, objects, run_id)
        if existing is not None:
            log.info("%s already holds this export (run %s): nothing to write", store.uri, run_id or "unknown")
            return existing
    for name, path in paths.items():
        if create_only:
            outcome = _create(store, name, path, objects[name]["sha256"], run_id)
        else:
            store.put_file(name, path, metadata={"sha256": objects[name]["sha256"], "run_id": run_id},
                           content_type=CONTENT_TYPES.get(path.suffix, "application/octet-stream"))
            outcome = "written"
        log.info("%s %s", join_uri(store.uri, name), outcome)
    manifest = {"run_id": run_id, "uri": store.uri, "objects": objects, **(extra or {}),
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    data = json.dumps(manifest, indent=2, sort_keys=True, default=str).encode()
    # Last, so a reader that finds the manifest finds a complete export.
    if not store.put(manifest_name, data, create_only=create_only):
        return _existing_export(store, manifest_name, objects, run_id)  # a twin task finished first
    return manifest


def folder_files(folder: str | os.PathLike) -> dict[str, Path]:
    """Every file below a local folder, named by its relative path with `/` separators."""
    folder = Path(folder)
    return {path.relative_to(folder).as_posix(): path for path in sorted(folder.rglob("*")) if path.is_file()}


# ---------------------------------------------------------------------------------------------
# Where exports go: the one rule (docs/configuration.md#where-exports-go)


@dataclass(frozen=True)
class ExportTargets:
    """Where a run's outputs go. Empty means: not exported there."""

    results: str = ""    # output_uri: this run's results (parquet, report, evaluation), replaced on every run
    published: str = ""  # export_uri: the published copy, create-only, never overwritten
    model: str = ""      # model_export_uri, else <output_uri>/model: the winning model, replaced whole


def export_targets(output_uri: str = "", export_uri: str = "", model_export_uri: str = "") -> ExportTargets:
    """Apply the rule to the three settings: the model goes to `<output_uri>/model` unless set on its own."""
    model = model_export_uri or (join_uri(output_uri, MODEL_FOLDER) if output_uri else "")
    return ExportTargets(results=output_uri, published=export_uri, model=model)


def write_results(files: Mapping[str, str | os.PathLike], output_uri: str, manifest_name: str,
                  extra: Mapping[str, Any] | None = None) -> dict:
    """A stage's files into the results folder, replacing the previous run's, then its manifest."""
    return export_files(files, output_uri, create_only=False, manifest_name=manifest_name, extra=extra)


def publish_files(files: Mapping[str, str | os.PathLike], export_uri: str, run_id: str,
                  extra: Mapping[str, Any] | None = None, client=None) -> dict:
    """The published copy: create-only files, then `manifest.json`; never overwrites another run's export."""
    if not run_id:
        raise StageError("Export to object storage needs a run id (the pipeline passes its job id).")
    return export_files(files, export_uri, run_id=run_id, create_only=True, extra=extra, client=client)
