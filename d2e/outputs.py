"""The results of a local run: staged in a temporary folder inside OUTPUT_DIR, swapped in only when the run succeeds.

- Before any stage runs: a model folder at OUTPUT_DIR/model (or a local --model-export-uri) without our marker
  stops the run (components.model_export.check_model_target); so does a marker-less model at commit time.
- The stages write into `OUTPUT_DIR/.d2e-staging-<run id>` (same filesystem, so every rename is atomic).
- Success: recorded paths are moved from the staging folder to OUTPUT_DIR, then each entry replaces its old copy
  (`os.replace` for files; for the model folder a rename of the old one to a backup, the new one in, the backup
  deleted). What the previous run wrote and this run did not (say, a model when this run's gate said no) is removed,
  as listed in `OUTPUT_DIR/.docs-to-embeddings`; nothing else in OUTPUT_DIR is touched.
- Failure: the staging folder is deleted and the previous outputs are left exactly as they were.
`OUTPUT_DIR/.kfp` is kfp.local's working folder (every stage's artifacts, kept for diagnosis), not a result.
"""

import html
import json
import os
import shutil
import uuid
from pathlib import Path

from components.common import MANIFEST_NAME, MODEL_FOLDER, StageError
from components.model_export import MODEL_MARKER, check_model_target, new_export_id, replace_folder
from components.storage import sha256_file

STAGING_PREFIX = ".d2e-staging-"
RECORD_NAME = MODEL_MARKER  # in OUTPUT_DIR: the run that wrote it and the entries it wrote
TEXT_SUFFIXES = (".json", ".md", ".html")


class StagedOutputs:
    """A run's results folder: `folder` is where the stages write; `commit()` swaps it into `output_dir`."""

    def __init__(self, output_dir: Path, run_id: str = ""):
        self.output_dir = output_dir
        self.run_id = run_id or new_export_id()
        self.folder = output_dir / f"{STAGING_PREFIX}{self.run_id}"
        self.keep = False

    def prepare(self, model_export_uri: str = "") -> None:
        """Check the model folders (before any stage runs), clear staging folders of killed runs, make ours.

        `model_export_uri`: the user's own model target, checked too when it is a local folder (a gs:// prefix is
        checked by the export itself).
        """
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise StageError(f"--output-dir {self.output_dir} is a file, not a folder.")
        check_model_target(str(self.output_dir / MODEL_FOLDER))
        if model_export_uri and "://" not in model_export_uri:
            check_model_target(str(Path(model_export_uri).expanduser()))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.output_dir.glob(f"{STAGING_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)  # ours by name: a run killed before it could clean up
        self.folder.mkdir()

    def discard(self) -> None:
        """Delete what this run staged (unless a failed commit left results there that exist nowhere else)."""
        if not self.keep:
            shutil.rmtree(self.folder, ignore_errors=True)

    def commit(self) -> list[str]:
        """Swap the staged results into OUTPUT_DIR; return the entries written."""
        entries = sorted(path.name for path in self.folder.iterdir())
        previous = [name for name in self._previous_entries() if name not in entries]
        for name in {*entries, *previous} & {MODEL_FOLDER}:
            check_model_target(str(self.output_dir / name))  # the user may have put files there meanwhile
        relocate(self.folder, self.output_dir)
        try:
            for name in entries:
                source, target = self.folder / name, self.output_dir / name
                if source.is_dir():
                    replace_folder(source, target)
                else:
                    os.replace(source, target)
        except OSError as error:
            # What is not moved yet is the only copy of those results: out of the staging name, which runs clear.
            kept = self.output_dir / f"unmoved-results-{self.run_id}"
            self.keep = True
            os.rename(self.folder, kept)
            raise StageError(f"The run finished, but moving its results into {self.output_dir} failed ({error}); "
                             f"the results not yet moved are in {kept}.") from error
        for name in previous:
            stale = self.output_dir / name
            if stale.is_dir():
                shutil.rmtree(stale)
            elif stale.exists():
                stale.unlink()
        record = {"run_id": self.run_id, "entries": entries}
        staged_record = self.folder / f"{RECORD_NAME}.{uuid.uuid4().hex[:8]}"
        staged_record.write_text(json.dumps(record, indent=2))
        os.replace(staged_record, self.output_dir / RECORD_NAME)
        self.folder.rmdir()
        return entries

    def _previous_entries(self) -> list[str]:
        try:
            entries = json.loads((self.output_dir / RECORD_NAME).read_text()).get("entries", [])
        except (OSError, ValueError, AttributeError):
            return []  # no record (a first run, or one from before records): nothing is removed
        # Plain names only: the record is ours, but a hand-edited one must not reach outside OUTPUT_DIR.
        return [name for name in entries if isinstance(name, str) and name and "/" not in name and name != ".."]


def relocate(staged: Path, output_dir: Path) -> None:
    """Make recorded paths name where the results end up: every text result (and the model's manifest) naming the
    staging folder is rewritten, then the checksums that manifests list for rewritten files are refreshed."""
    old, new = str(staged), str(output_dir)
    texts = [path for path in staged.iterdir() if path.is_file() and path.suffix in TEXT_SUFFIXES]
    texts += [path for path in [staged / MODEL_FOLDER / MANIFEST_NAME] if path.is_file()]
    # As written raw, inside JSON strings (escaped, ASCII only) and in HTML.
    forms = {old: new, json.dumps(old)[1:-1]: json.dumps(new)[1:-1], html.escape(old): html.escape(new)}
    changed = set()
    for path in texts:
        text = moved = path.read_text(encoding="utf-8")
        for before, after in forms.items():
            moved = moved.replace(before, after)
        if moved != text:
            path.write_text(moved, encoding="utf-8")
            changed.add(path)
    for manifest in texts:
        if manifest.suffix == ".json":
            _refresh_checksums(manifest, changed)


def _refresh_checksums(manifest: Path, changed: set[Path]) -> None:
    data = json.loads(manifest.read_text(encoding="utf-8"))
    objects = data.get("objects") if isinstance(data, dict) else None
    if not isinstance(objects, dict):
        return
    stale = [name for name in objects if manifest.parent / name in changed]
    for name in stale:
        path = manifest.parent / name
        objects[name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    if stale:
        manifest.write_text(json.dumps(data, indent=2, sort_keys=True, default=str), encoding="utf-8")
