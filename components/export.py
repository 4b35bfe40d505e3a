"""Stage 5, export: the final dataset as parquet per split, published columns first, plus the report files.

Written into the stage's output artifact (object storage in the cluster) and, when `output_uri` is set, into
that folder as well.
"""

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kfp.dsl import Artifact, Dataset, Input, Output

from components.common import (
    OUTPUT_COLUMNS,
    StageError,
    stage_component,
    get_logger,
    read_splits,
    write_json,
    write_splits,
)
from components.settings import setting

log = get_logger("export")
REPORT_FILES = ("report.html", "report.md", "similarity_histograms.png", "metrics.json", "stats.json")


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
    """Write train/test parquet and the report files into output_dir; return what was written."""
    if "://" in str(output_dir):
        raise StageError(f"Export to {output_dir}: only local folders are supported in this version.")
    frames = final_frames(scored_dir)
    output_dir = Path(output_dir)
    write_splits(frames, output_dir)
    copied = []
    for name in REPORT_FILES:
        source = Path(report_dir) / name
        if source.exists():
            shutil.copyfile(source, output_dir / name)
            copied.append(name)
    summary = {"output_dir": str(output_dir.resolve()), "rows": {split: len(frame) for split, frame in frames.items()},
               "files": [f"{split}.parquet" for split in frames] + copied}
    write_json(output_dir / "export.json", summary)
    log.info("exported %s to %s", summary["rows"], output_dir)
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
