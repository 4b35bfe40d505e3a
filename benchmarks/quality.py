"""The quality benchmark (`make quality`): what each part of the training data does to the embedded model.

From the fixture of generated Kubeflow queries (benchmarks/data), embed_score runs once per query selection and
mine_negatives once per needed setting (both cached under the work folder, keyed by the rows they read, their
settings and code: rows added to the fixture for one selection leave the others' results valid), then an ablation,
each step a finetune + evaluate of the embedded all-MiniLM-L6-v2:

    base                      no finetuning
    in-batch negatives only   one query per chunk (question style), no round-trip filter, in-batch negatives
    + LLM negatives           ... plus the generated negative as a hard negative
    + mined negatives         ... mined hard negatives instead of the generated one
    + round-trip filter       ... only rows whose chunk ranks in the top roundtrip_k for their query
    + 3 queries per chunk     ... every style the fixture has (only when it has them)

Every configuration is evaluated on the same queries: the test split's question-style rows kept by the default
filters (round-trip on), against all test chunks. The table has NDCG@10 at the full dimension and at 64 with the
paired-bootstrap 95% interval of the difference from the base model.

    python -m benchmarks.quality run [--epochs X ...]            # writes docs/quality.md
    python -m benchmarks.quality generate OUT --split test       # regenerate the fixture's queries (hours)
    python -m benchmarks.quality make-fixture OUT...              # concatenate them into the fixture
"""

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from benchmarks import fixture as fixture_module
from benchmarks import report, stages
from benchmarks.figures import generation_figures, sample_rows
from components.common import QUERY_STYLE, QUERY_VARIANT, SPLITS, get_logger, read_json, write_json

log = get_logger("quality")

WORK_DIR = stages.PROJECT_ROOT / ".cache" / "quality"
OUTPUT = stages.PROJECT_ROOT / "docs" / "quality.md"
KUBEFLOW_DOCS = stages.PROJECT_ROOT.parent / "shared" / "data" / "kubeflow-docs"
ONE, ALL = "one question per chunk", "all queries"  # the question row of each chunk (variant 0) / every row
DONE = "done.json"
# The pipeline's local finetune settings, but 1 epoch instead of 3. Measured on 2 busy CPU cores (load ~5): a step
# of batch 16 took 13 s with in-batch negatives, 21 s with the LLM negative and 27 s with 3 mined negatives, so five
# configurations over the ~1,000 train rows come to roughly an hour per epoch there (less on idle cores).
BENCH_EPOCHS = 1.0


def bench_train_settings() -> stages.TrainSettings:
    """The finetune settings `make quality` uses unless told otherwise."""
    return dataclasses.replace(stages.local_train_settings(), epochs=BENCH_EPOCHS)


@dataclasses.dataclass(frozen=True)
class Config:
    """One step of the ablation; `queries` None: the base model, not finetuned."""

    name: str
    queries: str | None = None
    roundtrip: bool = False
    negatives: str = "in-batch"


CONFIGS = (
    Config("base"),
    Config("in-batch negatives only", ONE, False, "in-batch"),
    Config("+ LLM negatives", ONE, False, "llm"),
    Config("+ mined negatives", ONE, False, "mined"),
    Config("+ round-trip filter", ONE, True, "mined"),
    Config("+ 3 queries per chunk", ALL, True, "mined"),
)


def digest(*parts: Any) -> str:
    """A short stable key of JSON-able parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def select(frames: dict[str, Any], queries: str) -> dict[str, Any]:
    """The rows of a query selection, per split."""
    if queries == ALL:
        return frames
    return {split: frame[(frame[QUERY_STYLE] == "question") & (frame[QUERY_VARIANT] == 0)].reset_index(drop=True)
            for split, frame in frames.items()}


def rows_key(frames: dict[str, Any]) -> str:
    """A short key of the rows' content, per split (column order and index do not matter)."""
    import pandas as pd

    return digest({split: hashlib.sha256(pd.util.hash_pandas_object(frame[sorted(frame.columns)], index=False)
                                         .to_numpy().tobytes()).hexdigest() for split, frame in frames.items()})


def has_more_queries(frames: dict[str, Any]) -> bool:
    """Whether the fixture's train split has rows beyond one question per chunk."""
    return len(select(frames, ALL)["train"]) > len(select(frames, ONE)["train"])


def cached_folder(folder: Path, build: Callable[[Path], Any]) -> Path:
    """`folder` built once: `build(partial folder)`, then renamed; a finished folder has DONE (with the seconds)."""
    if (folder / DONE).exists():
        return folder
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    started = time.time()
    build(partial)
    write_json(partial / DONE, {"seconds": time.time() - started})
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)
    return folder


def cached_json(path: Path, build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A result computed once and kept as JSON."""
    if path.exists():
        return read_json(path)
    value = build()
    write_json(path, value)
    return value


class Bench:
    """One benchmark run: the fixture, the work folder and the finetune settings; steps cached across runs."""

    def __init__(self, fixture: Path, work_dir: Path, train: stages.TrainSettings):
        self.fixture, self.work_dir, self.train_settings = Path(fixture), Path(work_dir), train
        self.frames = fixture_module.read_fixture(self.fixture)
        self.fixture_key = fixture_module.fixture_hash(self.fixture)
        self.seconds: dict[str, float] = {}
        self.labels: dict[str, str] = {}

    def scored(self, queries: str) -> Path:
        """embed_score over a query selection of the fixture, once for its rows."""
        selected = select(self.frames, queries)
        key = digest("embed", rows_key(selected), stages.source_hash("embed"), stages.EMBEDDING_MODEL)

        def build(out: Path) -> None:
            with tempfile.TemporaryDirectory(prefix="quality-input-") as folder:
                stages.embed(stages.write_dataset(selected, Path(folder)), out)

        folder = cached_folder(self.work_dir / f"scored-{key}", build)
        # A fixture with one question per chunk has the same rows under both selections: one folder, one entry.
        if folder.name not in self.labels:
            self.labels[folder.name] = label = f"embed_score ({queries})"
            self.seconds[label] = read_json(folder / DONE)["seconds"]
        return folder

    def mined(self, queries: str, roundtrip: bool) -> Path:
        """mine_negatives (default settings; round-trip filter on or off) over a query selection, once."""
        scored = self.scored(queries)
        selected = select(stages.read_dataset(scored), queries)
        rows = {split: list(zip(frame["chunk_id"], frame[QUERY_STYLE], frame[QUERY_VARIANT].astype(int)))
                for split, frame in selected.items()}
        settings = stages.mining_settings(None if roundtrip else 0)
        key = digest("mine", scored.name, rows, stages.source_hash("mine"), dataclasses.asdict(settings))

        def build(out: Path) -> None:
            with tempfile.TemporaryDirectory(prefix="quality-selected-") as folder:
                stages.mine(stages.write_dataset(selected, Path(folder)), out, settings.roundtrip_k)

        folder = cached_folder(self.work_dir / f"mined-{key}", build)
        # A fixture with one question per chunk has the same rows under both selections: one folder, one entry.
        label = f"mine_negatives ({queries}, round-trip filter {'on' if roundtrip else 'off'})"
        if folder.name not in self.labels:
            self.labels[folder.name] = label
            self.seconds[label] = read_json(folder / DONE)["seconds"]
        return folder

    def evaluation(self) -> dict[str, Any]:
        """The one evaluation set: the test split's question rows kept by the default filters."""
        test = stages.read_dataset(self.mined(ONE, roundtrip=True))["test"]
        evaluation = stages.evaluation_set(test)
        evaluation["id"] = digest(evaluation["queries"], evaluation["documents"], evaluation["relevant"])
        return evaluation

    def result(self, config: Config, evaluation: dict[str, Any]) -> dict[str, Any]:
        """Finetune (unless base) and evaluate one configuration; cached by its inputs, settings and code."""
        mined = self.mined(config.queries, config.roundtrip) if config.queries else None
        key = digest("result", mined.name if mined else "base", evaluation["id"], stages.source_hash("train"),
                     config.negatives if mined else None,
                     dataclasses.asdict(self.train_settings) if mined else None)

        def build() -> dict[str, Any]:
            log.info("configuration %r", config.name)
            started, training = time.time(), {}
            with tempfile.TemporaryDirectory(prefix="quality-model-") as model_dir:
                if mined is not None:
                    training = stages.train(mined, Path(model_dir), config.negatives, self.train_settings)
                measured = stages.measure(model_dir if mined is not None else stages.base_model_path(), evaluation)
            return {**measured, "eval_id": evaluation["id"], "eval_queries": len(evaluation["queries"]),
                    "seconds": time.time() - started, "training_rows": training.get("training_rows"),
                    "optimizer_steps": training.get("optimizer_steps"), "negatives": training.get("negatives")}

        return cached_json(self.work_dir / f"result-{key}.json", build)

    def run(self) -> dict[str, Any]:
        """Every configuration, the generation figures and the sample rows."""
        evaluation = self.evaluation()
        more = has_more_queries(self.frames)
        results = [{"name": config.name, **(self.result(config, evaluation) if more or config.queries != ALL
                                            else {"missing": "not in the fixture"})} for config in CONFIGS]
        frame = frame_of(stages.read_dataset(self.mined(ALL, roundtrip=True)))
        return {"configs": report.with_intervals(results, stages.gain_intervals),
                "evaluation": {"id": evaluation["id"], **evaluation["counts"]},
                "figures": generation_figures(frame), "samples": sample_rows(frame),
                "train": dataclasses.asdict(self.train_settings),
                "mining": dataclasses.asdict(stages.mining_settings()), "bootstrap": stages.bootstrap_settings(),
                "fixture": {"path": str(self.fixture.relative_to(stages.PROJECT_ROOT)
                                        if self.fixture.is_relative_to(stages.PROJECT_ROOT) else self.fixture),
                            "sha256_16": self.fixture_key, "counts": fixture_module.counts(frame_of(self.frames)),
                            "models": fixture_module.model_names(frame_of(self.frames))},
                "stage_seconds": self.seconds}


def frame_of(frames: dict[str, Any]):
    """The splits in one frame with a `split` column."""
    import pandas as pd

    return pd.concat([frame.assign(**{fixture_module.SPLIT: split}) for split, frame in frames.items()],
                     ignore_index=True)


def run(fixture: Path = fixture_module.FIXTURE, work_dir: Path = WORK_DIR, output: Path = OUTPUT,
        train: stages.TrainSettings | None = None, fresh: bool = False) -> dict[str, Any]:
    """Run the benchmark, print the table and write the Markdown report to `output`; return the results."""
    if fresh:
        shutil.rmtree(work_dir, ignore_errors=True)
    started = time.time()
    results = Bench(fixture, work_dir, train or bench_train_settings()).run()
    results["train_local_defaults"] = dataclasses.asdict(stages.local_train_settings())
    results.update(report.environment(), seconds=time.time() - started)
    write_json(Path(work_dir) / "results.json", results)
    print(report.table_text(results))
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(report.markdown(results), encoding="utf-8")
    print(f"\nwrote {output} ({results['seconds']:.0f} s)")
    return results


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line: run, make-fixture, generate."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("run", help="run the ablation and write docs/quality.md")
    bench.add_argument("--fixture", type=Path, default=fixture_module.FIXTURE)
    bench.add_argument("--work-dir", type=Path, default=WORK_DIR, help="cache of the stages' outputs")
    bench.add_argument("--output", type=Path, default=OUTPUT)
    bench.add_argument("--fresh", action="store_true", help="delete the cache first")
    for field in dataclasses.fields(stages.TrainSettings):
        bench.add_argument(f"--{field.name.replace('_', '-')}", type=float if field.type is float else int,
                           help=f"finetune {field.name} (default: " + (f"{BENCH_EPOCHS:g}" if field.name == "epochs"
                                                                        else "a local pipeline run's") + ")")
    make = commands.add_parser("make-fixture", help="concatenate generate_queries output folders into the fixture")
    make.add_argument("folders", nargs="+", type=Path)
    make.add_argument("--fixture", type=Path, default=fixture_module.FIXTURE)
    generate = commands.add_parser("generate", help="load_docs + generate_queries (embedded LLM) on the corpus")
    generate.add_argument("output_dir", type=Path)
    generate.add_argument("--source", default=str(KUBEFLOW_DOCS))
    generate.add_argument("--split", choices=(*SPLITS, "both"), default="both")
    generate.add_argument("--queries-per-chunk", type=int, default=1)
    generate.add_argument("--llm-cache", default=None, help="LLM cache folder (default: the local run's)")
    generate.add_argument("--limit", type=int, default=0, help="at most N chunks per split (0: all)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m benchmarks.quality`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    args = parse_arguments(argv)
    if args.command == "make-fixture":
        frame = fixture_module.make_fixture(args.folders, args.fixture,
                                            fixture_module.README if args.fixture == fixture_module.FIXTURE else None)
        print(f"wrote {args.fixture}: {len(frame)} rows\n{fixture_module.counts(frame)}")
    elif args.command == "generate":
        stats = stages.generate(args.source, args.output_dir, args.split, args.queries_per_chunk, args.llm_cache,
                                args.limit)
        print(f"wrote {args.output_dir}: {stats['rows']} rows, {stats['failed']} failed")
    else:
        given = {field.name: getattr(args, field.name) for field in dataclasses.fields(stages.TrainSettings)}
        train = dataclasses.replace(bench_train_settings(),
                                    **{name: value for name, value in given.items() if value is not None})
        run(args.fixture, args.work_dir, args.output, train, args.fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
