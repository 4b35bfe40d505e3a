"""Every call the benchmark makes into the pipeline's stages, in one place.

The benchmark runs the stages' plain functions (no KFP), exactly as the components call them, so it measures the
code the pipeline runs. When a stage's signature changes, this module is the only one to adjust.
"""

import dataclasses
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

from components.common import EMBEDDED_EMBEDDING_MODEL, SPLITS, read_splits, resolve_embedding_model, write_splits

# The embedded all-MiniLM-L6-v2: embeds, mines, filters, is finetuned and is the base it is compared against.
EMBEDDING_MODEL = EMBEDDED_EMBEDDING_MODEL
PROJECT_ROOT = Path(__file__).resolve().parents[1]
# The modules whose code decides each cached step's result: a change to one of them invalidates the cache.
STEP_SOURCES = {
    "embed": ("components/embed_score.py", "components/common.py"),
    "mine": ("components/mine_negatives.py", "components/common.py"),
    "train": ("components/finetune.py", "components/evaluate.py", "components/evaluate_stats.py"),
    "generate": ("components/generate_queries/*.py", "components/generate_queries/templates/*",
                 "components/load_docs/*.py", "components/common.py", "components/settings.py"),
}


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """What finetune gets besides its data and its negatives mode."""

    epochs: float
    batch_size: int
    learning_rate: float
    warmup_ratio: float
    seed: int
    mini_batch_size: int


def local_train_settings() -> TrainSettings:
    """The finetune settings of a local pipeline run (`pipeline.py run` defaults)."""
    from components.finetune import FinetuneSettings
    from components.settings import build

    local = build(FinetuneSettings, {}, local=True)
    return TrainSettings(epochs=local.finetune_epochs, batch_size=local.finetune_batch_size,
                         learning_rate=local.finetune_learning_rate, warmup_ratio=local.finetune_warmup_ratio,
                         seed=local.finetune_seed, mini_batch_size=local.finetune_mini_batch_size)


def source_hash(step: str) -> str:
    """A digest of the code a step runs (STEP_SOURCES: paths or glob patterns), for cache keys."""
    digest = hashlib.sha256()
    for name in STEP_SOURCES[step]:
        paths = sorted(path for path in PROJECT_ROOT.glob(name) if path.is_file())
        if not paths:
            digest.update(name.encode())
        for path in paths:
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def generate(source: str, output_dir: Path, split: str, queries_per_chunk: int,
             llm_cache: str | None = None, limit: int = 0) -> dict[str, Any]:
    """load_docs then generate_queries with the local (embedded LLM) settings, for one split or both; the other
    split is left empty so a long generation can run in passes. Every row is kept, failed ones too. The LLM cache
    is the local run's unless given; `limit` (0: all) chunks per split, for a quick try."""
    from components.generate_queries import GenerationSettings
    from components.generate_queries.run import generate_queries
    from components.load_docs import load_docs
    from components.settings import build

    values = {"queries_per_chunk": queries_per_chunk, "max_failure_rate": 1.0}
    settings = build(GenerationSettings, values if llm_cache is None else {**values, "llm_cache_uri": llm_cache},
                     local=True)
    with tempfile.TemporaryDirectory(prefix="quality-docs-") as docs:
        load_docs(source, docs, limit=limit or None)
        if split != "both":
            frames = read_splits(docs)
            write_splits({name: frame if name == split else frame.head(0) for name, frame in frames.items()}, docs)
        return generate_queries(docs, output_dir, settings)


def embed(input_dir: Path, output_dir: Path, backend: str = "torch") -> dict[str, Any]:
    """embed_score with the embedded model, on the CPU for an exported `backend` (embedding_backend)."""
    from components.embed_score import embed_score

    return embed_score(input_dir, output_dir, EMBEDDING_MODEL, backend=backend)


def mining_settings(roundtrip_k: int | None = None):
    """mine_negatives' defaults, with another round-trip k if given (0: no round-trip filter)."""
    from components.mine_negatives import MineNegativesSettings

    defaults = MineNegativesSettings()
    return defaults if roundtrip_k is None else dataclasses.replace(defaults, roundtrip_k=roundtrip_k)


def mine(scored_dir: Path, output_dir: Path, roundtrip_k: int) -> dict[str, Any]:
    """mine_negatives with its default settings but `roundtrip_k`."""
    from components.mine_negatives import mine_negatives

    return mine_negatives(scored_dir, output_dir, EMBEDDING_MODEL, mining_settings(roundtrip_k))


def train(mined_dir: Path, model_dir: Path, negatives: str, settings: TrainSettings) -> dict[str, Any]:
    """finetune on the train split's training rows with `negatives` ("in-batch", "llm" or "mined")."""
    from components.finetune import finetune

    return finetune(mined_dir, model_dir, EMBEDDING_MODEL, epochs=settings.epochs, batch_size=settings.batch_size,
                    learning_rate=settings.learning_rate, warmup_ratio=settings.warmup_ratio, negatives=negatives,
                    mini_batch_size=settings.mini_batch_size, seed=settings.seed)


def evaluation_set(test) -> dict[str, Any]:
    """The evaluate stage's queries (the test frame's training rows), corpus (its distinct chunks) and answers."""
    from components.evaluate import evaluation_set as stage_evaluation_set

    queries, documents, relevant, counts = stage_evaluation_set({"test": test})
    return {"queries": queries, "documents": documents, "relevant": relevant, "counts": counts}


def base_model_path() -> str:
    """Where the embedded base model's files are."""
    return resolve_embedding_model(EMBEDDING_MODEL)[0]


def measure(model_path: str, evaluation: dict[str, Any]) -> dict[str, Any]:
    """The evaluate stage's metrics of a model on the evaluation set: {"metrics": dim -> metric -> mean,
    "per_query": dim -> per-query NDCG@10 (lists, what the paired bootstrap resamples)}."""
    from components.evaluate import evaluate_model
    from components.evaluate_stats import GATE_METRIC

    result = evaluate_model(str(model_path), evaluation["queries"], evaluation["documents"], evaluation["relevant"])
    return {"metrics": result["metrics"],
            "per_query": {dim: [float(value) for value in values[GATE_METRIC]]
                          for dim, values in result["per_query"].items()}}


def gain_intervals(base: dict[str, list[float]], tuned: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """dim -> {gain, low, high}: the evaluate stage's paired bootstrap of the NDCG@10 difference (fixed seed)."""
    from components.evaluate_stats import paired_bootstrap

    return paired_bootstrap(base, tuned)


def bootstrap_settings() -> dict[str, Any]:
    """The bootstrap's resamples, seed and confidence, as the evaluate stage uses them."""
    from components.evaluate_stats import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, CONFIDENCE, GATE_METRIC

    return {"metric": GATE_METRIC, "resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED,
            "confidence": CONFIDENCE}


def write_dataset(frames: dict[str, Any], folder: Path) -> Path:
    """A stage input folder (train.parquet and test.parquet) from frames keyed by split."""
    write_splits({split: frames[split] for split in SPLITS}, folder)
    return folder


def read_dataset(folder: str | os.PathLike) -> dict[str, Any]:
    """A stage output folder's splits."""
    return read_splits(folder)
