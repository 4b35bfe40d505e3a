"""d2e.outputs with real files: a local run's results are staged and swapped in only on success; a failed run and
a model folder that is not ours leave OUTPUT_DIR exactly as it was."""

import hashlib
import json

import pytest

from components.common import StageError
from components.model_export import MODEL_MARKER, export_model
from d2e.outputs import RECORD_NAME, STAGING_PREFIX, StagedOutputs
from tests.d2e.test_local_run import run_cli


def snapshot(folder) -> dict[str, str]:
    """Every file below `folder` (but kfp.local's working folder) with the sha256 of its bytes."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file() and ".kfp" not in path.parts}


def saved_model(folder, weights: bytes):
    folder.mkdir(parents=True)
    (folder / "modules.json").write_text("[]")
    (folder / "model.safetensors").write_bytes(weights)
    return folder


def stage_results(staged: StagedOutputs, tmp_path, weights: bytes | None, rows: bytes):
    """What the stages of a run write into the staging folder: parquet, evaluation.json naming the model, a report,
    the model (only when it won)."""
    folder = staged.folder
    (folder / "train.parquet").write_bytes(rows)
    model_uri = ""
    if weights is not None:
        model_uri = export_model(saved_model(tmp_path / f"trained-{staged.run_id}", weights), str(folder / "model"))
    (folder / "evaluation.md").write_text(f"Exported to model_uri: {model_uri}.\n")
    from components.storage import sha256_file

    md = folder / "evaluation.md"
    (folder / "evaluation.json").write_text(json.dumps({
        "uri": str(folder), "result_model": model_uri or "base",
        "objects": {"evaluation.md": {"sha256": sha256_file(md), "bytes": md.stat().st_size}}}, indent=2))


def previous_run(out, tmp_path) -> dict[str, str]:
    """OUTPUT_DIR after a successful run with a winning model, plus the user's own files beside and inside."""
    staged = StagedOutputs(out, run_id="run-1")
    staged.prepare()
    stage_results(staged, tmp_path, b"old weights", b"old rows")
    staged.commit()
    (out / "notes.txt").write_text("the user's notes")
    (out / "model" / "my-eval.txt").write_text("the user's file inside the model folder")
    return snapshot(out)


def test_a_successful_run_replaces_every_result_and_records_where_the_model_is(tmp_path):
    out = tmp_path / "out"
    previous_run(out, tmp_path)
    staged = StagedOutputs(out, run_id="run-2")
    staged.prepare()
    stage_results(staged, tmp_path, b"new weights", b"new rows")
    assert staged.commit() == ["evaluation.json", "evaluation.md", "model", "train.parquet"]

    assert (out / "train.parquet").read_bytes() == b"new rows"
    assert (out / "model" / "model.safetensors").read_bytes() == b"new weights"
    assert not (out / "model" / "my-eval.txt").exists()  # the model folder is ours (marker): replaced whole
    assert (out / "notes.txt").read_text() == "the user's notes"  # never ours: untouched
    evaluation = json.loads((out / "evaluation.json").read_text())
    # The paths recorded while the results were staged name where they are now, and the checksums still hold.
    assert evaluation["result_model"] == str(out / "model") and evaluation["uri"] == str(out)
    assert (out / "evaluation.md").read_text() == f"Exported to model_uri: {out / 'model'}.\n"
    assert evaluation["objects"]["evaluation.md"]["sha256"] == hashlib.sha256(
        (out / "evaluation.md").read_bytes()).hexdigest()
    assert json.loads((out / "model" / "manifest.json").read_text())["uri"] == str(out / "model")
    assert not list(out.glob(f"{STAGING_PREFIX}*")) and not list(out.glob(".model.*"))
    assert json.loads((out / RECORD_NAME).read_text())["run_id"] == "run-2"


def test_a_result_the_new_run_did_not_make_is_removed_not_left_beside_the_new_ones(tmp_path):
    out = tmp_path / "out"
    previous_run(out, tmp_path)
    staged = StagedOutputs(out, run_id="run-2")
    staged.prepare()
    stage_results(staged, tmp_path, None, b"new rows")  # this run's gate kept the base model
    staged.commit()
    assert not (out / "model").exists()  # the previous winner would pass for this run's
    assert json.loads((out / "evaluation.json").read_text())["result_model"] == "base"
    assert (out / "notes.txt").read_text() == "the user's notes"


def test_a_failed_run_leaves_the_previous_outputs_byte_for_byte(tmp_path):
    out = tmp_path / "out"
    before = previous_run(out, tmp_path)
    staged = StagedOutputs(out, run_id="run-2")
    staged.prepare()
    (staged.folder / "train.parquet").write_bytes(b"half of a new run")  # then a stage fails
    staged.discard()
    assert snapshot(out) == before
    assert not list(out.glob(f"{STAGING_PREFIX}*"))


@pytest.mark.parametrize("where", ["model", "elsewhere"])
def test_a_model_folder_without_our_marker_stops_the_run_before_any_stage(tmp_path, where):
    out, folder = tmp_path / "out", tmp_path / ("out/model" if where == "model" else "elsewhere")
    folder.mkdir(parents=True)
    (folder / "weights.bin").write_bytes(b"someone else's model")
    before = snapshot(tmp_path)
    export = [] if where == "model" else ["--model-export-uri", str(folder)]
    result = run_cli("run", "--output-dir", str(out), "--no-argilla", "--no-llm-cache", *export)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"error: {folder} exists and was not exported by docs-to-embeddings (it has no {MODEL_MARKER} " in (
        result.stderr)
    assert "Move or rename that folder" in result.stderr and "Traceback" not in result.stderr
    assert snapshot(tmp_path) == before and not (out / ".kfp").exists()  # no stage ran


def test_a_model_folder_filled_by_the_user_during_the_run_is_not_replaced(tmp_path):
    out = tmp_path / "out"
    staged = StagedOutputs(out, run_id="run-1")
    staged.prepare()
    stage_results(staged, tmp_path, b"new weights", b"rows")
    (out / "model").mkdir()
    (out / "model" / "mine.txt").write_text("copied here while the run went on")
    with pytest.raises(StageError, match=f"has no {MODEL_MARKER} marker"):
        staged.commit()
    assert [p.name for p in (out / "model").iterdir()] == ["mine.txt"]


def test_output_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(StageError, match="is a file, not a folder"):
        StagedOutputs(tmp_path / "out").prepare()


