"""The finetune stage: train the embedding model on the train split's rows that passed every filter.

The generated query (`positive`) is the query and its chunk (`anchor`) the document, the direction retrieval
runs in. MultipleNegativesRankingLoss uses the other documents in a batch as negatives (a no-duplicates batch
sampler keeps a text out of a batch that already holds it, so with several queries per chunk a query never meets
its own chunk as a negative), plus explicit hard negatives by `finetune_negatives`: "mined" (default) the row's
`hard_negatives` from mine_negatives, "llm" the generated `negative`, "in-batch" none. On a GPU the cached variant
(GradCache) computes the same loss in mini-batches, so the batch (and its in-batch negatives) can be large.
MatryoshkaLoss applies it at every dimension in `matryoshka_dims`, the full one included.

The training rows are read from the scored split in batches and written, batch by batch, to an Arrow file in a
temporary folder of the task's local temp dir; the trainer reads it memory-mapped, and the folder is removed when
training ends or fails. So the stage's memory does not grow with the number of rows; its temp disk does.
"""

import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kfp.dsl import Dataset, Input, Model, Output

from components.common import (
    ANCHOR,
    DOCUMENT_PROMPT_NAMES,
    FILTER_STATUS,
    GENERATION_STATUS,
    HARD_NEGATIVES,
    NEGATIVE,
    POSITIVE,
    QUERY_PROMPT_NAMES,
    StageError,
    get_logger,
    matryoshka_dims,
    model_prompt,
    resolve_embedding_model,
    split_path,
    stage_component,
    training_rows,
    valid_pairs,
    write_json,
)
from components.parquet_stream import input_schema, iter_frames
from components.settings import setting

log = get_logger("finetune")

# Cluster defaults (a few hundred to a thousand train rows): with batch 32 these give ~100 optimizer steps.
DEFAULT_EPOCHS = 3
DEFAULT_BATCH_SIZE = 32
DEFAULT_MINI_BATCH_SIZE = 32
DEFAULT_LEARNING_RATE = 2e-5
DEFAULT_WARMUP_RATIO = 0.1
DEFAULT_SEED = 42
NEGATIVE_MODES = ("mined", "in-batch", "llm")
# Mined, positive-aware negatives are the issue-9 default; the generated negative lowered NDCG@10 on the embedded
# 135M LLM's data (README: it is often as close to the chunk as the positive), so "llm" stays an option.
DEFAULT_NEGATIVES = "mined"
# Fewer optimizer steps than this rarely move a model; the stage warns, it does not refuse.
FEW_STEPS = 50
TRAINING_STATS = "training_stats.json"
TRAINING_DATA = "training.arrow"  # the prepared dataset, in a temporary folder while the stage trains
# Rows per batch read from the scored split. A training row carries 2 + k texts of up to a chunk's length, so 1,024
# rows are ~10 MB of text; the allocators keep a few batches' worth resident. Measured (memory benchmark data):
# 4,096-row batches peaked ~200 MB above the imports, 1,024-row ones ~100 MB, the same at 20,000 and 60,000 rows.
TRAINING_STREAM_ROWS = 1024

QUERY_COLUMN, DOCUMENT_COLUMN, HARD_NEGATIVE_COLUMN = "query", "document", "hard_negative"
MINED_COLUMN = "negative_{}"  # negative_1 ... negative_k in mined mode
# What the training rows are chosen and built from; the scored split's other columns (vectors) are never read.
TRAINING_COLUMNS = (ANCHOR, POSITIVE, NEGATIVE, GENERATION_STATUS, FILTER_STATUS, HARD_NEGATIVES)


@dataclass(frozen=True)
class FinetuneSettings:
    """Training settings; a local CPU run uses a smaller batch so a few hundred rows still give enough steps."""

    finetune_epochs: float = setting(float(DEFAULT_EPOCHS), "finetuning epochs", minimum=0.01,
                                     maximum=1000.0)
    finetune_batch_size: int = setting(DEFAULT_BATCH_SIZE, "pairs per optimizer step; also the in-batch negatives",
                                       local=16, minimum=2, maximum=65536)
    finetune_learning_rate: float = setting(DEFAULT_LEARNING_RATE, "peak learning rate", minimum=1e-9, maximum=1.0)
    finetune_warmup_ratio: float = setting(DEFAULT_WARMUP_RATIO, "fraction of the steps spent warming up",
                                           minimum=0.0, maximum=0.99)
    finetune_negatives: str = setting(DEFAULT_NEGATIVES, "explicit negatives besides the batch's other chunks: "
                                      "'mined' (mine_negatives' hard negatives), 'llm' (the generated negative) or "
                                      "'in-batch' (none)", choices=NEGATIVE_MODES)
    finetune_hard_negatives: bool = setting(False, "deprecated: true is finetune_negatives='llm' (the generated "
                                            "negative as hard negative); false leaves finetune_negatives to decide")
    finetune_mini_batch_size: int = setting(DEFAULT_MINI_BATCH_SIZE, "on a GPU, texts per forward pass of the cached "
                                            "loss (memory only: the batch size stays the in-batch negatives)",
                                            minimum=1, maximum=65536)
    finetune_seed: int = setting(DEFAULT_SEED, "random seed of the training run", minimum=0, maximum=2**32 - 1)


def negative_mode(negatives: str, hard_negatives: bool = False) -> str:
    """The negatives mode, with the deprecated `finetune_hard_negatives=true` meaning "llm" as it always did."""
    if negatives not in NEGATIVE_MODES:
        raise StageError(f"finetune_negatives must be one of {', '.join(NEGATIVE_MODES)}, not {negatives!r}.")
    if hard_negatives and negatives != "llm":
        log.warning("finetune_hard_negatives=true is deprecated: using finetune_negatives='llm' instead of %r",
                    negatives)
        return "llm"
    return negatives


def _as_list(value) -> list:
    # Parquet hands list cells back as numpy arrays, and a row without negatives as None.
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    return [text for text in value if isinstance(text, str) and text.strip()]


class SplitScan:
    """What the train split's rows add up to, gathered batch by batch (`add`): the counts and, for mined negatives,
    the split's distinct chunks (the fill-in pool, each with its position in first-appearance order) and the width
    (the most mined negatives any training row has). The rows themselves are not kept."""

    def __init__(self, keep_pool: bool):
        self.keep_pool, self.pool, self.width = keep_pool, {}, 0
        self.counts = {"train_rows": 0, "valid_train_rows": 0, "training_rows": 0}

    def add(self, frame, rows) -> None:
        """Count a batch of the split (`rows`: its training rows) and remember its new chunks."""
        self.counts["train_rows"] += len(frame)
        self.counts["valid_train_rows"] += len(valid_pairs(frame))
        self.counts["training_rows"] += len(rows)
        if not self.keep_pool:
            return
        for text in frame[ANCHOR]:
            if isinstance(text, str) and text not in self.pool:
                self.pool[text] = len(self.pool)
        self.width = max(self.width, max((len(_as_list(value)) for value in rows[HARD_NEGATIVES]), default=0))


def _pool_position(pick: int, excluded: list[int]) -> int:
    """The pool position of the `pick`-th chunk that is not excluded (`excluded`: ascending pool positions)."""
    position = pick
    for skipped in excluded:
        if skipped > position:
            break
        position += 1
    return position


class FillIns:
    """Completes each training row's mined negatives to `width`, rows in the split's order.

    A row with fewer than `width` mined negatives (the margin removed candidates, or a small split) gets the missing
    ones filled with random other chunks of the same split, seeded so a rerun trains on the same tuples: the loss
    needs every row to have the same number of negatives. A fill-in is never the row's own chunk nor one of its
    negatives already. The picks index the pool without the excluded chunks; they are mapped to pool positions
    instead of building that list, so a row costs its own negatives, not the pool's size.
    """

    def __init__(self, pool: dict[str, int], width: int, seed: int):
        import numpy as np

        self.chunks, self.position, self.width = list(pool), pool, width
        self.rng = np.random.default_rng(seed)
        self.counts = {"hard_negative_columns": width, "rows_filled": 0, "negatives_filled": 0}

    def complete(self, negatives: list[str], own) -> list[str]:
        """`negatives` (a row's mined ones), extended to `width`."""
        need = self.width - len(negatives)
        if need <= 0:
            return negatives
        excluded = sorted({self.position[text] for text in (own, *negatives) if text in self.position})
        allowed = len(self.chunks) - len(excluded)
        if not allowed:
            raise StageError(f"The train split has {len(self.chunks)} distinct chunks: too few to give a row "
                             f"{self.width} negatives other than its own chunk. Use more documents or "
                             "finetune_negatives='in-batch'.")
        # Repeats only when the split has fewer other chunks than a row needs.
        picks = self.rng.choice(allowed, size=need, replace=allowed < need)
        negatives.extend(self.chunks[_pool_position(int(pick), excluded)] for pick in picks)
        self.counts["rows_filled"] += 1
        self.counts["negatives_filled"] += need
        return negatives


def training_batch(rows, schema, fill: FillIns | None):
    """The loss's columns (`schema`: strings, in the loss's order) for a batch of training rows, as a record batch."""
    import pyarrow as pa

    columns = {QUERY_COLUMN: list(rows[POSITIVE]), DOCUMENT_COLUMN: list(rows[ANCHOR])}
    if HARD_NEGATIVE_COLUMN in schema.names:
        columns[HARD_NEGATIVE_COLUMN] = list(rows[NEGATIVE])
    if fill is not None:
        tuples = [fill.complete(_as_list(value), own) for value, own in zip(rows[HARD_NEGATIVES], rows[ANCHOR])]
        columns.update((MINED_COLUMN.format(i + 1), [negatives[i] for negatives in tuples])
                       for i in range(fill.width))
    return pa.record_batch([pa.array(columns[name], type=pa.string()) for name in schema.names], schema=schema)


def prepare_training_data(frames: Callable[[], Iterable[Any]], columns, negatives: str = DEFAULT_NEGATIVES,
                          seed: int = DEFAULT_SEED, folder: str | os.PathLike | None = None):
    """(the columns the loss sees, in its order: query, document[, negatives...]; counts) from the train split's
    frames. Only training_rows train: valid rows that passed every filter of mine_negatives.

    `frames()` gives the split's frames (batches of rows) afresh on each call; `columns` are the split's columns.
    The dataset is written batch by batch as an Arrow file in `folder` and memory-mapped from there, so its size
    on disk, not in memory, grows with the split (the caller removes the folder after training); without a folder
    it is built in memory (small inputs and tests). Mined negatives take two passes over the frames: the fill-in
    pool and the number of negative columns must be known before the first row is written.
    """
    import pyarrow as pa
    from datasets import Dataset as HFDataset

    mined = negatives == "mined"
    if mined and HARD_NEGATIVES not in columns:
        raise StageError(f"finetune_negatives='mined' needs the '{HARD_NEGATIVES}' column written by "
                         "mine_negatives, and the train split has none. Run mine_negatives first, or set "
                         "finetune_negatives to 'in-batch' or 'llm'.")
    scan = SplitScan(keep_pool=mined)
    if mined:
        for frame in frames():
            if len(frame):
                scan.add(frame, training_rows(frame))
    names, fill = [QUERY_COLUMN, DOCUMENT_COLUMN], None
    if negatives == "llm":
        names.append(HARD_NEGATIVE_COLUMN)
    elif mined:
        fill = FillIns(scan.pool, scan.width, seed)
        names.extend(MINED_COLUMN.format(i + 1) for i in range(scan.width))
    schema = pa.schema([(name, pa.string()) for name in names])
    path = None if folder is None else os.path.join(folder, TRAINING_DATA)
    sink = pa.BufferOutputStream() if path is None else pa.OSFile(path, "wb")
    try:
        with pa.ipc.new_stream(sink, schema) as writer:
            for frame in frames():
                if not len(frame):
                    continue
                rows = training_rows(frame)
                if not mined:  # counted here: one pass is enough without mined negatives
                    scan.add(frame, rows)
                if len(rows):
                    writer.write_batch(training_batch(rows, schema, fill))
    finally:
        if path is not None:
            sink.close()
    counts = {**scan.counts, "hard_negative_columns": len(names) - 2, **(fill.counts if fill else {})}
    # Datasets reads the stream format it writes itself; from a file it memory-maps, so only pages read are resident.
    dataset = HFDataset.from_buffer(sink.getvalue()) if path is None else HFDataset.from_file(path)
    return dataset, counts


def training_dataset(frame, negatives: str = DEFAULT_NEGATIVES, seed: int = DEFAULT_SEED):
    """(the columns the loss sees; counts) from a train split already in memory, built in memory."""
    return prepare_training_data(lambda: [frame], list(frame.columns), negatives, seed)


def pick_precision() -> tuple[bool, str]:
    """(use CUDA, precision): bf16 where the GPU supports it, fp32 otherwise (and always on CPU)."""
    import torch

    if not torch.cuda.is_available():
        return False, "fp32"
    return True, "bf16" if torch.cuda.is_bf16_supported() else "fp32"


def build_loss(model, dims: list[int], cached: bool, mini_batch_size: int):
    """MatryoshkaLoss over MNRL; `cached` (on a GPU) the cached MNRL, whose memory grows with the mini-batch, not
    the batch: the same loss value, computed in mini-batches with gradient caching."""
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        MatryoshkaLoss,
        MultipleNegativesRankingLoss,
    )

    inner = (CachedMultipleNegativesRankingLoss(model, mini_batch_size=mini_batch_size) if cached
             else MultipleNegativesRankingLoss(model))
    return MatryoshkaLoss(model, inner, matryoshka_dims=dims)


def column_prompts(model, column_names: list[str]) -> dict[str, str]:
    """The trainer's `prompts`: the model's query prompt on the query column, its document prompt on the others."""
    query_prompt = model_prompt(model, *QUERY_PROMPT_NAMES)
    document_prompt = model_prompt(model, *DOCUMENT_PROMPT_NAMES)
    prompts = {QUERY_COLUMN: query_prompt} if query_prompt else {}
    if document_prompt:
        prompts.update((name, document_prompt) for name in column_names if name != QUERY_COLUMN)
    return prompts


def check_finite(model, log_history: list[dict], train_loss: float) -> None:
    """Fail the stage when training diverged: a NaN/inf loss in the trainer's log or any NaN/inf weight."""
    import torch

    losses = [entry["loss"] for entry in log_history if "loss" in entry] + [train_loss]
    bad_loss = [loss for loss in losses if not math.isfinite(float(loss))]
    bad_weights = [name for name, parameter in model.named_parameters() if not torch.isfinite(parameter).all()]
    if bad_loss or bad_weights:
        found = (f"{len(bad_loss)} non-finite loss values" if bad_loss else "a finite loss") + (
            f" and non-finite weights in {len(bad_weights)} tensors (first: {bad_weights[0]})" if bad_weights else "")
        raise StageError(f"Finetuning diverged: {found}. The model is not saved. Lower finetune_learning_rate "
                         "(the default is 2e-05) or raise finetune_warmup_ratio, and run again.")


def train(model, dataset, loss, settings: dict[str, Any], use_cuda: bool, precision: str) -> dict[str, Any]:
    """Run the sentence-transformers trainer; (mean loss, loss history, steps, seconds); checks the result is finite."""
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.training_args import BatchSamplers

    with tempfile.TemporaryDirectory(prefix="finetune-") as checkpoints:
        arguments = SentenceTransformerTrainingArguments(
            output_dir=checkpoints,
            num_train_epochs=settings["epochs"],
            per_device_train_batch_size=settings["batch_size"],
            learning_rate=settings["learning_rate"],
            # Transformers 5 takes the warmup ratio as a float `warmup_steps` below 1 (`warmup_ratio` is deprecated).
            warmup_steps=settings["warmup_ratio"],
            batch_sampler=BatchSamplers.NO_DUPLICATES,
            prompts=column_prompts(model, dataset.column_names) or None,
            bf16=precision == "bf16",
            use_cpu=not use_cuda,
            seed=settings["seed"],
            data_seed=settings["seed"],
            save_strategy="no",
            logging_steps=max(1, settings["planned_steps"] // 10),
            report_to="none",
            disable_tqdm=True,
        )
        trainer = SentenceTransformerTrainer(model=model, args=arguments, train_dataset=dataset, loss=loss)
        result = trainer.train()
    check_finite(model, trainer.state.log_history, result.training_loss)
    return {"train_loss": float(result.training_loss),
            "loss_history": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
            "optimizer_steps": int(trainer.state.global_step),
            "train_seconds": float(result.metrics.get("train_runtime", 0.0))}


def load_training_data(scored_dir, negatives: str, seed: int, batch_size: int,
                       stream_rows: int = TRAINING_STREAM_ROWS, folder: str | os.PathLike | None = None):
    """(dataset, counts, batch size): the train split's training rows; at least 2 of them, batch no larger.

    The split is read `stream_rows` rows at a time and only the columns training needs (never the vectors); the
    dataset goes to an Arrow file in `folder` (see prepare_training_data), or into memory without one.
    """
    path = split_path(scored_dir, "train")
    if not path.exists():
        raise StageError(f"Expected {path} from the previous stage, but it does not exist.")
    present = input_schema(path).names
    wanted = [name for name in TRAINING_COLUMNS if name in present]
    dataset, counts = prepare_training_data(lambda: iter_frames(path, stream_rows, columns=wanted), present,
                                            negatives, seed, folder)
    if len(dataset) < 2:
        raise StageError(f"The train split has {len(dataset)} training rows (of {counts['train_rows']}: failed "
                         "generations, empty fields and rows dropped by mine_negatives' filters are left out); "
                         "finetuning needs at least 2. Generate more data or relax the filters.")
    if batch_size > len(dataset):
        log.warning("batch size %d is more than the %d training rows; using %d", batch_size, len(dataset),
                    len(dataset))
    return dataset, counts, min(batch_size, len(dataset))


@contextmanager
def temporary_training_data(scored_dir, negatives: str, seed: int, batch_size: int,
                            stream_rows: int = TRAINING_STREAM_ROWS) -> Iterator[tuple[Any, dict[str, int], int]]:
    """load_training_data with the dataset on disk, in a folder of the task's local temp dir removed on exit (also
    on error). Keep the trainer inside the block: the dataset is memory-mapped from that folder.

    The folder is made by `tempfile` (`$TMPDIR`, else /tmp): in a pipeline task that is the container's own
    ephemeral disk, and the file is about the size of the training texts (rows x (2 + negative columns) texts).
    """
    with tempfile.TemporaryDirectory(prefix="finetune-data-") as folder:
        yield load_training_data(scored_dir, negatives, seed, batch_size, stream_rows, folder)


def finetune(
    scored_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    embedding_model: str,
    epochs: float = DEFAULT_EPOCHS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    warmup_ratio: float = DEFAULT_WARMUP_RATIO,
    negatives: str = DEFAULT_NEGATIVES,
    mini_batch_size: int = DEFAULT_MINI_BATCH_SIZE,
    seed: int = DEFAULT_SEED,
) -> dict[str, Any]:
    """Finetune `embedding_model` on the train split; save the model folder and `training_stats.json` in it."""
    from sentence_transformers import SentenceTransformer
    from transformers import set_seed

    if epochs <= 0 or batch_size < 2 or learning_rate <= 0 or not 0 <= warmup_ratio < 1 or mini_batch_size < 1:
        raise StageError(f"Finetune settings out of range: epochs={epochs} (> 0), batch_size={batch_size} (>= 2, "
                         f"in-batch negatives need company), learning_rate={learning_rate} (> 0), "
                         f"warmup_ratio={warmup_ratio} (0 to < 1), mini_batch_size={mini_batch_size} (>= 1).")
    negatives = negative_mode(negatives)
    # The prepared dataset lives in a temporary folder until training is done (see temporary_training_data).
    with temporary_training_data(scored_dir, negatives, seed, batch_size) as (dataset, counts, batch_size):
        use_cuda, precision = pick_precision()
        path, label = resolve_embedding_model(embedding_model)
        set_seed(seed)
        model = SentenceTransformer(path, device="cuda" if use_cuda else "cpu")
        full_dimension = int(model.get_embedding_dimension())
        dims = matryoshka_dims(full_dimension)
        loss = build_loss(model, dims, cached=use_cuda, mini_batch_size=mini_batch_size)
        planned_steps = math.ceil(math.ceil(len(dataset) / batch_size) * epochs)
        settings = {"epochs": epochs, "batch_size": int(batch_size), "learning_rate": learning_rate,
                    "warmup_ratio": warmup_ratio, "seed": int(seed), "planned_steps": planned_steps}
        log.info("finetuning %s on %d training rows (of %d), negatives %s (%d columns), %s: %d optimizer steps, batch "
                 "%d, lr %g, warmup %.2f, %s on %s, Matryoshka dims %s", label, len(dataset), counts["train_rows"],
                 negatives, counts["hard_negative_columns"], type(loss.loss).__name__, planned_steps, batch_size,
                 learning_rate, warmup_ratio, precision, "cuda" if use_cuda else "cpu", dims)
        if planned_steps < FEW_STEPS:
            log.warning("only %d optimizer steps (< %d): expect little change; use more data, more epochs or a smaller "
                        "batch size", planned_steps, FEW_STEPS)
        trained = train(model, dataset, loss, settings, use_cuda, precision)

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save(str(output_dir))
    stats: dict[str, Any] = {
        **counts, **settings, **trained, "base_model": label, "dimension": full_dimension, "matryoshka_dims": dims,
        "query_prompt": model_prompt(model, *QUERY_PROMPT_NAMES),
        "document_prompt": model_prompt(model, *DOCUMENT_PROMPT_NAMES), "negatives": negatives,
        "loss": f"MatryoshkaLoss({type(loss.loss).__name__})", "mini_batch_size": int(mini_batch_size),
        "precision": precision, "device": "cuda" if use_cuda else "cpu"}
    write_json(output_dir / TRAINING_STATS, stats)
    log.info("finetuned in %d steps (%.0f s), mean loss %.4f; saved to %s", stats["optimizer_steps"],
             stats["train_seconds"], stats["train_loss"], output_dir)
    return stats


@stage_component("finetune")
def finetune_component(
    scored: Input[Dataset],
    embedding_model: str,
    finetune_epochs: float,
    finetune_batch_size: int,
    finetune_learning_rate: float,
    finetune_warmup_ratio: float,
    finetune_negatives: str,
    finetune_hard_negatives: bool,
    finetune_mini_batch_size: int,
    finetune_seed: int,
    model: Output[Model],
):
    """Finetune the embedding model on the train split's training rows (MNRL inside MatryoshkaLoss)."""
    from components.finetune import FinetuneSettings, finetune, negative_mode
    from components.settings import from_arguments

    settings = from_arguments(FinetuneSettings, locals())
    stats = finetune(scored.path, model.path, embedding_model, epochs=settings.finetune_epochs,
                     batch_size=settings.finetune_batch_size, learning_rate=settings.finetune_learning_rate,
                     warmup_ratio=settings.finetune_warmup_ratio,
                     negatives=negative_mode(settings.finetune_negatives, settings.finetune_hard_negatives),
                     mini_batch_size=settings.finetune_mini_batch_size, seed=settings.finetune_seed)
    model.metadata.update({key: stats[key] for key in ("base_model", "dimension", "matryoshka_dims", "negatives",
                                                        "optimizer_steps", "training_rows", "valid_train_rows",
                                                        "precision", "loss", "train_loss")})
