"""The finetune stage: train the embedding model on the train split's valid (query, document) pairs.

The generated query (`positive`) is the query and its chunk (`anchor`) the document, the direction retrieval
runs in. MultipleNegativesRankingLoss uses the other documents in a batch as negatives (a no-duplicates batch
sampler keeps a text from being its own negative), optionally plus the generated `negative` as an explicit hard
negative; MatryoshkaLoss applies it at every dimension in `matryoshka_dims`, the full one included.
"""

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kfp.dsl import Dataset, Input, Model, Output

from components.common import (
    ANCHOR,
    DOCUMENT_PROMPT_NAMES,
    NEGATIVE,
    POSITIVE,
    QUERY_PROMPT_NAMES,
    StageError,
    get_logger,
    matryoshka_dims,
    model_prompt,
    read_splits,
    resolve_embedding_model,
    stage_component,
    valid_pairs,
    write_json,
)
from components.settings import setting

log = get_logger("finetune")

# Cluster defaults (a few hundred to a thousand train rows): with batch 32 these give ~100 optimizer steps.
DEFAULT_EPOCHS = 3
DEFAULT_BATCH_SIZE = 32
DEFAULT_LEARNING_RATE = 2e-5
DEFAULT_WARMUP_RATIO = 0.1
DEFAULT_SEED = 42
# Measured on the Kubeflow corpus with the embedded 135M LLM (README): the generated negative as a hard negative
# lowered NDCG@10, in-batch negatives alone raised it. Its negatives are often as close to the chunk as the
# positive (false negatives); turn it on for data from a strong LLM after measuring.
DEFAULT_USE_HARD_NEGATIVES = False
# Fewer optimizer steps than this rarely move a model; the stage warns, it does not refuse.
FEW_STEPS = 50
TRAINING_STATS = "training_stats.json"

QUERY_COLUMN, DOCUMENT_COLUMN, HARD_NEGATIVE_COLUMN = "query", "document", "hard_negative"


@dataclass(frozen=True)
class FinetuneSettings:
    """Training settings; a local CPU run uses a smaller batch so a few hundred rows still give enough steps."""

    finetune_epochs: float = setting(float(DEFAULT_EPOCHS), "finetuning epochs", minimum=0.01)
    finetune_batch_size: int = setting(DEFAULT_BATCH_SIZE, "pairs per optimizer step; also the in-batch negatives",
                                       local=16, minimum=2)
    finetune_learning_rate: float = setting(DEFAULT_LEARNING_RATE, "peak learning rate", minimum=1e-9, maximum=1.0)
    finetune_warmup_ratio: float = setting(DEFAULT_WARMUP_RATIO, "fraction of the steps spent warming up",
                                           minimum=0.0, maximum=0.99)
    finetune_hard_negatives: bool = setting(DEFAULT_USE_HARD_NEGATIVES, "add the generated negative as an explicit "
                                            "hard negative (default: in-batch negatives only, the better of the two "
                                            "on the embedded LLM's data; see README)")
    finetune_seed: int = setting(DEFAULT_SEED, "random seed of the training run", minimum=0, maximum=2**32 - 1)


def training_pairs(frame, use_hard_negatives: bool):
    """The columns the loss sees, in its order: query, document[, hard negative]; valid rows only."""
    from datasets import Dataset as HFDataset

    rows = valid_pairs(frame)
    columns = {QUERY_COLUMN: list(rows[POSITIVE]), DOCUMENT_COLUMN: list(rows[ANCHOR])}
    if use_hard_negatives:
        columns[HARD_NEGATIVE_COLUMN] = list(rows[NEGATIVE])
    return HFDataset.from_dict(columns)


def pick_precision() -> tuple[bool, str]:
    """(use CUDA, precision): bf16 where the GPU supports it, fp32 otherwise (and always on CPU)."""
    import torch

    if not torch.cuda.is_available():
        return False, "fp32"
    return True, "bf16" if torch.cuda.is_bf16_supported() else "fp32"


def finetune(
    scored_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    embedding_model: str,
    epochs: float = DEFAULT_EPOCHS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    warmup_ratio: float = DEFAULT_WARMUP_RATIO,
    use_hard_negatives: bool = DEFAULT_USE_HARD_NEGATIVES,
    seed: int = DEFAULT_SEED,
) -> dict[str, Any]:
    """Finetune `embedding_model` on the train split; save the model folder and `training_stats.json` in it."""
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss, MultipleNegativesRankingLoss
    from sentence_transformers.sentence_transformer.training_args import BatchSamplers
    from transformers import set_seed

    if epochs <= 0 or batch_size < 2 or learning_rate <= 0 or not 0 <= warmup_ratio < 1:
        raise StageError(f"Finetune settings out of range: epochs={epochs} (> 0), batch_size={batch_size} (>= 2, "
                         f"in-batch negatives need company), learning_rate={learning_rate} (> 0), "
                         f"warmup_ratio={warmup_ratio} (0 to < 1).")
    train = read_splits(scored_dir)["train"]
    dataset = training_pairs(train, use_hard_negatives)
    if len(dataset) < 2:
        raise StageError(f"The train split has {len(dataset)} valid rows (of {len(train)}; failed generations and "
                         "empty positives/negatives are left out); finetuning needs at least 2. Generate more data.")
    if batch_size > len(dataset):
        log.warning("batch size %d is more than the %d valid rows; using %d", batch_size, len(dataset), len(dataset))
        batch_size = len(dataset)

    use_cuda, precision = pick_precision()
    path, label = resolve_embedding_model(embedding_model)
    set_seed(seed)
    model = SentenceTransformer(path, device="cuda" if use_cuda else "cpu")
    full_dimension = int(model.get_embedding_dimension())
    dims = matryoshka_dims(full_dimension)
    query_prompt = model_prompt(model, *QUERY_PROMPT_NAMES)
    document_prompt = model_prompt(model, *DOCUMENT_PROMPT_NAMES)
    # The trainer's `prompts` maps a column to the prompt prepended to its texts.
    prompts = {}
    if query_prompt:
        prompts[QUERY_COLUMN] = query_prompt
    if document_prompt:
        prompts[DOCUMENT_COLUMN] = document_prompt
        if use_hard_negatives:
            prompts[HARD_NEGATIVE_COLUMN] = document_prompt

    steps_per_epoch = math.ceil(len(dataset) / batch_size)
    planned_steps = math.ceil(steps_per_epoch * epochs)
    log.info("finetuning %s on %d valid train rows (of %d), %s hard negatives: %d epochs x %d steps = %d optimizer "
             "steps, batch %d, lr %g, warmup %.2f, %s on %s, Matryoshka dims %s, query prompt %r",
             label, len(dataset), len(train), "with" if use_hard_negatives else "without", epochs, steps_per_epoch,
             planned_steps, batch_size, learning_rate, warmup_ratio, precision, "cuda" if use_cuda else "cpu", dims,
             query_prompt)
    if planned_steps < FEW_STEPS:
        log.warning("only %d optimizer steps (< %d): expect little change; use more data, more epochs or a smaller "
                    "batch size", planned_steps, FEW_STEPS)

    loss = MatryoshkaLoss(model, MultipleNegativesRankingLoss(model), matryoshka_dims=dims)
    with tempfile.TemporaryDirectory(prefix="finetune-") as checkpoints:
        arguments = SentenceTransformerTrainingArguments(
            output_dir=checkpoints,
            num_train_epochs=epochs,
            per_device_train_batch_size=batch_size,
            learning_rate=learning_rate,
            # Transformers 5 takes the warmup ratio as a float `warmup_steps` below 1 (`warmup_ratio` is deprecated).
            warmup_steps=warmup_ratio,
            batch_sampler=BatchSamplers.NO_DUPLICATES,
            prompts=prompts or None,
            bf16=precision == "bf16",
            use_cpu=not use_cuda,
            seed=seed,
            data_seed=seed,
            save_strategy="no",
            logging_steps=max(1, planned_steps // 10),
            report_to="none",
            disable_tqdm=True,
        )
        trainer = SentenceTransformerTrainer(model=model, args=arguments, train_dataset=dataset, loss=loss)
        result = trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        steps = int(trainer.state.global_step)

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save(str(output_dir))
    stats: dict[str, Any] = {
        "base_model": label,
        "dimension": full_dimension,
        "matryoshka_dims": dims,
        "query_prompt": query_prompt,
        "document_prompt": document_prompt,
        "use_hard_negatives": bool(use_hard_negatives),
        "train_rows": int(len(train)),
        "valid_train_rows": int(len(dataset)),
        "epochs": epochs,
        "batch_size": int(batch_size),
        "learning_rate": learning_rate,
        "warmup_ratio": warmup_ratio,
        "seed": int(seed),
        "optimizer_steps": steps,
        "precision": precision,
        "device": "cuda" if use_cuda else "cpu",
        "train_loss": float(result.training_loss),
        "loss_history": losses,
        "train_seconds": float(result.metrics.get("train_runtime", 0.0)),
    }
    write_json(output_dir / TRAINING_STATS, stats)
    log.info("finetuned in %d steps (%.0f s), mean loss %.4f; saved to %s", steps, stats["train_seconds"],
             stats["train_loss"], output_dir)
    return stats


@stage_component("finetune")
def finetune_component(
    scored: Input[Dataset],
    embedding_model: str,
    finetune_epochs: float,
    finetune_batch_size: int,
    finetune_learning_rate: float,
    finetune_warmup_ratio: float,
    finetune_hard_negatives: bool,
    finetune_seed: int,
    model: Output[Model],
):
    """Finetune the embedding model on the train split's valid triplets (MNRL inside MatryoshkaLoss)."""
    from components.finetune import FinetuneSettings, finetune
    from components.settings import from_arguments

    settings = from_arguments(FinetuneSettings, locals())
    stats = finetune(scored.path, model.path, embedding_model, epochs=settings.finetune_epochs,
                     batch_size=settings.finetune_batch_size, learning_rate=settings.finetune_learning_rate,
                     warmup_ratio=settings.finetune_warmup_ratio, use_hard_negatives=settings.finetune_hard_negatives,
                     seed=settings.finetune_seed)
    model.metadata.update({key: stats[key] for key in ("base_model", "dimension", "matryoshka_dims",
                                                        "optimizer_steps", "valid_train_rows", "precision",
                                                        "use_hard_negatives", "train_loss")})
