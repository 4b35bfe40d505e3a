"""The export stage: the final dataset as parquet per split, published columns first, plus the report files.

Written into the stage's output artifact and, when `output_uri` is set, into that results folder (a local folder
or gs:// prefix; docs/configuration.md#where-exports-go), each followed by `export.json`: the manifest, last.
"""

import os
import tempfile
from dataclasses import dataclass
from typing import Any

from kfp.dsl import Artifact, Dataset, Input, Output

from components.common import (
    EXPORT_SUMMARY,
    OUTPUT_COLUMNS,
    StageError,
    dataset_files,
    get_logger,
    read_splits,
    stage_component,
)
from components.settings import setting
from components.storage import write_results

log = get_logger("export")


@dataclass(frozen=True)
class ExportSettings:
    """Where the final dataset goes besides the pipeline's own artifacts (evaluate writes its report there too)."""

    # A local run sets it from --output-dir, so it has no flag of its own.
    output_uri: str = setting("", "folder that also receives train/test parquet, the report and the evaluation "
                              "(empty: the pipeline's artifacts only)", cli=False)


def final_frames(scored_dir: str | os.PathLike) -> dict[str, Any]:
    """The published columns in their documented order, then the diagnostic columns."""
    frames = read_splits(scored_dir)
    for split, frame in frames.items():
        missing = [column for column in OUTPUT_COLUMNS if column not in frame.columns]
        if missing:
            raise StageError(f"The scored {split} split lacks columns {missing}; was embed_score run on it?")
        extra = [column for column in frame.columns if column not in OUTPUT_COLUMNS]
        frames[split] = frame[[*OUTPUT_COLUMNS, *extra]]
    return frames


def export(
    scored_dir: str | os.PathLike,
    report_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
) -> dict[str, Any]:
    """Write train/test parquet and the report files into output_dir (a folder or gs:// prefix), then export.json;
    return export.json's content."""
    frames = final_frames(scored_dir)
    rows = {split: len(frame) for split, frame in frames.items()}
    with tempfile.TemporaryDirectory() as tmp:
        files = dataset_files(frames, report_dir, tmp)
        summary = write_results(files, str(output_dir), EXPORT_SUMMARY, extra={"rows": rows, "files": list(files)})
    log.info("exported %s to %s", rows, summary["uri"])
    return summary


@stage_component("export")
def export_component(scored: Input[Dataset], report_files: Input[Artifact], output_uri: str, dataset: Output[Dataset]):
    """Write the final train/test parquet (and the report) to the output artifact and to output_uri if set."""
    from components.export import ExportSettings, export
    from components.settings import from_arguments

    settings = from_arguments(ExportSettings, locals())
    summary = export(scored.path, report_files.path, dataset.path)
    if settings.output_uri:
        export(scored.path, report_files.path, settings.output_uri)
    dataset.metadata.update(summary["rows"])
