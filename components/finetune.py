"""The finetune stage: train the embedding model on the train split's rows that passed every filter.

The generated query (`positive`) is the query and its chunk (`anchor`) the document, the direction retrieval
runs in. MultipleNegativesRankingLoss uses the other documents in a batch as negatives (a no-duplicates batch
sampler keeps a text out of a batch that already holds it, so with several queries per chunk a query never meets
its own chunk as a negative), plus explicit hard negatives by `finetune_negatives`: "mined" (default) the row's
`hard_negatives` from mine_negatives, "llm" the generated `negative`, "in-batch" none. On a GPU the cached variant
(GradCache) computes the same loss in mini-batches, so the batch (and its in-batch negatives) can be large.
MatryoshkaLoss applies it at every dimension in `matryoshka_dims`, the full one included.

The training rows are prepared by components/finetune_data.py: streamed from the scored split into a memory-mapped
Arrow file in a temporary folder, so the stage's memory does not grow with the number of rows (its temp disk does).
"""

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kfp.dsl import Dataset, Input, Model, Output

from components.common import (
    DOCUMENT_PROMPT_NAMES,
    QUERY_PROMPT_NAMES,
    StageError,
    get_logger,
    matryoshka_dims,
    model_prompt,
    resolve_embedding_model,
    stage_component,
    write_json,
)
from components.finetune_data import (
    DEFAULT_NEGATIVES,
    DEFAULT_SEED,
    NEGATIVE_MODES,
    QUERY_COLUMN,
    negative_mode,
    temporary_training_data,
)
from components.settings import setting

log = get_logger("finetune")

# Cluster defaults (a few hundred to a thousand train rows): with batch 32 these give ~100 optimizer steps.
DEFAULT_EPOCHS = 3
DEFAULT_BATCH_SIZE = 32
DEFAULT_MINI_BATCH_SIZE = 32
DEFAULT_LEARNING_RATE = 2e-5
DEFAULT_WARMUP_RATIO = 0.1
# Fewer optimizer steps than this rarely move a model; the stage warns, it does not refuse.
FEW_STEPS = 50
TRAINING_STATS = "training_stats.json"


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
